"""``stagelock monitor`` (live view of daemons) and ``stagelock plot`` (figure)."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from ._common import (
    CliError,
    add_key_options,
    add_verbosity,
    client_keys,
    handle_stop_signals,
)

__all__ = ["add_commands"]


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``monitor`` and ``plot``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``stagelock`` parser's subcommand registry.
    """
    from stagelock.views import DEFAULT_ENDPOINT

    monitor = subparsers.add_parser(
        "monitor",
        help="live view of running daemons' shifts, status and alarms",
        description=(
            "Subscribe to one or several stagelock daemons and show one live row per "
            "source: drift in px and µm, confidence, frame rate, skipped frames, "
            "corrections, alarms and a sparkline of recent drift. Ctrl-C exits."
        ),
    )
    monitor.add_argument(
        "--endpoint",
        action="append",
        metavar="tcp://HOST:PORT",
        help=f"daemon publisher to subscribe to; repeat for several (default "
        f"{DEFAULT_ENDPOINT})",
    )
    monitor.add_argument(
        "--json",
        action="store_true",
        help="print every message as one JSON object per line (with 'topic') instead",
    )
    monitor.add_argument(
        "--duration", type=_positive_float, metavar="S", help="stop after S seconds"
    )
    monitor.add_argument(
        "--silent-after-s",
        type=_positive_float,
        default=3.0,
        metavar="S",
        help="flag a source as silent after S seconds without a message (default 3)",
    )
    add_key_options(monitor, server=False)
    add_verbosity(monitor)
    monitor.set_defaults(func=_monitor)

    plot = subparsers.add_parser(
        "plot",
        help="figure of a recorded drift run (drift, trajectory, confidence)",
        description=(
            "Plot a daemon record (CSV or JSON lines) or a 'stagelock register' shifts "
            "CSV: drift over time in px (and µm), the XY trajectory coloured by time, "
            "confidence over time and stage corrections."
        ),
    )
    plot.add_argument("record", type=Path, metavar="RECORD", help="record file to plot")
    plot.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("drift.png"),
        help="image to write; the format follows the suffix (default drift.png)",
    )
    plot.add_argument("--title", help="figure title (default: the record's name)")
    plot.add_argument(
        "--position",
        type=int,
        metavar="N",
        help="draw only MDA position N (default: every position)",
    )
    plot.add_argument(
        "--dpi", type=_positive_float, default=100.0, help="resolution (default 100)"
    )
    add_verbosity(plot)
    plot.set_defaults(func=_plot)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _monitor(args: argparse.Namespace) -> int:
    from stagelock.views import DEFAULT_ENDPOINT, parse_endpoint, run_monitor

    endpoints = args.endpoint or [DEFAULT_ENDPOINT]
    try:
        checked = [parse_endpoint(e) for e in endpoints]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    keys = client_keys(args)
    # Ctrl-C and SIGTERM end the loop at its next turn (a refresh period at most)
    stop = threading.Event()
    with handle_stop_signals(lambda _signum: stop.set()):
        run_monitor(
            checked,
            keys=keys,
            json_output=args.json,
            duration_s=args.duration,
            silent_after_s=args.silent_after_s,
            stop=stop,
        )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from stagelock.views import (
        MissingExtraError,
        RecordError,
        load_record,
        plot_record,
    )

    try:
        record = load_record(args.record)
        if args.position is not None:
            record = record.select_position(args.position)
        out = plot_record(record, args.output, title=args.title, dpi=args.dpi)
    except (RecordError, MissingExtraError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        # e.g. an output directory that does not exist
        raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(
        f"wrote {out} ({record.n_shifts} frames, {record.n_failed} without a shift, "
        f"{len(record.corrections)} corrections)"
    )
    if record.unreadable_lines:
        print(
            f"warning: {record.unreadable_lines} damaged line(s) in {args.record} "
            "skipped (torn by a crash or a full disk)",
            file=sys.stderr,
        )
    return 0
