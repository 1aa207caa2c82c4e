"""OME-Zarr in (written by ome-zarr-py, v0.4/zarr v2 and v0.5/zarr v3) and out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose

import stagelock
from helpers import BATCH_SHAPE, rms
from stagelock import estimate_shifts
from stagelock.batch import ZarrSource, open_source
from stagelock.sim import CameraNoise, drifting_stack, random_drift

zarr = pytest.importorskip("zarr")
ome_writer = pytest.importorskip("ome_zarr.writer")
ome_format = pytest.importorskip("ome_zarr.format")


def write_ome_zarr(path: Path, data: np.ndarray, axes: str, version: str) -> None:
    """A multiscale image (full resolution + one level down) by ome-zarr-py."""
    fmt = ome_format.FormatV05() if version == "0.5" else ome_format.FormatV04()
    group = zarr.open_group(
        str(path), mode="w", zarr_format=3 if version == "0.5" else 2
    )
    chunks = (7, *data.shape[1:])  # several time points per storage chunk
    ome_writer.write_image(
        data,
        group,
        axes=axes,
        fmt=fmt,
        scale_factors=(2,),
        storage_options={"chunks": chunks},
    )


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_tyx_ome_zarr_in_and_aligned_ome_zarr_out(
    client: Any, tmp_path: Path, version: str
) -> None:
    truth = random_drift(30, creep_px_per_frame=(0.12, -0.08), seed=3)
    stack = drifting_stack(truth, shape=BATCH_SHAPE, seed=3)
    src = tmp_path / "movie.ome.zarr"
    write_ome_zarr(src, stack, "tyx", version)
    source = open_source(src)
    assert isinstance(source, ZarrSource)
    # the full resolution is datasets[0] (ome-zarr-py names it s0), not level 1
    assert (
        source.plane_shape == BATCH_SHAPE
        and source.n_frames == 30
        and source.n_channels == 1
    )
    (summary,) = stagelock.register_many(
        [src], tmp_path / "out", client=client, chunk_frames=10, aligned="auto"
    )
    assert summary.outcome == "done" and summary.aligned is not None
    assert summary.aligned.name == "movie.aligned.ome.zarr"
    frames, shifts = _read(summary.shifts_csv)
    assert frames == list(range(30)) and rms(shifts, truth) <= 0.05
    # the aligned stack is itself an OME-Zarr this reader (and viewers) accept
    group = zarr.open_group(str(summary.aligned), mode="r")
    ms = group.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "y", "x"]
    aligned = np.asarray(
        zarr.open_array(str(summary.aligned / ms["datasets"][0]["path"]))
    )
    assert aligned.shape == stack.shape and aligned.dtype == stack.dtype
    residual = estimate_shifts(aligned, max_shift_px=10)
    assert np.abs(residual).max() < 0.1


def test_tcyx_ome_zarr_registers_on_its_channel(client: Any, tmp_path: Path) -> None:
    truth = random_drift(20, seed=5)
    signal = drifting_stack(truth, shape=BATCH_SHAPE, seed=5)
    rng = np.random.default_rng(0)
    empty = rng.integers(90, 110, size=signal.shape).astype(signal.dtype)
    data = np.stack([empty, signal], axis=1)  # T, C, Y, X
    src = tmp_path / "tc.ome.zarr"
    write_ome_zarr(src, data, "tcyx", "0.5")
    (summary,) = stagelock.register_many(
        [src],
        tmp_path / "out",
        client=client,
        chunk_frames=8,
        channel=1,
        aligned="zarr",
    )
    assert summary.outcome == "done"
    _, shifts = _read(summary.shifts_csv)
    assert rms(shifts, truth) <= 0.05
    assert summary.aligned is not None
    meta = json.loads((summary.aligned / ".zattrs").read_text())
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["t", "c", "y", "x"]
    aligned = np.asarray(zarr.open_array(str(summary.aligned / "0")))
    assert aligned.shape == data.shape
    assert_allclose(estimate_shifts(aligned[:, 1], max_shift_px=10), 0.0, atol=0.1)


def test_micro_manager_image_sequence_folder(tmp_path: Path) -> None:
    import tifffile

    truth = random_drift(12, seed=8)
    stack = drifting_stack(
        truth, shape=BATCH_SHAPE, noise=CameraNoise(peak_photons=2000), seed=8
    )
    folder = tmp_path / "acq_1"
    folder.mkdir()
    for t, plane in enumerate(stack):
        tifffile.imwrite(
            folder / f"img_channel000_position000_time{t:09d}_z000.tif", plane
        )
    (folder / "metadata.txt").write_text("{}")
    (summary,) = stagelock.register_many([folder], tmp_path / "out", workers=0)
    assert summary.outcome == "done" and summary.shifts_csv.name == "acq_1.shifts.csv"
    _, shifts = _read(summary.shifts_csv)
    assert rms(shifts, truth) <= 0.05


def _read(path: Path) -> tuple[list[int], np.ndarray]:
    from helpers import read_shifts_csv

    frames, shifts, _ = read_shifts_csv(path)
    return frames, shifts
