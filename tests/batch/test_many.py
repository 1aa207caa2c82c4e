"""Many TIFF inputs on a LocalCluster: one complete shifts CSV each, truth-accurate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stagelock
from helpers import BATCH_FRAMES, read_shifts_csv, rms, write_stack
from stagelock.batch import expand_inputs, output_stem, plan_chunks
from stagelock.cli import main


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("stacks")
    return {
        root / f"cell{i}.ome.tif": write_stack(root / f"cell{i}.ome.tif", i)
        for i in range(3)
    }


def test_output_stem_and_inputs(tmp_path: Path) -> None:
    assert output_stem(Path("a/cell 1.ome.tif")) == "cell 1"
    assert output_stem(Path("b.ome.zarr")) == "b"
    assert output_stem(Path("c.zarr")) == "c"
    assert output_stem(Path("d.tiff")) == "d"
    for name in ("x.tif", "y.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert expand_inputs([tmp_path]) == [tmp_path / "x.tif", tmp_path / "y.tif"]
    assert expand_inputs([str(tmp_path / "*.tif"), tmp_path / "x.tif"]) == [
        tmp_path / "x.tif",
        tmp_path / "y.tif",
    ]
    assert [(c.start, c.stop) for c in plan_chunks(0, 36, 15)] == [
        (0, 15),
        (15, 30),
        (30, 36),
    ]


@pytest.mark.parametrize("reference", ["first", "keyframe", "previous"])
def test_many_inputs_on_the_cluster(
    client: Any, stacks: dict[Path, np.ndarray], tmp_path: Path, reference: str
) -> None:
    summaries = stagelock.register_many(
        list(stacks),
        tmp_path,
        client=client,
        chunk_frames=15,
        reference=reference,  # type: ignore[arg-type]
    )
    assert [s.outcome for s in summaries] == ["done"] * 3
    for s, (path, truth) in zip(summaries, stacks.items(), strict=True):
        assert (
            s.path == path
            and s.shifts_csv == tmp_path / f"{output_stem(path)}.shifts.csv"
        )
        frames, shifts, status = read_shifts_csv(s.shifts_csv)
        assert frames == list(range(BATCH_FRAMES))  # every frame once, in order
        assert shifts[0].tolist() == [0.0, 0.0]
        # chained to the previous frame, each link's error adds: a random walk
        # over 35 links (RMS 0.035 px against 0.018 for a fixed reference, 20
        # other seeds of these stacks)
        assert rms(shifts, truth) <= (0.08 if reference == "previous" else 0.05)
        assert (
            s.n_frames == BATCH_FRAMES and s.n_ok == status.count("ok") == BATCH_FRAMES
        )
        assert s.max_shift_px == pytest.approx(np.hypot(*shifts.T).max(), abs=1e-3)
    assert not list(tmp_path.glob("*.partial"))


def test_in_process_gives_the_same_rows(
    client: Any, stacks: dict[Path, np.ndarray], tmp_path: Path
) -> None:
    paths = list(stacks)[:1]
    stagelock.register_many(paths, tmp_path / "dask", client=client, chunk_frames=12)
    stagelock.register_many(paths, tmp_path / "local", workers=0, chunk_frames=12)
    name = f"{output_stem(paths[0])}.shifts.csv"
    a = (tmp_path / "dask" / name).read_text()
    b = (tmp_path / "local" / name).read_text()
    assert a == b


def test_cli_many_inputs_on_a_scheduler(
    client: Any,
    stacks: dict[Path, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = ["register", *map(str, stacks), "--out-dir", str(out), "--no-progress"]
    code = main(
        [*argv, "--scheduler", client.scheduler.address, "--chunk-frames", "20"]
    )
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "3 of 3 inputs complete" in text and "cell0.ome.tif" in text
    for path, truth in stacks.items():
        _, shifts, _ = read_shifts_csv(out / f"{output_stem(path)}.shifts.csv")
        assert rms(shifts, truth) <= 0.05


def test_cli_workers_starts_its_own_local_cluster(
    stacks: dict[Path, np.ndarray],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """``--workers 2``: a LocalCluster of its own, quiet on the console."""
    out = tmp_path / "out"
    paths = list(stacks)[:2]
    argv = ["register", *map(str, paths), "--out-dir", str(out), "--no-progress"]
    code = main([*argv, "--workers", "2", "--chunk-frames", "12"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "2 of 2 inputs complete" in captured.out
    # no dashboard, no scheduler/nanny INFO chatter on the console
    assert "dashboard" not in captured.err.lower() and "INFO" not in captured.err
    for path in paths:
        frames, shifts, _ = read_shifts_csv(out / f"{output_stem(path)}.shifts.csv")
        assert frames == list(range(BATCH_FRAMES))
        assert rms(shifts, stacks[path]) <= 0.05


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "need --out-dir"),
        (["--out-dir", "D", "-o", "x.tif"], "-o/--output names one file"),
        (
            ["--out-dir", "D", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
            "not both",
        ),
    ],
)
def test_cli_usage_errors_exit_2(
    stacks: dict[Path, np.ndarray],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["register", *map(str, stacks), *extra, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_out_dir_passes_coverage_and_reference(
    stacks: dict[Path, np.ndarray], tmp_path: Path
) -> None:
    """``--coverage`` and ``--reference previous`` reach every input's registration."""
    path = next(iter(stacks))
    name = f"{output_stem(path)}.shifts.csv"
    for flags, kwargs in (
        (["--coverage", "1.0"], {"coverage": 1.0}),
        (["--reference", "previous"], {"reference": "previous"}),
    ):
        cli_dir, api_dir = tmp_path / f"cli{flags[1]}", tmp_path / f"api{flags[1]}"
        argv = ["register", str(path), "--out-dir", str(cli_dir), "--no-progress"]
        assert main([*argv, *flags]) == 0
        stagelock.register_many([path], api_dir, workers=0, **kwargs)  # type: ignore[arg-type]
        assert (cli_dir / name).read_text() == (api_dir / name).read_text()
    # the settings changed the rows: they were not silently dropped
    assert (tmp_path / "cli1.0" / name).read_text() != (
        tmp_path / "cliprevious" / name
    ).read_text()


def test_an_unknown_reference_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference must be 'first'"):
        stagelock.register_many([tmp_path / "a.tif"], tmp_path, reference="median")  # type: ignore[arg-type]
