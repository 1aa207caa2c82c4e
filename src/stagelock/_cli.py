"""The ``stagelock`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    from . import _cli_register

    parser = argparse.ArgumentParser(
        prog="stagelock",
        description="Measure and cancel microscope stage drift.",
    )
    parser.add_argument(
        "--version", action="version", version=f"stagelock {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _cli_register.add_commands(sub)
    for name in ("_cli_daemon", "_cli_stage", "_cli_monitor"):
        module = __import__(f"stagelock.{name}", fromlist=["add_commands"])
        module.add_commands(sub)
    return parser


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``-v``/``-q`` flags to a subcommand."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="less log output"
    )


def setup_logging(args: argparse.Namespace) -> None:
    """Configure the root logger from ``-v``/``-q`` (default INFO)."""
    level = logging.INFO + 10 * (
        getattr(args, "quiet", 0) - getattr(args, "verbose", 0)
    )
    level = max(logging.DEBUG, min(level, logging.CRITICAL))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    # the level sits on the handler too: importing pymmcore-plus later resets the
    # root logger to DEBUG, which would flood stderr with watchdog's inotify lines
    handler.setLevel(level)
    logging.basicConfig(level=level, handlers=[handler])


class CliError(Exception):
    """An error to report as one line on stderr with a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
