"""The state directory: a SIGKILLed daemon's successor resumes the same reference."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile

from helpers import DaemonProcess, cli
from stagelock.daemon._state import DEFAULT_POSITION, StateDir, StateError
from stagelock.sim import drifting_stack

if TYPE_CHECKING:
    import zmq

SHAPE = (192, 192)
# frame 0 is not at zero: shifts must come out relative to frame 0, not to 0
TRUTH = np.column_stack(
    [0.6 + 0.23 * np.arange(24), -0.4 + 0.17 * np.arange(24) * np.sin(np.arange(24))]
)


def shift_rows(record: Path) -> list[dict[str, Any]]:
    """Every shift row of a JSON-lines record; every line must parse (none torn)."""
    if not record.exists():
        return []
    text = record.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = [json.loads(line) for line in lines]  # a torn line fails here
    assert not text or text.endswith("\n")
    return [r for r in rows if r["topic"] == "stagelock.shift"]


def write_tiff(path: Path, image: np.ndarray) -> None:
    """Write a TIFF under a name the watcher ignores, then rename it into place.

    (The folder source can catch a file between tifffile's header and its
    pixels under heavy load and skip it as unusable.)
    """
    tmp = path.with_name(f"{path.stem}.partial")  # outside the *.tif* pattern
    tifffile.imwrite(tmp, image)
    os.replace(tmp, path)


def feed(frames: np.ndarray, first: int, watch: Path, record: Path) -> None:
    """Write frames one by one, each once the previous one is in the record."""
    for k, image in enumerate(frames):
        n = len(shift_rows(record))
        write_tiff(watch / f"frame_{first + k:04d}.tif", image)
        deadline = time.monotonic() + 60
        while len(shift_rows(record)) <= n:
            assert time.monotonic() < deadline, f"frame {first + k} never measured"
            time.sleep(0.05)


def test_sigkill_then_resume_keeps_the_reference(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    movie = drifting_stack(TRUTH, shape=SHAPE, seed=3)
    watch, state, record = tmp_path / "watch", tmp_path / "state", tmp_path / "r.jsonl"
    watch.mkdir()
    args = ("--watch", str(watch), "--state-dir", str(state), "--record", str(record))

    first = DaemonProcess(tmp_path, ctx, "first", None, *args)
    try:
        first.wait_up()
        feed(movie[:12], 0, watch, record)
        first.proc.kill()  # SIGKILL: no shutdown path at all
        first.proc.wait(10)
    finally:
        first.close()
    assert (state / "state.json").exists()

    second = DaemonProcess(tmp_path, ctx, "second", None, *args)
    try:
        second.wait_up()
        feed(movie[12:], 12, watch, record)
        status = second.ctl("status")
        assert second.ctl("stop")["ok"]
        assert second.wait() == 0
    finally:
        second.close()
    assert "resumed from" in second.log()
    # the resumed daemon took no new reference: frame 0's is still in use
    assert status["references_taken"] == 0
    assert status["reference_frame"] == 0

    rows = shift_rows(record)
    assert len(rows) == 24
    # numbering goes on across the restart: one row per frame number
    assert [r["frame"] for r in rows] == list(range(24))
    got = np.array([[r["dx_px"], r["dy_px"]] for r in rows])
    want = TRUTH - TRUTH[0]
    np.testing.assert_allclose(got, want, atol=0.1)
    assert np.max(np.abs(got[12:] - want[12:])) < 0.1


def run_refused(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), "run", "--control", "tcp://127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


def saved_state(path: Path, source: str, shape: tuple[int, int]) -> None:
    """A state directory as a daemon on ``source`` would have left it."""
    image = drifting_stack(TRUTH[:1], shape=shape, seed=1)[0]
    state = StateDir(path, source_name=source, source_kind="folder")
    try:
        state.save_reference(
            DEFAULT_POSITION, image, registrar={"max_shift_px": 20.0}, frame=0, what="x"
        )
    finally:
        state.close()


def test_state_of_another_source_is_refused(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    saved_state(tmp_path / "state", str(tmp_path / "elsewhere"), SHAPE)
    done = run_refused("--watch", str(watch), "--state-dir", str(tmp_path / "state"))
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1, done.stderr
    assert "--fresh" in err[0] and "elsewhere" in err[0]
    assert "Traceback" not in done.stderr


def test_state_of_another_frame_size_is_refused_and_fresh_starts_over(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    watch, state = tmp_path / "watch", tmp_path / "state"
    watch.mkdir()
    saved_state(state, str(watch), (64, 80))
    record = tmp_path / "r.jsonl"
    args = ("--watch", str(watch), "--state-dir", str(state), "--record", str(record))
    movie = drifting_stack(TRUTH[:3], shape=SHAPE, seed=5)

    refused = DaemonProcess(tmp_path, ctx, "refused", None, *args)
    try:
        refused.wait_up()
        write_tiff(watch / "frame_0000.tif", movie[0])
        assert refused.wait(60) == 2
    finally:
        refused.close()
    errors = [line for line in refused.log().splitlines() if "error:" in line]
    assert len(errors) == 1 and "64x80" in errors[0] and "--fresh" in errors[0]
    assert shift_rows(record) == []  # nothing measured against the wrong reference

    fresh = DaemonProcess(tmp_path, ctx, "fresh", None, *args, "--fresh")
    try:
        fresh.wait_up()
        feed(movie[1:], 1, watch, record)
        assert fresh.ctl("stop")["ok"]
        assert fresh.wait() == 0
    finally:
        fresh.close()
    rows = shift_rows(record)
    assert len(rows) == 2
    np.testing.assert_allclose(
        [rows[1]["dx_px"], rows[1]["dy_px"]], TRUTH[2] - TRUTH[1], atol=0.1
    )
    doc = json.loads((state / "state.json").read_text())
    assert doc["shape"] == list(SHAPE)
    assert len(list(state.glob("reference-*.npy"))) == 1  # the old one is gone


def test_state_dir_files_and_lock(tmp_path: Path) -> None:
    image = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 97) * 10
    state = StateDir(tmp_path, source_name="cam", source_kind="micromanager")
    try:
        with pytest.raises(StateError, match="in use"):
            StateDir(tmp_path, source_name="cam", source_kind="micromanager")
        kwargs = {"roi": (0, 0, 32, 32), "max_shift_px": 10.0}
        state.save_reference("default", image, registrar=kwargs, frame=7, what="f")
        state.save_reference("default", image + 1, registrar=kwargs, frame=9, what="g")
        state.save_stage((1.5, -2.0), {"default": (1.25, -2.5)})
    finally:
        state.close()
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left over
    again = StateDir(tmp_path, source_name="cam", source_kind="micromanager")
    try:
        saved = again.load()
    finally:
        again.close()
    assert saved is not None
    ref = saved.references["default"]
    np.testing.assert_array_equal(ref.image, image + 1)
    assert ref.image.dtype == np.uint16
    assert (ref.frame, ref.what) == (9, "g")
    assert ref.stage_position_um == (1.25, -2.5)
    assert saved.origin_um == (1.5, -2.0)
    assert saved.shape == (64, 64)
    assert ref.build_registrar().roi == (0, 0, 32, 32)
    assert len(list(tmp_path.glob("reference-*.npy"))) == 1


def test_frame_numbers_survive_in_the_state_and_fresh_forgets_them(
    tmp_path: Path,
) -> None:
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    state = StateDir(tmp_path, source_name="s", source_kind="folder")
    state.save_reference(DEFAULT_POSITION, image, registrar={}, frame=0, what="f0")
    for i in range(1000, 1012):
        state.note_frame(i)
    state.close()
    again = StateDir(tmp_path, source_name="s", source_kind="folder")
    saved = again.load()
    assert saved is not None and saved.next_frame == 1012
    again.close()
    fresh = StateDir(tmp_path, source_name="s", source_kind="folder")
    assert fresh.load(fresh=True) is None
    fresh.close()
    assert not (tmp_path / "next_frame").exists()
