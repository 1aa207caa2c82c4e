"""``stagelock run`` (the daemon) and ``stagelock ctl`` (its control client)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ._common import (
    CliError,
    add_key_options,
    add_verbosity,
    client_keys,
    handle_stop_signals,
    keep_log_level,
)

__all__ = ["add_commands", "format_status"]

logger = logging.getLogger("stagelock.daemon")

ENV_OVERRIDES = {
    "STAGELOCK_PUBLISH": "publish__endpoint",
    "STAGELOCK_CONTROL": "control__endpoint",
    "STAGELOCK_RECORD": "record__path",
    "STAGELOCK_STATE_DIR": "state_dir",
    "STAGELOCK_KEYS": "security__keys_dir",
}
"""Environment variables (between the config file and the flags)."""


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``run`` and ``ctl``."""
    run = subparsers.add_parser(
        "run",
        help="measure drift live and publish it (the daemon)",
        description=(
            "Measure every frame's drift against a reference and publish it on "
            "ZeroMQ until stopped (SIGTERM, Ctrl-C, 'stagelock ctl stop'). Without "
            "--config and --watch it runs on the built-in simulated microscope, "
            "calibrates its stage and corrects the drift (closed loop)."
        ),
    )
    run.add_argument(
        "--config", type=Path, metavar="PATH", help="TOML configuration file"
    )
    run.add_argument(
        "--watch", type=Path, metavar="DIR", help="read TIFF files appearing in DIR"
    )
    run.add_argument(
        "--from-start",
        action="store_true",
        default=None,
        help="with --watch: also process files already present",
    )
    run.add_argument(
        "--publish",
        metavar="ENDPOINT",
        help="ZeroMQ PUB endpoint (default tcp://127.0.0.1:5556)",
    )
    run.add_argument(
        "--control",
        metavar="ENDPOINT",
        help="ZeroMQ control endpoint (default tcp://127.0.0.1:5557)",
    )
    run.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="append every measurement to FILE (.csv or .jsonl)",
    )
    run.add_argument("--pixel-size", type=float, metavar="UM", help="pixel size in µm")
    run.add_argument(
        "--frames", type=int, metavar="N", help="stop after N measured frames"
    )
    run.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    run.add_argument(
        "--feedback",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="move the stage to cancel the drift (stage.feedback); --no-feedback "
        "only measures",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="keep the reference, calibration and stage origin in DIR and resume "
        "from them after a restart (state_dir)",
    )
    run.add_argument(
        "--fresh",
        action="store_true",
        help="with --state-dir: discard the saved state and take a new reference",
    )
    add_key_options(run, server=True)
    add_verbosity(run)
    run.set_defaults(func=_run)

    ctl = subparsers.add_parser(
        "ctl",
        help="send a command to a running daemon",
        description="Send status, pause, resume, rereference, reset-origin (centre "
        "the stage's travel limit on its current position) or stop to a daemon.",
    )
    ctl.add_argument(
        "action",
        metavar="COMMAND",
        help="status | pause | resume | rereference | reset-origin | stop",
    )
    ctl.add_argument(
        "--endpoint",
        default=None,
        help="control endpoint (default $STAGELOCK_CONTROL or tcp://127.0.0.1:5557)",
    )
    ctl.add_argument("--timeout-s", type=float, default=2.0, help="reply timeout (s)")
    ctl.add_argument("--json", action="store_true", help="print the raw JSON reply")
    add_key_options(ctl, server=False)
    add_verbosity(ctl)
    ctl.set_defaults(func=_ctl)


def _load(args: argparse.Namespace) -> Any:
    from stagelock.config import Config, ConfigError, load_config

    try:
        config_path = args.config or os.environ.get("STAGELOCK_CONFIG")
        if config_path:
            config = load_config(config_path)
        elif args.watch is None:
            config = Config.quickstart()  # the simulated microscope, loop closed
        else:
            config = Config()
        # precedence: flag, then environment, then file (None = not given)
        env = {key: os.environ.get(var) or None for var, key in ENV_OVERRIDES.items()}
        flags: dict[str, Any] = {
            "publish__endpoint": args.publish or env["publish__endpoint"],
            "control__endpoint": args.control or env["control__endpoint"],
            "record__path": args.record or env["record__path"],
            "pixel_size_um": args.pixel_size,
            "frames": args.frames,
            "duration_s": args.duration,
            "source__folder__from_start": args.from_start,
            "stage__feedback": args.feedback,
            "state_dir": args.state_dir,
            "security__keys_dir": args.keys,
            "security__insecure": True if args.insecure else None,
        }
        if args.watch is not None:
            flags["source__kind"] = "folder"
            flags["source__folder__path"] = args.watch
        return config.with_overrides(**flags)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    with keep_log_level():
        from stagelock.daemon import DaemonError, build_daemon

    config = _load(args)
    if args.fresh and config.state_dir is None:
        raise CliError("--fresh needs --state-dir DIR (or state_dir in the config)")
    try:
        daemon = build_daemon(config, fresh=args.fresh)
    except DaemonError as exc:
        raise CliError(str(exc)) from None

    # the handler reaches the daemon through a list, so it can be dropped below
    running = [daemon]
    del daemon

    def _on_signal(signum: int) -> None:
        for d in running:
            d.request_stop(f"signal {signal.Signals(signum).name}")

    try:
        with handle_stop_signals(_on_signal):
            return running[0].run()
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    finally:
        # a Micro-Manager core still alive at interpreter exit sometimes aborts
        # the process (exit 134): drop the daemon, and with it the core, now
        running.clear()
        gc.collect()


def format_status(reply: dict[str, Any]) -> str:
    """Format a ``status`` reply as a readable multi-line summary."""

    def num(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        f"state        {reply.get('state')}",
        f"source       {reply.get('source')}",
        f"frames       {reply.get('frames_measured')} measured, "
        f"{reply.get('frames_skipped')} skipped, {reply.get('frames_failed')} failed "
        f"({reply.get('frames_received')} received)",
        f"rate         {num(reply.get('fps'), '.1f')} fps",
        f"last shift   dx {num(reply.get('dx_px'), '+.3f')} px, "
        f"dy {num(reply.get('dy_px'), '+.3f')} px "
        f"(frame {num(reply.get('last_frame'), 'd')}, {reply.get('status') or '–'}, "
        f"confidence {num(reply.get('confidence'), '.2f')})",
        f"reference    frame {num(reply.get('reference_frame'), 'd')} "
        f"({reply.get('references_taken')} taken)",
        f"corrections  {reply.get('corrections')}{_stage_line(reply.get('stage'))}",
        f"alarm        {reply.get('alarm') or 'none'}",
        f"publishing   {reply.get('publish_endpoint') or '–'}",
        f"recording    {reply.get('record_path') or '–'}",
        f"uptime       {num(reply.get('uptime_s'), '.1f')} s",
    ]
    return "\n".join(lines)


def _stage_line(stage: Any) -> str:
    if not isinstance(stage, dict):
        return " (no stage feedback)"
    offset = stage.get("offset_um")
    moved = (
        f"stage {offset[0]:+.3f}, {offset[1]:+.3f} µm from start"
        if isinstance(offset, list) and len(offset) == 2
        else "stage position unknown"
    )
    alarm = f", alarm {stage['alarm']}" if stage.get("alarm") else ""
    return f" (loop {stage.get('state')}, {moved}{alarm})"


def _ctl(args: argparse.Namespace) -> int:
    from stagelock.daemon import NoAnswer, request
    from stagelock.protocol import DEFAULT_CONTROL_ENDPOINT

    endpoint = (
        args.endpoint or os.environ.get("STAGELOCK_CONTROL") or DEFAULT_CONTROL_ENDPOINT
    )
    keys = client_keys(args)
    try:
        reply = request(endpoint, args.action, timeout_s=args.timeout_s, keys=keys)
    except NoAnswer as exc:
        raise CliError(str(exc), exit_code=1) from None
    if args.json:
        print(json.dumps(reply, indent=2))
    elif not reply.get("ok"):
        pass
    elif args.action == "status":
        print(format_status(reply))
    else:
        extra = {k: v for k, v in reply.items() if k != "ok"}
        print(f"{args.action}: ok" + "".join(f", {k} {v}" for k, v in extra.items()))
    if not reply.get("ok"):
        print(
            f"stagelock ctl: error: {reply.get('error')} ({reply.get('code')})",
            file=sys.stderr,
        )
        return 1
    return 0
