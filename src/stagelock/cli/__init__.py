"""The ``stagelock`` command line: one subcommand per job, thin over the library.

One module per command group (``_register``, ``_daemon``: run and ctl,
``_stage``: calibrate and demo, ``_views``: monitor and plot); what they share
(the error type, ``-v``/``-q``, logging) is in ``_common``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from stagelock import __version__

from ._common import CliError, setup_logging

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    from . import _daemon, _keys, _register, _stage, _views

    parser = argparse.ArgumentParser(
        prog="stagelock",
        description="Measure and cancel microscope stage drift.",
    )
    parser.add_argument(
        "--version", action="version", version=f"stagelock {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (_register, _daemon, _stage, _views, _keys):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        code = args.func(args)
    except CliError as exc:
        print(f"stagelock {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
