from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from helpers import FrameCollector
from stagelock.sources import (
    FolderSource,
    FrameSource,
    acquisition_index,
    is_temporary_name,
)


def image(value: int) -> np.ndarray:
    rng = np.random.default_rng(value)
    return (rng.random((32, 48)) * 1000 + value).astype(np.uint16)


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("img_channel000_position000_time000000012_z003.tif", 12),
        ("frame_0042.tif", 42),
        ("scan7_part3.ome.tif", 3),
        ("noindex.tif", None),
    ],
)
def test_acquisition_index(name: str, index: int | None) -> None:
    assert acquisition_index(name) == index


def test_files_in_acquisition_order_and_growing_stack(tmp_path: Path) -> None:
    got = FrameCollector()
    # present together at the first scan: delivered by index (2 < 10), not by name
    tifffile.imwrite(tmp_path / "img_10.tif", image(10))
    tifffile.imwrite(tmp_path / "img_2.tif", image(2))
    src = FolderSource(tmp_path, from_start=True, poll_interval_s=0.02)
    assert isinstance(src, FrameSource)
    src.start(got)
    try:
        frames = got.wait_for(2)
        names = [Path(f.metadata["file"]).name for f in frames]
        assert names == ["img_2.tif", "img_10.tif"]
        np.testing.assert_array_equal(frames[0].image, image(2))
        # a stack that grows page by page: each new page read once
        stack = tmp_path / "stack_20.tif"
        for k in range(3):
            tifffile.imwrite(stack, image(100 + k), append=True)
            frames = got.wait_for(3 + k)
        pages = [f.metadata["page"] for f in frames[2:]]
        assert pages == [0, 1, 2]
        np.testing.assert_array_equal(frames[-1].image, image(102))
        assert [f.index for f in frames] == list(range(5))
        assert src.n_corrupt == 0
    finally:
        src.stop()


def test_from_start_and_existing_files(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "old_1.tif", image(1))
    ignoring = FolderSource(tmp_path, poll_interval_s=0.02)
    got = FrameCollector()
    ignoring.start(got)
    try:
        tifffile.imwrite(tmp_path / "new_2.tif", image(2))
        frames = got.wait_for(1)
        assert Path(frames[0].metadata["file"]).name == "new_2.tif"
    finally:
        ignoring.stop()
    replay = FrameCollector()
    src = FolderSource(tmp_path, from_start=True, poll_interval_s=0.02)
    src.start(replay)
    try:
        names = [Path(f.metadata["file"]).name for f in replay.wait_for(2)]
        assert names == ["old_1.tif", "new_2.tif"]
    finally:
        src.stop()


def test_corrupt_file_is_counted_and_skipped(tmp_path: Path) -> None:
    got = FrameCollector()
    src = FolderSource(tmp_path, poll_interval_s=0.02, give_up_after_s=0.3)
    src.start(got)
    try:
        (tmp_path / "a_1.tif").write_bytes(b"\x00" * 500)  # not a TIFF
        tifffile.imwrite(tmp_path / "a_2.tif", image(2))
        frames = got.wait_for(1)
        assert Path(frames[0].metadata["file"]).name == "a_2.tif"
        deadline = time.monotonic() + 5
        while src.n_corrupt < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert src.n_corrupt == 1
    finally:
        src.stop()


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        FolderSource(tmp_path / "nope")


def test_written_aside_and_renamed_files_are_read_once(tmp_path: Path) -> None:
    got = FrameCollector()
    src = FolderSource(tmp_path, poll_interval_s=0.02)
    src.start(got)
    try:
        for i in range(5):
            part = tmp_path / f"img_{i:03d}.tif.part"
            tifffile.imwrite(part, image(i))
            part.rename(tmp_path / f"img_{i:03d}.tif")
        frames = got.wait_for(5)
        time.sleep(0.3)  # a duplicate would come within a few polls
        names = [Path(f.metadata["file"]).name for f in got.frames]
        assert names == [f"img_{i:03d}.tif" for i in range(5)]
        assert src.n_corrupt == 0
        np.testing.assert_array_equal(frames[3].image, image(3))
    finally:
        src.stop()


@pytest.mark.parametrize(
    "name", ["a.tif.part", "a.tif.tmp", "a.tif~", ".a.tif", "a.TIF.PART"]
)
def test_temporary_names_are_never_frames(name: str) -> None:
    assert is_temporary_name(name)
    assert not is_temporary_name("a.ome.tif")


class _SlowToWatch(FolderSource):
    """Files land between the listing of existing files and the first event."""

    def _start_observer(self) -> None:
        for i in range(3):
            tifffile.imwrite(self.path / f"img_{i:03d}.tif", image(i))
        super()._start_observer()
        self.rescan_s = 30.0  # only the first scan's sweep can find them


def test_files_written_while_starting_come_first_and_in_order(tmp_path: Path) -> None:
    got = FrameCollector()
    src = _SlowToWatch(tmp_path, poll_interval_s=0.02)
    src.start(got)
    try:
        tifffile.imwrite(tmp_path / "img_003.tif", image(3))
        frames = got.wait_for(4)
        names = [Path(f.metadata["file"]).name for f in frames]
        assert names == [f"img_{i:03d}.tif" for i in range(4)]
    finally:
        src.stop()
