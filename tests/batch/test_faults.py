"""Faults: a killed worker, reruns (skip, --overwrite), partial outputs, bad inputs."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stagelock
from helpers import BATCH_FRAMES, read_shifts_csv, rms, write_stack
from stagelock.cli import main


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("fault_stacks")
    return {
        root / f"s{i}.tif": write_stack(root / f"s{i}.tif", 10 + i) for i in range(4)
    }


def test_a_worker_killed_mid_job_loses_and_duplicates_nothing(
    client: Any, stacks: dict[Path, np.ndarray], tmp_path: Path
) -> None:
    result: dict[str, Any] = {}

    def job() -> None:
        result["summaries"] = stagelock.register_many(
            list(stacks), tmp_path, client=client, chunk_frames=6
        )

    runner = threading.Thread(target=job)
    runner.start()
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and runner.is_alive() and time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            victim = busy[0]
        else:
            time.sleep(0.05)
    assert victim is not None, "no worker ever ran a task"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)  # mid-task: the scheduler re-runs its tasks elsewhere
    runner.join(timeout=600)
    assert not runner.is_alive()
    summaries = result["summaries"]
    assert [s.outcome for s in summaries] == ["done"] * len(stacks)
    for s, truth in zip(summaries, stacks.values(), strict=True):
        frames, shifts, _ = read_shifts_csv(s.shifts_csv)
        assert frames == list(range(BATCH_FRAMES))  # every row exactly once, in order
        assert rms(shifts, truth) <= 0.05


def test_rerun_skips_complete_outputs_and_overwrite_redoes_them(
    stacks: dict[Path, np.ndarray], tmp_path: Path
) -> None:
    paths = list(stacks)[:2]
    first = stagelock.register_many(paths, tmp_path, workers=0)
    assert [s.outcome for s in first] == ["done", "done"]
    stamps = [s.shifts_csv.stat().st_mtime_ns for s in first]
    again = stagelock.register_many(paths, tmp_path, workers=0)
    assert [s.outcome for s in again] == ["skipped", "skipped"]
    assert [s.shifts_csv.stat().st_mtime_ns for s in again] == stamps
    assert [(s.n_frames, s.n_ok, round(s.max_shift_px, 3)) for s in again] == [
        (s.n_frames, s.n_ok, round(s.max_shift_px, 3)) for s in first
    ]
    # a truncated CSV (as a crash mid-write would leave it, were it not renamed)
    # is not complete: that input is redone, the other skipped
    text = first[1].shifts_csv.read_text().splitlines()
    first[1].shifts_csv.write_text("\n".join(text[:10]) + "\n")
    mixed = stagelock.register_many(paths, tmp_path, workers=0)
    assert [s.outcome for s in mixed] == ["skipped", "done"]
    assert read_shifts_csv(first[1].shifts_csv)[0] == list(range(BATCH_FRAMES))
    redone = stagelock.register_many(paths, tmp_path, workers=0, overwrite=True)
    assert [s.outcome for s in redone] == ["done", "done"]


def test_corrupt_inputs_are_reported_and_the_others_finish(
    client: Any,
    stacks: dict[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = list(stacks)[:2]
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is no TIFF")
    # a real TIFF whose later pages are cut off: found only by the task reading them
    whole = good[0].read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "out"
    argv = [
        str(good[0]),
        str(garbage),
        str(truncated),
        str(good[1]),
        "--out-dir",
        str(out),
    ]
    code = main(
        [
            "register",
            *argv,
            "--scheduler",
            client.scheduler.address,
            "--chunk-frames",
            "12",
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    errors = captured.err.strip().splitlines()
    assert (
        len(errors) == 2 and "garbage.tif" in errors[0] and "truncated.tif" in errors[1]
    )
    assert "Traceback" not in captured.err
    assert "2 of 4 inputs complete" in captured.out
    for path in good:
        frames, shifts, _ = read_shifts_csv(out / f"{path.stem}.shifts.csv")
        assert frames == list(range(BATCH_FRAMES)) and rms(shifts, stacks[path]) <= 0.05
    # failed inputs leave nothing that looks complete
    assert sorted(p.name for p in out.iterdir()) == ["s0.shifts.csv", "s1.shifts.csv"]


def test_aligned_tiff_for_tiff_input_and_its_skip(
    stacks: dict[Path, np.ndarray], tmp_path: Path
) -> None:
    import tifffile

    from stagelock import estimate_shifts

    path = next(iter(stacks))
    (s,) = stagelock.register_many(
        [path], tmp_path, workers=0, aligned="auto", chunk_frames=10
    )
    assert s.aligned == tmp_path / "s0.aligned.tif"
    aligned = tifffile.imread(s.aligned)
    assert aligned.shape == (BATCH_FRAMES, 128, 128)
    assert np.abs(estimate_shifts(aligned, max_shift_px=10)).max() < 0.1
    # shifts complete but the aligned stack missing: the input is not complete
    s.aligned.unlink()
    (again,) = stagelock.register_many([path], tmp_path, workers=0, aligned="auto")
    assert (
        again.outcome == "done" and again.aligned is not None and again.aligned.exists()
    )
