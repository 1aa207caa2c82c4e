"""Multi-position folders: one reference per position, measured on the lock channel."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from stagelock.config import validate_config
from stagelock.daemon import Daemon, SystemdNotifier
from stagelock.sim import CameraNoise, fourier_shift, sample_image
from stagelock.sources import FolderSource, MMCoreSource, file_position


class ListSink:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def publish(self, topic: str, message: Any) -> None:
        with self.cond:
            self.messages.append((topic, dict(message)))
            self.cond.notify_all()

    def close(self) -> None:
        pass

    def of(self, topic: str) -> list[dict[str, Any]]:
        with self.cond:
            return [m for t, m in self.messages if t == topic]

    def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"timed out; got {len(self.messages)} messages")
                self.cond.wait(remaining)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        (
            "img_channel001_position002_time000000003_z004.tif",
            None,
            {"position": 2, "channel": 1, "z": 4},
        ),
        ("img_channel000_time000000003.tif", None, {"channel": 0}),
        ("frame_0042.tif", None, {}),
        ("scan_s07_c1_t0003.tif", r"s(?P<position>\d+)_c(?P<channel>\d+)", None),
    ],
)
def test_file_position(name, pattern, expected):
    got = file_position(name, pattern)
    if expected is None:
        expected = {"position": 7, "channel": 1}
    assert got == expected


def test_bad_position_pattern_is_refused(tmp_path):
    with pytest.raises(ValueError, match="named group"):
        FolderSource(tmp_path, position_pattern=r"s(\d+)")


def test_three_positions_each_measured_against_its_own_reference(tmp_path: Path):
    world = sample_image((512, 512))
    # three distinct fields of view, each drifting its own way
    crops = [world[0:128, 0:128], world[200:328, 300:428], world[380:508, 60:188]]
    velocity = [(0.6, -0.35), (-0.45, 0.2), (0.3, 0.55)]  # px per time point
    n_t = 8
    noise, rng = CameraNoise(peak_photons=2000), np.random.default_rng(3)
    sink = ListSink()
    config = validate_config(
        {
            "source": {"kind": "folder", "folder": {"path": str(tmp_path)}},
            "registration": {"max_shift_px": 20, "n_regions": 9},
            "log": {"every_n_frames": 0},
        }
    )
    source = FolderSource(tmp_path, poll_interval_s=0.02)
    daemon = Daemon(
        config, source, sinks=[sink], notifier=SystemdNotifier({}), control=False
    )
    daemon.start()
    try:
        for t in range(n_t):
            for p, crop in enumerate(crops):
                dx, dy = velocity[p][0] * t, velocity[p][1] * t
                for c in range(2):  # channel 1 is not measured
                    image = noise.expose(fourier_shift(crop, dx, dy), rng)
                    name = f"img_channel{c:03d}_position{p:03d}_time{t:09d}_z000.tif"
                    # written aside and renamed: the file appears complete
                    tifffile.imwrite(tmp_path / (name + ".part"), image)
                    (tmp_path / (name + ".part")).rename(tmp_path / name)
            # like a camera slower than the measurement: the next time point
            # is written once this one's frames were measured
            sink.wait_for(lambda t=t: len(sink.of("stagelock.shift")) >= 3 * (t + 1))
    finally:
        daemon.shutdown()
    shifts = sink.of("stagelock.shift")
    assert len(shifts) == 3 * n_t
    assert {m["schema"] for m in shifts} == {"stagelock.shift/2"}
    assert {m["channel"] for m in shifts} == {"0"}
    for p in range(3):
        mine = [m for m in shifts if m["position"] == p]
        assert len(mine) == n_t
        for t, m in enumerate(mine):
            truth = (velocity[p][0] * t, velocity[p][1] * t)
            assert m["dx_px"] == pytest.approx(truth[0], abs=0.1), (p, t)
            assert m["dy_px"] == pytest.approx(truth[1], abs=0.1), (p, t)
            assert m["status"] == "ok"


def test_observe_mode_without_frames_raises_no_frames(caplog):
    from stagelock.sim import create_simulated_core
    from stagelock.sources import release_core

    core = create_simulated_core({"shape_px": [64, 64]})
    sink = ListSink()
    config = validate_config(
        {
            "source": {
                "kind": "micromanager",
                "stall_timeout_s": 0.3,
                "micromanager": {"observe": True},
            },
            "log": {"every_n_frames": 0},
        }
    )
    daemon = Daemon(
        config,
        MMCoreSource(core, observe=True),
        sinks=[sink],
        notifier=SystemdNotifier({}),
        control=False,
    )
    daemon.start()
    try:
        sink.wait_for(
            lambda: any(m["alarm"] == "no_frames" for m in sink.of("stagelock.alarm"))
        )
    finally:
        daemon.shutdown()
        release_core(core)
    alarm = next(m for m in sink.of("stagelock.alarm") if m["alarm"] == "no_frames")
    assert alarm["active"] is True
    assert "one process" in alarm["message"]
    assert "stagelock.attach" in alarm["message"]
    assert any("stagelock.attach" in r.getMessage() for r in caplog.records)
