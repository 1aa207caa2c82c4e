"""End-to-end: ``stagelock run`` with the stage loop closed, as a subprocess.

The simulated microscope (Python camera + XY stage on a real ``UniMMCore``) drifts
with a creep the test configures; the daemon must calibrate the stage by itself
(the geometry has a rotation and a mirrored axis) and hold the image still,
while the same microscope without feedback drifts away. Real ZeroMQ sockets,
real files, a real ``AF_UNIX`` datagram socket for ``sd_notify``, and the
compiled Micro-Manager demo configuration.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import signal
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import zmq

from helpers import DaemonProcess, cli, recv

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

CREEP_UM_PER_S = (0.6, -0.4)
PIXEL_SIZE_UM = 0.5
# 1.2, -0.8 px/s of creep seen through a rotated camera with a mirrored y axis:
# the loop must find sign, scale, rotation and flip by its own calibration
SIMULATED = f"""
[source]
kind = "simulated"

[simulation]
shape_px = [256, 256]
pixel_size_um = {PIXEL_SIZE_UM}
rotation_deg = 20.0
flip_y = true
exposure_ms = 5.0
frame_interval_ms = 40.0
peak_photons = 2000.0
creep_um_per_s = [{CREEP_UM_PER_S[0]}, {CREEP_UM_PER_S[1]}]
random_walk_um_per_sqrt_s = 0.02
stage_speed_um_per_s = 500.0
stage_settle_ms = 10.0

[registration]
max_shift_px = 30

[publish]
heartbeat_s = 0.2

[log]
every_n_frames = 25
"""


class Run(DaemonProcess):
    """A daemon whose messages are kept, for checks after the run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages: list[tuple[str, dict[str, Any]]] = []

    def collect_until_frame(
        self, frame: int, timeout_s: float = 30.0, *, min_shifts: int = 1
    ) -> None:
        """Keep every message until a shift of ``frame`` or later arrived.

        With ``min_shifts``, also until that many shifts arrived in all: a
        slow machine skips frames, so frame numbers alone do not count them.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no frame {frame} in {timeout_s} s:\n{self.log()}"
                )
            topic, msg = recv(self.sub, remaining)
            self.messages.append((topic, msg))
            if (
                topic == "stagelock.shift"
                and msg["frame"] >= frame
                and len(self.topic("stagelock.shift")) >= min_shifts
            ):
                return

    def topic(self, name: str) -> list[dict[str, Any]]:
        return [m for t, m in self.messages if t == name]


@pytest.fixture
def runs(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[Any]:
    made: list[Run] = []

    def make(name: str, config: str | None, *extra: str, **kw: Any) -> Run:
        run = Run(tmp_path, ctx, name, config, *extra, **kw)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


class NotifyListener:
    """A bound ``AF_UNIX`` datagram socket read continuously, as systemd does.

    (A socket nobody reads fills its queue after ~10 datagrams, and then the
    sender's ``sendto`` blocks.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.received: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.received.append(data.decode())

    def notes(self) -> list[str]:
        with self._lock:
            return list(self.received)

    def wait_for(self, note: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while note not in self.notes():
            assert time.monotonic() < deadline, f"no {note!r}: {self.notes()}"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


def magnitude(msg: dict[str, Any]) -> float:
    return math.hypot(msg["dx_px"], msg["dy_px"])


def test_closed_loop_holds_the_image_while_open_loop_drifts(
    runs: Any, tmp_path: Path, notify: NotifyListener
) -> None:
    record = tmp_path / "closed.jsonl"
    closed = runs(
        "closed",
        SIMULATED + "[stage]\nfeedback = true\n",
        "--record",
        str(record),
        # a watchdog period of 0.4 s: WATCHDOG=1 every 0.2 s
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
    )
    # the same microscope, measuring only; started together to share the time
    opened = runs("open", SIMULATED + "[stage]\nfeedback = false\n")
    closed.wait_up()
    opened.wait_up()
    closed.collect_until_frame(100)  # 4 s at 25 frames/s
    opened.collect_until_frame(100)

    # closed loop: after locking (1 s) the image stays within a pixel
    shifts = [m for m in closed.topic("stagelock.shift") if m["status"] == "ok"]
    locked = np.array([(m["dx_px"], m["dy_px"]) for m in shifts if m["frame"] >= 25])
    assert len(locked) >= 50
    residual_max = float(np.hypot(*locked.T).max())
    residual_rms = float(np.sqrt(np.mean(np.sum(locked**2, axis=1))))
    # within a pixel, plus what the sample creeps between two measured frames:
    # the loop cannot see the creep sooner (25 fps: 0.06 px; a CI host 5-10x
    # slower than usual measured 1.02 px with the frames that much further apart)
    times = np.array([m["time"] for m in shifts if m["frame"] >= 25])
    creep_px_per_s = float(np.hypot(*CREEP_UM_PER_S)) / PIXEL_SIZE_UM
    one_frame_px = creep_px_per_s * float(np.diff(times).max())
    assert residual_max < 1.0 + one_frame_px, (residual_max, one_frame_px)
    # the hold: a loop correcting 70 % per measured frame lags a steady creep by
    # about v T / 0.7; 2 v T leaves room for frames skipped while settling (at
    # 25 fps the bound is 0.42 px; CI measured 0.41 px with slower frames)
    lag_px = 2.0 * creep_px_per_s * float(np.median(np.diff(times)))
    assert residual_rms < 0.3 + lag_px, (residual_rms, lag_px)
    # open loop: the same creep moves the image ~1.4 px/s, and it keeps going
    drift = opened.topic("stagelock.shift")
    # the first frames this subscriber saw: on a loaded host it may join late
    # (slow joiner), after frame 30
    early = [magnitude(m) for m in drift[:10]]
    late = magnitude(drift[-1])
    elapsed_s = drift[-1]["time"] - drift[0]["time"]
    grown_px = creep_px_per_s * (drift[-1]["time"] - drift[9]["time"])
    assert late > 4.0 and late > max(early) + 0.5 * grown_px, (early, late)
    assert late > 10 * residual_rms
    # the subscriber may join after the reference frame (slow joiner): compare
    # the drift between the first and last frames it saw with the time between
    moved = math.hypot(
        drift[-1]["dx_px"] - drift[0]["dx_px"], drift[-1]["dy_px"] - drift[0]["dy_px"]
    )
    assert moved == pytest.approx(creep_px_per_s * elapsed_s, rel=0.3)
    print(  # the numbers, for -s
        f"closed loop: frame interval {np.median(np.diff(times)) * 1e3:.0f} ms, "
        f"residual max {residual_max:.3f} px, RMS {residual_rms:.3f} "
        f"px; open loop: {late:.2f} px after {elapsed_s:.1f} s"
    )

    # corrections arrive on the SUB socket with their schema, right after shifts
    corrections = closed.topic("stagelock.correction")
    moved = [c for c in corrections if c["status"] == "moved"]
    assert len(moved) >= 5
    for c in corrections:
        assert c["schema"] == "stagelock.correction/2"
        assert set(c) >= {"frame", "time", "move_x_um", "move_y_um", "stage_x_um"}
    # the stage followed the sample: its total move is the creep the test set
    status = closed.ctl("status")
    stage = status["stage"]
    span_s = shifts[-1]["time"] - shifts[0]["time"]
    offset = np.array(stage["offset_um"])
    expected = np.array(CREEP_UM_PER_S) * span_s
    assert np.linalg.norm(offset - expected) < 0.25 * np.linalg.norm(expected) + 0.2
    assert status["corrections"] == stage["corrections"] >= len(moved)
    assert stage["state"] in ("tracking", "settling") and stage["alarm"] is None
    heartbeats = closed.topic("stagelock.status")
    assert max(h["corrections"] for h in heartbeats) >= 5
    assert opened.ctl("status")["corrections"] == 0
    assert opened.ctl("status")["stage"] is None

    # pause stops measuring and correcting; resume restarts both
    assert closed.ctl("pause")["state"] == "paused"
    paused = closed.ctl("status")
    assert paused["stage"]["state"] == "paused"
    assert closed.ctl("resume")["state"] == "measuring"
    assert closed.ctl("status")["stage"]["state"] in ("tracking", "settling")

    out = subprocess.run(
        [*cli(), "ctl", "status", "--endpoint", closed.control],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert "corrections" in out.stdout and "µm from start" in out.stdout

    # sd_notify through the running daemon, then STOPPING=1 on SIGTERM
    before = notify.notes()
    closed.proc.send_signal(signal.SIGTERM)
    assert closed.wait() == 0
    notify.wait_for("STOPPING=1")
    notes = notify.notes()
    ready = [i for i, n in enumerate(notes) if n.startswith("READY=1\n")]
    assert len(ready) == 1, notes  # once, with the first frame
    assert notes[ready[0]] == "READY=1\nSTATUS=receiving frames from simulated"
    measuring = [i for i, n in enumerate(notes) if n.startswith("STATUS=measuring")]
    assert measuring and min(measuring) > ready[0]
    assert notes.index("STOPPING=1") > max(measuring)
    assert all(
        n.startswith("STATUS=stopping")
        for n in notes[notes.index("STOPPING=1") + 1 :]
        if n.startswith("STATUS")
    )
    assert before.count("WATCHDOG=1") >= 5  # every 0.2 s while running
    assert any(n.startswith("STATUS=measuring: ") for n in before)
    assert "STOPPING=1" not in before
    assert opened.ctl("stop")["ok"] and opened.wait() == 0

    # the JSON-lines record holds the shifts and, between them, the corrections
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    recorded = {x["topic"] for x in lines}
    assert {"stagelock.shift", "stagelock.correction"} <= recorded
    assert sum(x["topic"] == "stagelock.correction" for x in lines) >= len(corrections)
    log = closed.log()
    assert "stage calibration measured at start-up" in log and "flip yes" in log
    assert "stopping: signal SIGTERM" in log


def test_quickstart_run_without_config_corrects_and_records_csv(
    runs: Any, tmp_path: Path
) -> None:
    """``stagelock run --frames N``: the README's first command, no hardware."""
    record = tmp_path / "shifts.csv"
    run = runs("quick", None, "--frames", "15", "--record", str(record))
    assert run.wait(timeout_s=60) == 0, run.log()
    log = run.log()
    measured = re.search(r"measured at start-up: pixel size ([0-9.]+) µm", log)
    assert measured is not None, log
    assert float(measured[1]) == pytest.approx(0.65, rel=0.01)  # the simulation's
    assert "stage feedback on: XYStage" in log
    assert "10 frames measured (frame" in log and "µm from start" in log
    assert "stopping: measured 15 frames" in log
    with record.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # CSV keeps only the shifts: corrections went to the publisher, not here
    assert len(rows) == 15 and all(r["status"] == "ok" for r in rows)
    frames = [int(r["frame"]) for r in rows]
    assert frames == sorted(frames) and all(abs(float(r["dx_px"])) < 2 for r in rows)


def test_calibration_file_errors_stop_startup(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[stage]\nfeedback = true\ncalibration_file = "{missing}"\n')
    out = subprocess.run(
        [*cli(), "run", "--config", str(cfg), "--frames", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "stage.calibration_file" in lines[0] and "stagelock calibrate" in lines[0]


@pytest.mark.skipif(
    importlib.util.find_spec("mm_test_adapters") is None,
    reason="mm-test-adapters (compiled Micro-Manager demo devices) not installed",
)
def test_micromanager_demo_configuration_delivers_shifts(runs: Any) -> None:
    """The compiled demo config of mm-test-adapters as a real MM config file."""
    config = """
[source]
kind = "micromanager"

[source.micromanager]
interval_ms = 50.0
properties = [["Camera", "Mode", "Fluorescent Beads"]]

[camera]
pixel_size_um = 1.0

[publish]
heartbeat_s = 0.2

[stage]
feedback = true
auto_calibrate = true
"""
    run = runs("demo", config)
    run.wait_up()
    run.collect_until_frame(8, min_shifts=5)
    shifts = run.topic("stagelock.shift")
    assert len(shifts) >= 5
    for msg in shifts:
        assert msg["status"] == "ok" and msg["source"] == "mmcore:Camera"
        assert msg["dx_um"] == pytest.approx(msg["dx_px"])
        assert magnitude(msg) < 1.0  # the demo sample does not drift
    assert run.ctl("stop")["ok"] and run.wait() == 0
    log = run.log()
    # DemoCamera moves the image against the stage, 1 px per µm: found, not assumed
    assert "stage calibration measured at start-up: pixel size 1.00" in log
    assert "flip no" in log
