"""Live-path benchmark: frames pushed at a fixed rate through the daemon's path.

2048x2048 uint16 frames arrive at ``--fps`` through a real :class:`Daemon`
(latest-wins slot → worker → Registrar → recorder → ZeroMQ publisher); a SUB
socket receives the messages. Latency = message receipt − frame arrival.

    python bench/live_path.py [--fps 50] [--seconds 10] [--size 2048] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stagelock.config import Config
from stagelock.daemon import Daemon, SystemdNotifier
from stagelock.sim import CameraNoise, drifting_stack
from stagelock.sinks import Recorder, ZmqPublisher
from stagelock.sources import Frame, FrameCallback


class PushSource:
    """Pushes pre-rendered frames at a fixed rate from its own thread."""

    frames_at_start = True

    def __init__(self, frames: np.ndarray, fps: float, seconds: float) -> None:
        self.name = "bench"
        self.frames, self.fps, self.seconds = frames, fps, seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self, on_frame: FrameCallback) -> None:
        def run() -> None:
            t0 = time.perf_counter()
            n = int(self.fps * self.seconds)
            for i in range(n):
                target = t0 + i / self.fps
                while (
                    d := target - time.perf_counter()
                ) > 0 and not self._stop.is_set():
                    time.sleep(min(d, 0.005))
                if self._stop.is_set():
                    return
                img = self.frames[i % len(self.frames)]
                on_frame(Frame(img, i, time.time(), self.name))
                self.sent += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    shifts = np.cumsum(rng.normal(0, 0.3, size=(8, 2)), axis=0)
    shifts[0] = 0
    frames = drifting_stack(shifts, shape=(args.size, args.size), noise=CameraNoise())

    ctx: zmq.Context[Any] = zmq.Context.instance()
    pub = ZmqPublisher("tcp://127.0.0.1:*", hwm=10000)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.shift")
    sub.connect(pub.endpoint)
    time.sleep(0.3)  # slow joiner: let the subscription reach the publisher
    latencies: list[float] = []
    errors: list[float] = []

    def receive() -> None:
        while True:
            if not sub.poll(3000):
                return
            _, body = sub.recv_multipart()
            t = time.time()
            msg = json.loads(body)
            latencies.append((t - msg["time"]) * 1000.0)
            if msg["dx_px"] is not None:
                tx, ty = shifts[msg["frame"] % len(shifts)]
                errors.append(float(np.hypot(msg["dx_px"] - tx, msg["dy_px"] - ty)))

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(duration_s=args.seconds + 0.5).with_overrides(
            registration__max_shift_px=20, log__every_n_frames=0
        )
        source = PushSource(frames, args.fps, args.seconds)
        rec = Recorder(Path(tmp) / "bench.csv")
        daemon = Daemon(
            config,
            source,
            sinks=[rec, pub],
            control=False,
            notifier=SystemdNotifier({}),
        )
        t0 = time.perf_counter()
        daemon.run()
        wall = time.perf_counter() - t0
        st = daemon.status()
    rx.join(5)
    sub.close(linger=0)
    lat = np.array(latencies)
    result = {
        "frame_shape": [args.size, args.size],
        "target_fps": args.fps,
        "frames_pushed": source.sent,
        "frames_measured": st.frames_measured,
        "frames_skipped": st.frames_skipped,
        "measured_fps": round(st.frames_measured / min(wall, args.seconds), 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "max_error_px": round(max(errors), 4) if errors else None,
        "messages_received": int(lat.size),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:18s} {value}")


if __name__ == "__main__":
    main()
