from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import useq

# tests/ may or may not be a package (another suite adds tests/__init__.py)
from helpers import FrameCollector, scope_factory, snap, wait_until
from stagelock import Registrar, attach
from stagelock.sources import (
    FrameSource,
    MMCoreSource,
    SourceState,
    release_core,
)


@pytest.fixture
def make_scope():
    yield from scope_factory()


@pytest.fixture
def collect():
    return FrameCollector()


def test_own_continuous_sequence_delivers_frames_and_shifts(make_scope, collect):
    scope = make_scope()
    core = scope.core
    source = MMCoreSource(core)
    assert isinstance(source, FrameSource)
    assert source.name == "mmcore:Camera"
    source.start(collect)
    try:
        wait_until(lambda: len(collect) >= 3, 5.0, "3 frames")
        assert source.state is SourceState.RUNNING
        core.setXYPosition(5.0, -2.5)  # -> (-10, +5) px
        core.waitForDevice("XYStage")
        n = len(collect)
        wait_until(lambda: len(collect) >= n + 3, 5.0, "frames after the move")
    finally:
        source.stop()
    assert source.state is SourceState.STOPPED
    assert not core.isSequenceRunning()
    frames = collect.snapshot()
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.source == "mmcore:Camera" for f in frames)
    assert all(b.time_s >= a.time_s for a, b in itertools.pairwise(frames))
    assert frames[0].image.shape == (256, 256) and frames[0].image.dtype == np.uint16
    registrar = Registrar(frames[0].image, max_shift_px=20)
    est = registrar.measure(frames[-1].image)
    np.testing.assert_allclose((est.dx_px, est.dy_px), (-10.0, 5.0), atol=0.05)
    count = len(collect)
    source.stop()  # idempotent
    assert len(collect) == count


def test_own_snap_loop_at_an_interval(make_scope, collect):
    scope = make_scope()
    source = MMCoreSource(scope.core, interval_ms=40.0)
    source.start(collect)
    try:
        wait_until(lambda: len(collect) >= 4, 5.0, "4 frames")
    finally:
        source.stop()
    times = np.array([f.time_s for f in collect.snapshot()])
    # frames are paced by the interval (40 ms), not by the 5 ms exposure; single
    # gaps jitter with the scheduler, their mean cannot beat the clock
    assert np.mean(np.diff(times)) > 0.8 * 0.040


def test_own_mda_sequence(make_scope, collect):
    scope = make_scope()
    sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 5})
    source = MMCoreSource(scope.core, mda_sequence=sequence)
    source.start(collect)
    try:
        assert source.wait_done(timeout_s=10.0)
        wait_until(lambda: len(collect) >= 5, 5.0, "5 MDA frames")
    finally:
        source.stop()
    frames = collect.snapshot()
    assert len(frames) == 5
    assert [f.metadata["mda_index"]["t"] for f in frames] == [0, 1, 2, 3, 4]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]


def test_observe_sequence_does_not_consume_frames(make_scope, collect):
    scope = make_scope({"exposure_ms": 10.0})
    core = scope.core
    source = MMCoreSource(core, observe=True)
    source.start(collect)
    try:
        # someone else's finite sequence; they will pop the frames later
        core.startSequenceAcquisition(20, 0, True)
        wait_until(lambda: not core.isSequenceRunning(), 10.0, "the sequence")
        n_seen = len(collect)
        # nothing was taken from the owner's buffer
        assert core.getRemainingImageCount() == 20
    finally:
        source.stop()
    frames = collect.snapshot()
    assert 5 <= n_seen <= 20
    numbers = [int(f.metadata["ImageNumber"]) for f in frames]
    assert numbers == sorted(set(numbers))  # no duplicates, in order
    popped = [core.popNextImage() for _ in range(20)]
    assert len(popped) == 20


def test_observe_mda_run_by_someone_else(make_scope, collect):
    scope = make_scope()
    core = scope.core
    source = MMCoreSource(core, observe=True)
    source.start(collect)
    try:
        sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 6})
        core.run_mda(sequence).join(timeout=10.0)
        wait_until(lambda: len(collect) >= 6, 5.0, "6 frames")
    finally:
        source.stop()
    frames = collect.snapshot()
    assert len(frames) == 6  # each frame exactly once (no buffer polling twice)
    assert [f.metadata["mda_index"]["t"] for f in frames] == list(range(6))


def test_lost_camera_is_reported_and_recovered(make_scope, collect):
    scope = make_scope()
    source = MMCoreSource(scope.core, interval_ms=10.0, retry_s=0.05)
    source.start(collect)
    try:
        wait_until(lambda: len(collect) >= 2, 5.0, "frames")
        scope.camera_fault = "USB cable pulled"
        wait_until(lambda: source.lost, 5.0, "LOST")
        n = len(collect)
        scope.camera_fault = None
        wait_until(lambda: source.state is SourceState.RUNNING, 5.0, "recovery")
        wait_until(lambda: len(collect) > n, 5.0, "frames after recovery")
    finally:
        source.stop()
    assert source.reconnects == 1


def test_bad_arguments(make_scope):
    scope = make_scope()
    with pytest.raises(ValueError, match="interval_ms"):
        MMCoreSource(scope.core, interval_ms=-1)
    with pytest.raises(ValueError, match="cannot be observed"):
        MMCoreSource(scope.core, observe=True, mda_sequence=useq.MDASequence())
    source = MMCoreSource(scope.core, interval_ms=50.0)
    source.start(lambda frame: None)
    try:
        with pytest.raises(RuntimeError, match="start once"):
            source.start(lambda frame: None)
    finally:
        source.stop()


# -- the compiled Micro-Manager demo devices ------------------------------------------


@pytest.fixture
def demo_core():
    if importlib.util.find_spec("mm_test_adapters") is None:
        pytest.skip("mm-test-adapters is not installed")
    from pymmcore_plus import CMMCorePlus

    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration()
    except Exception as error:  # adapters present but unusable here
        release_core(core)
        pytest.skip(f"demo configuration does not load: {error}")
    try:
        yield core
    finally:
        release_core(core)
        del core


def test_demo_config_frames_follow_the_stage(demo_core, collect):
    core = demo_core
    core.setProperty("Camera", "Mode", "Fluorescent Beads")
    core.setExposure(10.0)
    source = MMCoreSource(core)
    source.start(collect)
    try:
        wait_until(lambda: len(collect) >= 2, 10.0, "demo frames")
        registrar = Registrar(collect.snapshot()[0].image, max_shift_px=30)
        core.setRelativeXYPosition(12.0, 6.0)
        core.waitForDevice(core.getXYStageDevice())
        # frames drawn before the move may still be queued on a loaded machine:
        # the newest frame must show the move soon, and then keep showing it
        moved: list[tuple[float, float]] = []

        def newest_shows_the_move() -> bool:
            est = registrar.measure(collect.snapshot()[-1].image)
            moved.append((est.dx_px, est.dy_px))
            # the demo camera moves its beads 1 px per µm, against the stage
            return bool(np.allclose(moved[-1], (-12.0, -6.0), atol=0.2))

        wait_until(newest_shows_the_move, 10.0, "a frame showing the move")
        n = len(collect)
        wait_until(lambda: len(collect) >= n + 2, 10.0, "frames after the move")
    finally:
        source.stop()
    frames = collect.snapshot()
    assert frames[0].image.shape == (512, 512)
    assert [f.index for f in frames] == list(range(len(frames)))
    est = registrar.measure(frames[-1].image)
    np.testing.assert_allclose((est.dx_px, est.dy_px), (-12.0, -6.0), atol=0.2)


def test_demo_config_observed_sequence_is_not_consumed(demo_core, collect):
    core = demo_core
    core.setExposure(5.0)
    source = MMCoreSource(core, observe=True)
    source.start(collect)
    try:
        core.startSequenceAcquisition(10, 0, True)
        wait_until(lambda: not core.isSequenceRunning(), 10.0, "the demo sequence")
        wait_until(lambda: len(collect) >= 5, 5.0, "observed demo frames")
        assert core.getRemainingImageCount() == 10
    finally:
        source.stop()
    numbers = [int(f.metadata["ImageNumber"]) for f in collect.snapshot()]
    assert numbers == sorted(set(numbers))


def test_attach_on_the_demo_core_measures_snaps(demo_core):
    core = demo_core
    core.setProperty("Camera", "Mode", "Fluorescent Beads")
    with attach(core, max_shift_px=30) as handle:
        core.snapImage()
        core.setRelativeXYPosition(-7.0, 9.0)
        core.waitForDevice(core.getXYStageDevice())
        core.snapImage()
        assert handle.wait_for(2, timeout_s=10.0)
        latest = handle.latest
    assert latest is not None and latest.frame_index == 1
    np.testing.assert_allclose((latest.dx_px, latest.dy_px), (7.0, -9.0), atol=0.2)


# -- attach ---------------------------------------------------------------------


def test_attach_measures_mda_frames_against_commanded_moves(make_scope):
    scope = make_scope()
    core = scope.core
    positions = [(0.0, 0.0), (20.0, 10.0), (-10.0, 5.0), (5.0, -15.0)]
    calls: list[tuple[int, float, float]] = []

    def on_shift(index, estimate):
        calls.append((index, estimate.dx_px, estimate.dy_px))

    handle = attach(core, {"max_shift_px": 60}, on_shift=on_shift)
    with handle:
        for k, (x, y) in enumerate(positions):
            # one MDA frame per position; each frame waits for the worker so none
            # is skipped (attach itself never waits)
            sequence = useq.MDASequence(stage_positions=[(x, y)])
            core.mda.run(sequence)
            assert handle.wait_for(k + 1, timeout_s=10.0)
        estimates = handle.estimates
    assert handle.detached
    assert handle.skipped == 0
    assert [e.frame_index for e in estimates] == [0, 1, 2, 3]
    for (x, y), shift in zip(positions, estimates, strict=True):
        expected = scope.image_shift_px((-x, -y))  # stage +x moves the sample -x
        np.testing.assert_allclose((shift.dx_px, shift.dy_px), expected, atol=0.05)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert handle.latest is not None and handle.latest.frame_index == 3
    assert scope.last_true_shift_px == pytest.approx(scope.image_shift_px((-5, 15)))
    # detached: later frames are ignored
    core.snapImage()
    core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 2}))
    assert handle.received == 4 and len(calls) == 4


def test_attach_one_mda_with_positions_and_snaps(make_scope):
    scope = make_scope({"rotation_deg": 30.0, "flip_y": True})
    core = scope.core
    handle = attach(core, max_shift_px=40)
    try:
        sequence = useq.MDASequence(stage_positions=[(0.0, 0.0), (8.0, -6.0)])
        core.mda.run(sequence)
        assert handle.wait_for(1, timeout_s=10.0)
        wait_until(lambda: handle.received == 2, 5.0, "2 MDA frames")
        # snapped images outside an MDA are measured too
        frame_count = handle.received
        core.setXYPosition(3.0, 4.0)
        snap(scope)
        wait_until(lambda: handle.received == frame_count + 1, 5.0, "the snap")
        wait_until(
            lambda: handle.latest is not None and handle.latest.frame_index == 2,
            10.0,
            "the snap's measurement",
        )
        latest = handle.latest
    finally:
        handle.detach()
    expected = scope.image_shift_px((-3.0, -4.0))
    np.testing.assert_allclose((latest.dx_px, latest.dy_px), expected, atol=0.05)
    assert latest.mda_index == {}


def test_attach_rejects_unknown_options(make_scope):
    scope = make_scope()
    with pytest.raises(TypeError, match="'max_shift'"):
        attach(scope.core, max_shift=3)
