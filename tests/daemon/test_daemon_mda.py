"""``stagelock run`` wiring for an MDA: per-position shifts, the locking engine."""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stagelock.config import validate_config
from stagelock.daemon import Daemon, SystemdNotifier, build_mda_lock, build_source
from stagelock.stage import Calibration


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


def _mda_run_config(
    tmp_path: Path, sequence: dict[str, Any], stage: dict[str, Any] | None = None
) -> Any:
    """A ``stagelock run`` config that runs ``sequence`` on the demo camera's beads."""
    mda = tmp_path / "mda.json"
    mda.write_text(json.dumps(sequence))
    raw: dict[str, Any] = {
        "source": {
            "kind": "micromanager",
            "micromanager": {
                "mda_file": str(mda),
                "properties": [["Camera", "Mode", "Fluorescent Beads"]],
            },
        },
        "registration": {"max_shift_px": 30},
        "log": {"every_n_frames": 0},
    }
    if stage is not None:
        raw["stage"] = stage
    return validate_config(raw)


@pytest.mark.parametrize("feedback", [False, True], ids=["measure", "feedback"])
def test_demo_mda_file_gives_every_position_its_own_reference(
    tmp_path: Path, feedback: bool
) -> None:
    pytest.importorskip("mm_test_adapters")
    cal = Calibration.from_geometry(1.0).to_file(tmp_path / "cal.toml")
    config = _mda_run_config(
        tmp_path,
        {
            "stage_positions": [
                {"x": 0.0, "y": 0.0, "name": "A"},
                {"x": 20.0, "y": 0.0, "name": "B"},
                {"x": 0.0, "y": 20.0, "name": "C"},
            ],
            "time_plan": {"interval": 1.0, "loops": 3},
        },
        stage={"feedback": feedback, "calibration_file": str(cal)},
    )
    source, cleanup = build_source(config)
    core = source.core
    original = core.mda.engine
    locks = build_mda_lock(config, core) if feedback else None
    if feedback:
        assert core.mda.engine is not original
    sink = ListSink()
    daemon = Daemon(
        config,
        source,
        sinks=[sink],
        notifier=SystemdNotifier({}),
        control=False,
        cleanup=cleanup,
        position_locks=locks,
    )
    daemon.start()
    try:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            done = len(sink.of("stagelock.shift")) + daemon.status().frames_skipped
            if done >= 9:
                break
            time.sleep(0.05)
        skipped = daemon.status().frames_skipped
    finally:
        daemon.shutdown()
        del core, source
        gc.collect()
    shifts = sink.of("stagelock.shift")
    # a position's frame still waiting when its next one arrives is replaced
    # (latest wins per position), never another position's
    assert len(shifts) + skipped == 9
    assert {m["schema"] for m in shifts} == {"stagelock.shift/2"}
    assert sorted({(m["position"], m["position_name"]) for m in shifts}) == [
        (0, "A"),
        (1, "B"),
        (2, "C"),
    ]
    for p in range(3):
        assert sum(m["position"] == p for m in shifts) >= 2  # reference + one more
    for m in shifts:
        assert m["status"] == "ok"
        assert abs(m["dx_px"]) < 0.2 and abs(m["dy_px"]) < 0.2, m


def test_run_ends_by_itself_when_its_own_mda_finishes(tmp_path: Path) -> None:
    pytest.importorskip("mm_test_adapters")
    config = _mda_run_config(
        tmp_path,
        {
            "stage_positions": [{"x": 0.0, "y": 0.0}, {"x": 20.0, "y": 0.0}],
            "time_plan": {"interval": 0.2, "loops": 3},
        },
    )
    source, cleanup = build_source(config)
    sink = ListSink()
    daemon = Daemon(
        config,
        source,
        sinks=[sink],
        notifier=SystemdNotifier({}),
        control=False,
        cleanup=cleanup,
    )
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(daemon.run()))
    runner.start()
    runner.join(timeout=30.0)
    ended_by_itself = not runner.is_alive()
    if not ended_by_itself:  # still waiting for frames that will never come
        daemon.request_stop("test timeout")
        runner.join(timeout=10.0)
    del source
    gc.collect()
    assert ended_by_itself
    assert codes == [0]
    shifts = sink.of("stagelock.shift")
    assert len(shifts) + daemon.status().frames_skipped == 6
