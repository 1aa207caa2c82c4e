"""What every subcommand shares: the error type, ``-v``/``-q`` and logging."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

    from stagelock.security import ClientKeys

__all__ = [
    "CliError",
    "add_key_options",
    "add_verbosity",
    "client_keys",
    "handle_stop_signals",
    "keep_log_level",
    "setup_logging",
]


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``-v``/``-q`` flags to a subcommand."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="less log output"
    )


def add_key_options(parser: argparse.ArgumentParser, *, server: bool) -> None:
    """Add ``--keys DIR`` (and, for the daemon, ``--insecure``)."""
    from pathlib import Path

    parser.add_argument(
        "--keys",
        type=Path,
        metavar="DIR",
        help="CURVE keys from 'stagelock keys generate' (security.keys_dir; "
        "default $STAGELOCK_KEYS)"
        if server
        else "CURVE keys: server.key and this client's key pair (default "
        "$STAGELOCK_KEYS)",
    )
    if server:
        parser.add_argument(
            "--insecure",
            action="store_true",
            help="allow binding a non-loopback address without --keys (warns)",
        )


def client_keys(args: argparse.Namespace) -> ClientKeys | None:
    """Load the client keys ``--keys`` (or ``$STAGELOCK_KEYS``) names, if any.

    Raises
    ------
    CliError
        When the directory lacks a usable key.
    """
    import os

    from stagelock.security import SecurityError, load_client_keys

    directory = args.keys or os.environ.get("STAGELOCK_KEYS") or None
    if directory is None:
        return None
    try:
        return load_client_keys(directory)
    except SecurityError as exc:
        raise CliError(str(exc)) from None


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


@contextlib.contextmanager
def keep_log_level() -> Iterator[None]:
    """Keep the root logger's level across an import of pymmcore-plus.

    Importing pymmcore-plus lowers the root logger to DEBUG; the level that
    ``-v``/``-q`` chose must survive it.
    """
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def handle_stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``on_signal(signum)`` inside the block.

    The command then stops at a point of its own choosing instead of on an
    exception raised in the middle of a receive or a write. The previous
    handlers are restored on exit. Off the main thread (a command called from
    a test's worker thread) signals cannot be handled and nothing changes.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {
            s: signal.signal(s, lambda signum, _frame: on_signal(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
