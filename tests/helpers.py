"""Test helpers, one per job (imported by tests and exposed as fixtures in conftest).

Real things only: ZeroMQ sockets on 127.0.0.1, ``stagelock run`` subprocesses,
simulated microscopes on ``UniMMCore``, drifting stacks with a known truth.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zmq

from stagelock.daemon import request
from stagelock.sim import (
    CameraNoise,
    SimulatedMicroscope,
    drifting_stack,
    random_drift,
)
from stagelock.sources import release_core

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    from stagelock.sources import Frame


def wait_until(
    predicate: Callable[[], bool],
    timeout_s: float = 10.0,
    what: str = "condition",
    *,
    action: Callable[[], None] | None = None,
) -> None:
    """Poll ``predicate`` (calling ``action`` each round); fail, never hang."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        if action is not None:
            action()
        time.sleep(0.002 if action is None else 0.02)


class FrameCollector:
    """A frame consumer that keeps every frame (the tests want them all)."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._cond = threading.Condition()

    def __call__(self, frame: Frame) -> None:
        with self._cond:
            self.frames.append(frame)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self.frames)

    def snapshot(self) -> list[Frame]:
        """The frames received so far, oldest first."""
        with self._cond:
            return list(self.frames)

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Frame]:
        """Until ``n`` frames arrived; fail after ``timeout_s``."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.frames) >= n, timeout_s)
        assert ok, f"only {len(self.frames)} of {n} frames within {timeout_s} s"
        return self.snapshot()


def walking_drift(
    n: int,
    seed: int,
    *,
    shape: tuple[int, int] = (256, 256),
    step_px: float = 0.6,
    still: int = 0,
    peak_photons: float = 2000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A random-walk drift (frames ``0..still`` do not move) and its frames."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, step_px, size=(n, 2))
    steps[: still + 1] = 0.0
    shifts = np.cumsum(steps, axis=0)
    frames = drifting_stack(
        shifts, shape=shape, noise=CameraNoise(peak_photons=peak_photons), seed=seed
    )
    return shifts, frames


def cli() -> list[str]:
    """``python -m stagelock`` in this interpreter."""
    return [sys.executable, "-m", "stagelock"]


def _ports_below_ephemeral() -> tuple[int, int]:
    """A port range the kernel never picks as a connection's source port."""
    try:
        lowest = int(
            Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        )
    except (OSError, ValueError, IndexError):
        lowest = 32768
    return max(1024, lowest - 12000), lowest


def free_port() -> int:
    """A loopback TCP port free at the time of the call, for a process to bind later.

    Not an ephemeral port: a socket that connects to it before anything
    listens retries, and on Linux a retry can be given that very port as its
    source and connect to itself. Probed from a throwaway context: a
    subscriber whose own context had bound and closed the port then connects
    and handshakes with the daemon but receives nothing (seen in 4 of 10
    runs of the full-disk test).
    """
    low, high = _ports_below_ephemeral()
    with zmq.Context() as ctx, ctx.socket(zmq.PUB) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        return sock.bind_to_random_port("tcp://127.0.0.1", low, high)


def free_endpoint() -> str:
    """A loopback TCP endpoint with a port free at the time of the call."""
    return f"tcp://127.0.0.1:{free_port()}"


def recv(sock: zmq.Socket[Any], timeout_s: float = 10.0) -> tuple[str, dict[str, Any]]:
    """One ``[topic, json]`` message, or fail instead of hanging."""
    if not sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
        raise TimeoutError(f"no message within {timeout_s:.1f} s")
    topic, body = sock.recv_multipart()
    return topic.decode(), json.loads(body)


class DaemonProcess:
    """A ``stagelock run`` subprocess, its log file, and a SUB socket on its topics.

    ``args`` follow ``stagelock run``; the publish and control endpoints are free
    loopback ports chosen here. ``config``, when given, is written to
    ``<name>.toml`` and passed with ``--config``.
    """

    def __init__(
        self,
        tmp_path: Path,
        ctx: zmq.Context[Any],
        name: str,
        config: str | None,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.publish = free_endpoint()
        self.control = free_endpoint()
        command = [*cli(), "run", "--publish", self.publish, "--control", self.control]
        if config is not None:
            cfg = tmp_path / f"{name}.toml"
            cfg.write_text(config)
            command += ["--config", str(cfg)]
        self.log_path = tmp_path / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.sub: zmq.Socket[Any] = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.")
        self.sub.connect(self.publish)

    def wait_up(self, timeout_s: float = 40.0) -> None:
        """Until the first heartbeat: subscribed (no slow joiner) and running."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.log()}")
            try:
                topic, _ = recv(self.sub, 0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no heartbeat:\n{self.log()}") from None
                continue
            if topic == "stagelock.status":
                return

    def ctl(self, command: str, **params: Any) -> dict[str, Any]:
        return request(self.control, command, timeout_s=5.0, context=self.ctx, **params)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
        self.sub.close(linger=0)


# a quiet, drift-free microscope: tests add what they need
STILL: dict[str, Any] = {
    "shape_px": [256, 256],
    "pixel_size_um": 0.5,
    "exposure_ms": 5.0,
    "creep_um_per_s": [0.0, 0.0],
    "random_walk_um_per_sqrt_s": 0.0,
    "stage_speed_um_per_s": 1000.0,
    "stage_settle_ms": 5.0,
    "peak_photons": 2000.0,
}


def scope_factory() -> Iterator[Callable[..., SimulatedMicroscope]]:
    """Factory of simulated microscopes, released at teardown."""
    scopes: list[SimulatedMicroscope] = []

    def make(
        settings: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> SimulatedMicroscope:
        merged = {**STILL, **(settings or {})}
        scope = SimulatedMicroscope(merged, **kwargs)
        scopes.append(scope)
        return scope

    yield make
    for scope in scopes:
        release_core(scope.core)
    scopes.clear()


def snap(scope: SimulatedMicroscope) -> Any:
    """Snap one frame after the stage has settled."""
    scope.core.waitForDevice("XYStage")
    scope.core.snapImage()
    return scope.core.getImage()


# -- batch registration stacks ----------------------------------------------------


BATCH_SHAPE = (128, 128)
"""Frame size of the batch-registration test stacks."""
BATCH_FRAMES = 36


def write_stack(path: Path, seed: int, n_frames: int = BATCH_FRAMES) -> np.ndarray:
    """A drifting TIFF stack at ``path``; returns its truth (T, 2) = (dx, dy)."""
    truth = random_drift(n_frames, creep_px_per_frame=(0.1, -0.07), seed=seed)
    stack = drifting_stack(truth, shape=BATCH_SHAPE, seed=seed)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    return truth


def read_shifts_csv(path: Path) -> tuple[list[int], np.ndarray, list[str]]:
    """Frame column, (T, 2) shifts and statuses of a shifts CSV."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["frame", "dx_px", "dy_px", "confidence", "status"]
    frames = [int(r["frame"]) for r in rows]
    shifts = np.array([[float(r["dx_px"]), float(r["dy_px"])] for r in rows])
    return frames, shifts, [r["status"] for r in rows]


def rms(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference of two shift arrays (px)."""
    return float(np.sqrt(np.mean((a - b) ** 2)))
