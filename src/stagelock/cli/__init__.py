"""The ``stagelock`` command line: one subcommand per job, thin over the library.

One module per command group (``_register``, ``_daemon``: run and ctl,
``_stage``: calibrate and demo, ``_views``: monitor and plot); what they share
(the error type, ``-v``/``-q``, logging) is in ``_common``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ._common import CliError, setup_logging

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


class _VersionAction(argparse.Action):
    """``--version``, read from the installed metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show program's version number and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        import stagelock

        parser.exit(message=f"stagelock {stagelock.__version__}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    from . import _daemon, _keys, _register, _setup, _stage, _views

    parser = argparse.ArgumentParser(
        prog="stagelock",
        description="Measure and cancel microscope stage drift.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_register, _daemon, _stage, _views, _keys, _setup):
        module.add_commands(sub)
    return parser


_VALUE_FLAGS = ("--roi",)
"""Flags whose value may start with ``-`` (``--roi -10,-10,50,50``)."""


def _join_dash_values(argv: Sequence[str]) -> list[str]:
    """Turn ``--roi -10,...`` into ``--roi=-10,...``.

    argparse takes a value starting with ``-`` for an option, so the user would
    get "expected one argument" instead of the real problem with the value.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _VALUE_FLAGS and i + 1 < len(args) and args[i + 1].startswith("-"):
            nxt = args[i + 1]
            if nxt[1:2].isdigit() or nxt[1:2] == ",":
                out.append(f"{arg}={nxt}")
                i += 2
                continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(_join_dash_values(sys.argv[1:] if argv is None else argv))
    setup_logging(args)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"stagelock {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (``stagelock monitor --json | head``): not an error
        _silence_stdout()
        return 0
    return int(code or 0)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the exit's flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _flush_zmq(timeout_s: float) -> None:
    """Let ZeroMQ deliver what closed sockets still queue, for at most ``timeout_s``.

    :func:`os._exit` kills ZeroMQ's I/O threads at once, so the last messages
    (the alarm that stopped the daemon, its final status) would be lost.
    Terminating the shared context sends them within each socket's linger;
    it runs in a thread because it waits for every socket to be closed, and
    one left open must not hold the exit.
    """
    if "zmq" not in sys.modules:
        return
    import threading

    import zmq

    done = threading.Thread(target=zmq.Context.instance().term, daemon=True)
    done.start()
    done.join(timeout_s)


def entry() -> None:
    """Run the ``stagelock`` executable: :func:`main`, then exit without finalizing.

    A Micro-Manager core with compiled devices still alive while the interpreter
    finalizes sometimes aborts the process ("FATAL: exception not rethrown",
    exit 134): its C++ threads are unwound when they reach for the GIL. Once
    pymmcore-plus was imported, the command's own work is done and flushed, so
    the process ends with :func:`os._exit` instead of a finalization that can
    abort.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    if "pymmcore_plus" not in sys.modules:
        sys.exit(code)
    import gc
    import logging

    gc.collect()
    _flush_zmq(timeout_s=0.5)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            _silence_stdout()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
