"""Soak: the daemon at 50 fps on 2048² frames for N minutes, sampled over time.

A child process runs a real :class:`~stagelock.daemon.Daemon` (latest-wins slot →
worker → Registrar → JSON-lines recorder → ZeroMQ publisher, control socket and
state directory on) fed by pre-rendered uint16 frames pushed at ``--fps``. The
parent subscribes to its shifts and, every ``--sample-s``, reads the child's
``/proc/<pid>`` (RSS, open fds, threads) and the latency percentiles of the
messages received in that interval (latency = receipt − frame arrival).

    python bench/soak.py --minutes 60 [--fps 50] [--size 2048] [--sample-s 30]

Writes ``bench/results/soak-<minutes>min.json`` (every sample) and ``.md`` (the
summary: RSS growth per hour fitted after the first ``--warmup-min`` minutes,
p99 per interval, fd and thread counts first/last).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

RESULTS = Path(__file__).resolve().parent / "results"


def child(args: argparse.Namespace) -> None:
    """Run the daemon (in the child process) until its duration ends."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from live_path import PushSource

    from stagelock.config import Config
    from stagelock.daemon import Daemon, SystemdNotifier
    from stagelock.daemon._state import StateDir
    from stagelock.sim import CameraNoise, drifting_stack
    from stagelock.sinks import Recorder, ZmqPublisher

    rng = np.random.default_rng(0)
    shifts = np.cumsum(rng.normal(0, 0.3, size=(8, 2)), axis=0)
    shifts[0] = 0
    frames = drifting_stack(shifts, shape=(args.size, args.size), noise=CameraNoise())
    seconds = args.minutes * 60.0
    tmp = Path(args.workdir)
    config = Config(duration_s=seconds + 1.0).with_overrides(
        registration__max_shift_px=20,
        log__every_n_frames=0,
        control__endpoint=args.control,
    )
    pub = ZmqPublisher(args.publish, hwm=10000)
    rec = Recorder(tmp / "soak.jsonl")
    state = StateDir(tmp / "state", source_name="bench", source_kind="simulated")
    daemon = Daemon(
        config,
        PushSource(frames, args.fps, seconds),
        sinks=[rec, pub],
        notifier=SystemdNotifier({}),
        state_dir=state,
        cleanup=[state.close],
    )
    daemon.run()


def proc_sample(pid: int) -> dict[str, int]:
    """RSS (kB), threads and open file descriptors of a process."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def parent(args: argparse.Namespace) -> None:
    """Start the child, sample it, write the results."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    ports = []
    for _ in range(2):  # two loopback ports free now, for the child to bind
        probe = ctx.socket(zmq.PUB)
        ports.append(probe.bind_to_random_port("tcp://127.0.0.1"))
        probe.close(linger=0)
    publish, control_port = f"tcp://127.0.0.1:{ports[0]}", ports[1]
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.shift")
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, __file__, "--child", "--workdir", workdir]
        cmd += ["--publish", publish, "--control", f"tcp://127.0.0.1:{control_port}"]
        cmd += ["--minutes", str(args.minutes), "--fps", str(args.fps)]
        cmd += ["--size", str(args.size)]
        proc = subprocess.Popen(cmd)
        sub.connect(publish)
        samples: list[dict[str, Any]] = []
        latencies: list[float] = []
        received = 0
        next_sample = float("inf")
        first_message: float | None = None
        try:
            while proc.poll() is None:
                if sub.poll(200):
                    _, body = sub.recv_multipart()
                    now = time.time()
                    msg = json.loads(body)
                    latencies.append((now - msg["time"]) * 1000.0)
                    received += 1
                    if first_message is None:
                        # the clock starts with the first shift (after the import
                        # and the rendering of the frames in the child)
                        first_message = time.monotonic()
                        next_sample = first_message + args.sample_s
                if time.monotonic() >= next_sample and first_message is not None:
                    next_sample = max(next_sample + args.sample_s, time.monotonic())
                    try:
                        sample: dict[str, Any] = proc_sample(proc.pid)
                    except OSError:
                        break
                    lat = np.asarray(latencies)
                    latencies = []
                    sample.update(
                        t_min=round((time.monotonic() - first_message) / 60.0, 3),
                        messages=int(lat.size),
                        fps=round(lat.size / args.sample_s, 2),
                        latency_ms_p50=round(float(np.percentile(lat, 50)), 2)
                        if lat.size
                        else None,
                        latency_ms_p99=round(float(np.percentile(lat, 99)), 2)
                        if lat.size
                        else None,
                        latency_ms_max=round(float(lat.max()), 2) if lat.size else None,
                    )
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)
            sub.close(linger=0)
    write(args, samples, received)


def write(args: argparse.Namespace, samples: list[dict[str, Any]], n: int) -> None:
    """Save every sample and a summary under bench/results/."""
    RESULTS.mkdir(exist_ok=True)
    stem = f"soak-{args.minutes:g}min"
    t = np.array([s["t_min"] for s in samples])
    rss = np.array([s["VmRSS"] for s in samples], dtype=float)
    late = t >= args.warmup_min
    slope = (
        float(np.polyfit(t[late], rss[late], 1)[0]) * 60.0 / 1024.0
        if late.sum() >= 3
        else None
    )
    p99 = [s["latency_ms_p99"] for s in samples if s["latency_ms_p99"] is not None]
    summary = {
        "minutes": args.minutes,
        "target_fps": args.fps,
        "frame_shape": [args.size, args.size],
        "messages_received": n,
        "rss_mb_first": round(rss[0] / 1024, 1) if rss.size else None,
        "rss_mb_last": round(rss[-1] / 1024, 1) if rss.size else None,
        "rss_growth_mb_per_h_after_warmup": None if slope is None else round(slope, 2),
        "warmup_min": args.warmup_min,
        "p99_ms_max_interval": round(max(p99), 2) if p99 else None,
        "p99_ms_median_interval": round(float(np.median(p99)), 2) if p99 else None,
        "fds_first_last": [samples[0]["fds"], samples[-1]["fds"]] if samples else None,
        "threads_first_last": [samples[0]["Threads"], samples[-1]["Threads"]]
        if samples
        else None,
        "fps_min_interval": min(s["fps"] for s in samples) if samples else None,
        "load_avg_1_5_15": list(os.getloadavg()),
    }
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"summary": summary, "samples": samples}, indent=2) + "\n"
    )
    lines = [f"# Soak: {args.minutes:g} min, {args.fps:g} fps, {args.size}²", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    lines += ["", "| t (min) | RSS (MB) | fds | threads | fps | p50 ms | p99 ms |"]
    lines += ["|---|---|---|---|---|---|---|"]
    lines += [
        f"| {s['t_min']:.1f} | {s['VmRSS'] / 1024:.1f} | {s['fds']} | "
        f"{s['Threads']} | {s['fps']} | {s['latency_ms_p50']} | "
        f"{s['latency_ms_p99']} |"
        for s in samples
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=2))


def main() -> None:
    """Parse the options; run as the sampler or (``--child``) as the daemon."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=50.0)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--warmup-min", type=float, default=2.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--publish", help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
