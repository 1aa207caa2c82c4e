"""The Daemon in-process: a tiny frame source of known shifts, real sinks.

The source pushes frames rendered with exact sub-pixel shifts
(:func:`stagelock.sim.drifting_stack`) from its own thread, as a camera
would; a list sink records every message on the worker thread.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from helpers import walking_drift
from stagelock.config import validate_config
from stagelock.daemon import Daemon, SystemdNotifier, build_source, build_stage_loop
from stagelock.sources import Frame, FrameSource

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

SHAPE = (128, 128)


class PushSource:
    """Pushes prepared frames from its own thread.

    ``paced``: wait for each frame to be measured before pushing the next (a
    camera slower than the measurement); otherwise one frame every ``period_s``
    (a camera faster than the measurement).
    """

    frames_at_start = True

    def __init__(
        self,
        images: np.ndarray,
        *,
        paced: Callable[[int], bool] | None,
        period_s: float = 0.0,
    ) -> None:
        self.name = "push"
        self.images = images
        self.paced = paced
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pushed = 0

    def start(self, on_frame: Callable[[Frame], None]) -> None:
        def run() -> None:
            for i, image in enumerate(self.images):
                if self._stop.is_set():
                    return
                on_frame(Frame(image, i, time.time(), self.name, {}))
                self.pushed += 1
                if self.paced is not None and not self.paced(i):
                    return
                if self.period_s:
                    self._stop.wait(self.period_s)  # the camera's frame period

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


class ListSink:
    """Keeps every message; optionally slow (a sink that blocks the worker)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.closed = False

    def publish(self, topic: str, message: Mapping[str, Any]) -> None:
        if self.delay_s and topic == "stagelock.shift":
            time.sleep(self.delay_s)  # the slowness under test, not a wait
        with self.cond:
            self.messages.append((topic, dict(message)))
            self.cond.notify_all()

    def close(self) -> None:
        self.closed = True

    def shifts(self) -> list[dict[str, Any]]:
        with self.cond:
            return [m for t, m in self.messages if t == "stagelock.shift"]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"timed out after {timeout_s} s; got {self.messages}")
                self.cond.wait(remaining)

    def n_shifts(self) -> int:
        return sum(t == "stagelock.shift" for t, _ in self.messages)


@pytest.fixture
def run_daemon() -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(frames: FrameSource, sink: ListSink, **config: Any) -> Daemon:
        doc = {
            "registration": {"max_shift_px": 20, "n_regions": 9},
            "log": {"every_n_frames": 0},
            **config,
        }
        daemon = Daemon(
            validate_config(doc),
            frames,
            sinks=[sink],
            notifier=SystemdNotifier({}),
            control=False,
        )
        made.append(daemon)
        daemon.start()
        return daemon

    yield make
    for daemon in made:
        daemon.shutdown()


def test_every_shift_within_005_px(run_daemon: Callable[..., Daemon]) -> None:
    n = 25
    shifts, frames = walking_drift(n, seed=11, shape=SHAPE, step_px=0.7)
    sink = ListSink()

    def paced(i: int) -> bool:  # next frame once this one was measured
        sink.wait_for(lambda: sink.n_shifts() > i)
        return True

    daemon = run_daemon(PushSource(frames, paced=paced), sink)
    sink.wait_for(lambda: sink.n_shifts() == n)
    got = sink.shifts()
    assert [m["frame"] for m in got] == list(range(n))
    for msg, (dx, dy) in zip(got, shifts, strict=True):
        assert msg["status"] == "ok" and msg["skipped"] == 0
        assert abs(msg["dx_px"] - dx) < 0.05, (msg, dx)
        assert abs(msg["dy_px"] - dy) < 0.05, (msg, dy)
    st = daemon.status()
    assert (st.frames_received, st.frames_measured, st.frames_skipped) == (n, n, 0)
    assert st.reference_frame == 0 and st.state == "measuring"
    assert st.corrections == 0 and st.stage is None  # no stage loop here


def test_burst_into_a_slow_sink_counts_skipped(
    run_daemon: Callable[..., Daemon],
) -> None:
    n = 40
    shifts, frames = walking_drift(n, seed=12, shape=SHAPE, step_px=0.7)
    sink = ListSink(delay_s=0.03)  # ~30 frames/s at most; the camera gives 200
    source = PushSource(frames, paced=None, period_s=0.005)
    daemon = run_daemon(source, sink)

    def settled() -> bool:
        st = daemon.status()
        done = st.last_frame == n - 1 and st.frames_measured + st.frames_skipped == n
        # counted before it is sent: wait for the sink to have the last one too
        return done and any(m["frame"] == n - 1 for m in sink.shifts())

    deadline = time.monotonic() + 15.0
    while not settled():
        assert time.monotonic() < deadline, daemon.status()
        time.sleep(0.01)
    st = daemon.status()
    got = sink.shifts()
    assert st.frames_received == n
    assert st.frames_skipped > n // 2, "a fast camera into a slow sink skips frames"
    # the reference and the newest frame at least: on a slow host the worker
    # may take the reference after the burst is half over
    assert st.frames_measured >= 2
    assert len(got) == st.frames_measured
    # the reference is the first frame measured; every gap is exactly `skipped`
    ref = got[0]["frame"]
    assert ref == got[0]["skipped"]
    assert sum(m["skipped"] for m in got) == st.frames_skipped
    for prev, msg in itertools.pairwise(got):
        assert msg["frame"] - prev["frame"] - 1 == msg["skipped"]
    assert got[-1]["frame"] == n - 1  # latest wins: the newest frame is measured
    for msg in got:
        i = msg["frame"]
        assert abs(msg["dx_px"] - (shifts[i, 0] - shifts[ref, 0])) < 0.05, msg
        assert abs(msg["dy_px"] - (shifts[i, 1] - shifts[ref, 1])) < 0.05, msg


def test_mean_reference(run_daemon: Callable[..., Daemon]) -> None:
    n, n_mean = 16, 5
    # still during the first n_mean frames: their mean is the unshifted sample
    shifts, frames = walking_drift(n, seed=13, still=n_mean, shape=SHAPE, step_px=0.7)
    sink = ListSink()
    holder: list[Daemon] = []

    def paced(i: int) -> bool:
        # the reference frames produce no message: wait until the worker took
        # the frame out of the latest-wins slot instead (so none is skipped)
        deadline = time.monotonic() + 10.0
        while not holder or holder[0]._slot._has_item:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    daemon = run_daemon(
        PushSource(frames, paced=paced),
        sink,
        registration={"reference": "mean", "n_mean": n_mean, "max_shift_px": 20},
    )
    holder.append(daemon)
    sink.wait_for(lambda: sink.n_shifts() == n)
    got = sink.shifts()
    assert [m["frame"] for m in got] == list(range(n))
    for msg, (dx, dy) in zip(got, shifts, strict=True):
        assert msg["status"] == "ok"
        assert abs(msg["dx_px"] - dx) < 0.05, (msg, dx)
        assert abs(msg["dy_px"] - dy) < 0.05, (msg, dy)
    # averaging removes noise: the still frames scatter far less than 0.05 px
    still = np.array([(m["dx_px"], m["dy_px"]) for m in got[:n_mean]])
    assert np.abs(still).max() < 0.02
    st = daemon.status()
    assert st.reference_frame == n_mean - 1 and st.references_taken == 1


def test_stage_alarm_holds_across_rereference_until_reset_origin() -> None:
    """A real simulated core and StageLoop: the travel limit raises an alarm."""
    config = validate_config(
        {
            "simulation": {
                "shape_px": [160, 160],
                "pixel_size_um": 0.5,
                "exposure_ms": 5.0,
                "frame_interval_ms": 20.0,
                "peak_photons": 2000.0,
                "creep_um_per_s": [0.8, 0.0],
                "random_walk_um_per_sqrt_s": 0.0,
                "stage_speed_um_per_s": 1000.0,
                "stage_settle_ms": 5.0,
            },
            "stage": {"feedback": True, "travel_limit_um": 0.6},
            "log": {"every_n_frames": 0},
        }
    )
    source, cleanup = build_source(config)
    sink = ListSink()
    try:
        loop = build_stage_loop(config, source.core)  # type: ignore[attr-defined]
    except BaseException:
        for fn in cleanup:
            fn()
        raise
    daemon = Daemon(
        config,
        source,
        sinks=[sink],
        notifier=SystemdNotifier({}),
        control=False,
        cleanup=cleanup,
        stage_loop=loop,
    )

    def alarms(active: bool) -> list[dict[str, Any]]:
        return [
            m
            for t, m in sink.messages
            if t == "stagelock.alarm"
            and m["alarm"] == "stage_travel_limit"
            and m["active"] is active
        ]

    try:
        daemon.start()
        # 1.6 px/s of creep: the 0.6 µm travel limit is reached in under a second
        sink.wait_for(lambda: len(alarms(True)) == 1, timeout_s=15.0)
        st = daemon.status()
        assert st.stage is not None and st.stage["alarm"] == "travel_limit"
        assert "stage_travel_limit" in (st.alarm or "")
        clipped = [
            m
            for t, m in sink.messages
            if t == "stagelock.correction" and m["status"] == "clipped"
        ]
        assert clipped and clipped[0]["alarm"] == "travel_limit"
        assert st.stage["max_travel_um"] == pytest.approx(0.6, abs=1e-6)
        # one correction at least: a slow host has longer frame gaps, so it moves
        # in fewer, larger steps before it reaches the limit
        assert st.corrections == st.stage["corrections"] >= 1
        # a new reference keeps the travel limit where it was: still clipped
        daemon.rereference()
        sink.wait_for(lambda: daemon.status().references_taken == 2, timeout_s=15.0)
        n = sink.n_shifts()
        sink.wait_for(lambda: sink.n_shifts() >= n + 20, timeout_s=15.0)
        st = daemon.status()
        assert st.stage is not None and st.stage["alarm"] == "travel_limit"
        assert st.stage["max_travel_um"] <= 0.6 + 1e-6
        assert not alarms(False)
        # resetting the origin (ctl reset-origin) lets the loop move again
        daemon.reset_origin()
        sink.wait_for(lambda: len(alarms(False)) == 1, timeout_s=15.0)
    finally:
        daemon.shutdown()


class ManualSource:
    """Frames pushed by the test itself, one call at a time."""

    frames_at_start = True

    def __init__(self) -> None:
        self.name = "manual"
        self.on_frame: Callable[[Frame], None] | None = None
        self.index = 0

    def start(self, on_frame: Callable[[Frame], None]) -> None:
        self.on_frame = on_frame

    def stop(self) -> None:
        self.on_frame = None

    def push(self, image: np.ndarray) -> int:
        assert self.on_frame is not None
        i, self.index = self.index, self.index + 1
        self.on_frame(Frame(image, i, time.time(), self.name, {}))
        return i


def test_bad_frames_and_a_stalled_source_raise_and_clear_alarms(
    run_daemon: Callable[..., Daemon],
) -> None:
    shifts, frames = walking_drift(4, seed=14, shape=SHAPE, step_px=0.7)
    blank = np.full(SHAPE, 100, dtype=np.uint16)
    source = ManualSource()
    sink = ListSink()
    daemon = run_daemon(
        source,
        sink,
        registration={"max_shift_px": 20, "alarm_after_bad_frames": 3},
        source={"stall_timeout_s": 0.5},
        publish={"heartbeat_s": 0.05},
    )

    def alarm(name: str, active: bool, since: int = 0) -> Callable[[], bool]:
        return lambda: any(
            t == "stagelock.alarm" and m["alarm"] == name and m["active"] is active
            for t, m in sink.messages[since:]
        )

    def push_measured(image: np.ndarray) -> dict[str, Any]:
        i = source.push(image)
        sink.wait_for(lambda: any(m["frame"] == i for m in sink.shifts()))
        return next(m for m in sink.shifts() if m["frame"] == i)

    assert push_measured(frames[0])["status"] == "ok"
    for _ in range(3):  # blank frames: measured, flagged, never a number
        msg = push_measured(blank)
        assert msg["status"] == "blank" and msg["dx_px"] is None
    sink.wait_for(alarm("measurement_failing", True))
    assert "measurement_failing" in (daemon.status().alarm or "")
    # only the source_lost alarms from here on count: a loaded host may already
    # have taken longer than stall_timeout_s over one of the frames above
    mark = len(sink.messages)
    msg = push_measured(frames[1])
    assert abs(msg["dx_px"] - shifts[1, 0]) < 0.05
    sink.wait_for(alarm("measurement_failing", False))

    # no frame for stall_timeout_s: source lost (state and alarm), then back
    sink.wait_for(alarm("source_lost", True, mark), timeout_s=5.0)
    assert daemon.status().state == "source_lost"
    lost = len(sink.messages)
    push_measured(frames[2])
    sink.wait_for(alarm("source_lost", False, lost), timeout_s=5.0)
    cleared = len(sink.messages)

    def measuring_again() -> bool:  # a heartbeat after the alarm cleared
        return any(
            t == "stagelock.status" and m["state"] == "measuring" and m["alarm"] is None
            for t, m in sink.messages[cleared:]
        )

    sink.wait_for(measuring_again, timeout_s=5.0)
    heartbeats = [m for t, m in sink.messages if t == "stagelock.status"]
    assert "source_lost" in {h["state"] for h in heartbeats}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_record_on_a_full_disk_alarms_then_records_again(tmp_path: Path) -> None:
    from stagelock.sinks import Recorder

    n = 10
    _, frames = walking_drift(n, seed=12, shape=SHAPE)
    record, real = tmp_path / "r.jsonl", tmp_path / "real.jsonl"
    record.symlink_to("/dev/full")  # every write: ENOSPC, like a full disk
    sink = ListSink()

    def paced(i: int) -> bool:
        sink.wait_for(lambda: sink.n_shifts() > i)
        if i == 4:  # the disk has room again
            record.unlink()
            record.symlink_to(real)
        return True

    daemon = Daemon(
        validate_config({"log": {"every_n_frames": 0}}),
        PushSource(frames, paced=paced),
        sinks=[Recorder(record, retry_s=0.0), sink],
        notifier=SystemdNotifier({}),
        control=False,
    )
    daemon.start()
    try:
        sink.wait_for(lambda: sink.n_shifts() == n)
    finally:
        daemon.shutdown()
    alarms = [
        (m["alarm"], m["active"]) for t, m in sink.messages if t.endswith("alarm")
    ]
    assert alarms == [("record_failed", True), ("record_failed", False)]
    frames_recorded = [
        json.loads(line)["frame"] for line in real.read_text().splitlines()
    ]
    assert frames_recorded == list(range(5, n))
    assert daemon.exit_code == 1  # lines were lost: the run says so
