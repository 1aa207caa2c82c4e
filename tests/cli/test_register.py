"""``stagelock register``: TIFF in, shifts CSV and aligned stack out."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from numpy.testing import assert_allclose

from stagelock import Registrar, estimate_shifts
from stagelock.cli import main
from stagelock.sim import CameraNoise, drifting_stack, fourier_shift, sample_image


def read_shifts(path: Path) -> np.ndarray:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["frame", "dx_px", "dy_px", "confidence", "status"]
    return np.array([[float(r["dx_px"]), float(r["dy_px"])] for r in rows])


def test_example_round_trip_in_a_subprocess(tmp_path: Path) -> None:
    stack = tmp_path / "example.tif"
    out = tmp_path / "aligned.tif"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagelock",
            "register",
            str(stack),
            "--example",
            "-o",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    truth = np.loadtxt(stack.with_suffix(".truth.csv"), delimiter=",", skiprows=1)
    shifts = read_shifts(stack.with_suffix(".shifts.csv"))
    assert shifts[0].tolist() == [0.0, 0.0]
    assert_allclose(shifts, truth[:, 1:], atol=0.05)
    aligned = tifffile.imread(out)
    original = tifffile.imread(stack)
    assert aligned.shape == original.shape and aligned.dtype == original.dtype
    # the aligned stack holds still: residual shifts are (close to) zero
    residual = estimate_shifts(aligned, max_shift_px=10)
    assert np.abs(residual).max() < 0.1


def test_channel_of_a_tcyx_ome_tiff(tmp_path: Path) -> None:
    base = sample_image((128, 128))
    truth = [(0.0, 0.0), (1.5, -0.5), (3.25, -2.0)]
    rng = np.random.default_rng(0)
    noise = CameraNoise(peak_photons=2000)
    movie = np.stack(
        [
            np.stack(
                [
                    rng.integers(90, 110, size=base.shape).astype(
                        np.uint16
                    ),  # empty channel 0
                    noise.expose(fourier_shift(base, dx, dy), rng),
                ]
            )
            for dx, dy in truth
        ]
    )
    path = tmp_path / "tc.ome.tif"
    tifffile.imwrite(path, movie, metadata={"axes": "TCYX"}, ome=True)
    shifts_csv = tmp_path / "s.csv"
    out = tmp_path / "aligned.tif"
    code = main(
        [
            "register",
            str(path),
            "--channel",
            "1",
            "--shifts",
            str(shifts_csv),
            "-o",
            str(out),
            "--max-shift-px",
            "10",
            "--no-progress",
        ]
    )
    assert code == 0
    assert_allclose(read_shifts(shifts_csv), truth, atol=0.05)
    aligned = tifffile.imread(out)
    assert aligned.shape == movie.shape  # every channel kept, in place
    assert_allclose(estimate_shifts(aligned[:, 1], max_shift_px=10), 0.0, atol=0.1)


def test_roi_and_mean_reference(tmp_path: Path) -> None:
    truth = np.array([(0, 0), (0, 0), (0.5, 0.25), (-1.0, 2.0)])
    path = tmp_path / "m.tif"
    movie = drifting_stack(truth, shape=(160, 160), noise=None)
    tifffile.imwrite(path, movie, photometric="minisblack")
    shifts_csv = tmp_path / "s.csv"
    code = main(
        [
            "register",
            str(path),
            "--roi",
            "20,30,100,100",
            "--reference",
            "mean",
            "--shifts",
            str(shifts_csv),
            "--max-shift-px",
            "8",
            "--no-progress",
        ]
    )
    assert code == 0
    # shifts are relative to the mean image, which sits near the mean position
    shifts = read_shifts(shifts_csv)
    assert_allclose(shifts[0], -truth.mean(axis=0), atol=0.1)
    assert_allclose(shifts - shifts[0], truth, atol=0.05)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.tif", "no such file"),
        (
            lambda p: (p / "junk.tif").write_text("not an image") and p / "junk.tif",
            "cannot read",
        ),
        (lambda p: p, "is a directory"),
    ],
    ids=["missing", "not-a-tiff", "directory"],
)
def test_bad_input_is_one_line_and_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    code = main(["register", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_bad_roi_and_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.tif"
    movie = drifting_stack([(0, 0), (1, 1)], shape=(64, 64), noise=None)
    tifffile.imwrite(path, movie, photometric="minisblack")
    with pytest.raises(SystemExit):
        main(["register", str(path), "--roi", "1,2,3"])
    assert "--roi must be X,Y,W,H" in capsys.readouterr().err
    assert main(["register", str(path), "--channel", "2", "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["register", str(path), "--roi", "50,50,40,40", "--no-progress"]) == 2
    assert "roi" in capsys.readouterr().err


def test_truncated_tiff_keeps_recorded_shifts(tmp_path: Path) -> None:
    path = tmp_path / "t.tif"
    movie = drifting_stack([(0, 0), (1, 0), (2, 0), (3, 0)], shape=(96, 96))
    tifffile.imwrite(path, movie, photometric="minisblack")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the last frame(s) are cut off
    shifts_csv = tmp_path / "s.csv"
    code = main(["register", str(path), "--shifts", str(shifts_csv), "--no-progress"])
    assert code == 2
    lines = shifts_csv.read_text().splitlines()
    assert lines[0].startswith("frame,") and len(lines) >= 2  # what was measured stays


def test_real_stack_agrees_with_published_registration(
    shared_data: Path, tmp_path: Path
) -> None:
    """pc12: StackReg's published, frame-to-frame chained result is the peer."""
    out = tmp_path / "aligned.tif"
    shifts_csv = tmp_path / "s.csv"
    code = main(
        [
            "register",
            str(shared_data / "pc12-unreg.tif"),
            "-o",
            str(out),
            "--shifts",
            str(shifts_csv),
            "--no-progress",
        ]
    )
    assert code == 0
    shifts = read_shifts(shifts_csv)
    assert shifts[0].tolist() == [0.0, 0.0]
    assert np.abs(shifts[:, 1]).max() > 5  # real drift of several pixels was found
    published = tifffile.imread(shared_data / "pc12-reg-translation.tif")
    ours = tifffile.imread(out)
    reg = Registrar(published[0], max_shift_px=10)
    for frame_ours, frame_pub in zip(ours, published, strict=True):
        a, b = reg.measure(frame_ours), reg.measure(frame_pub)
        # the peer chains frame to frame and interpolates with splines: a few
        # tenths of a pixel of disagreement is expected, not more
        assert abs(a.dx_px - b.dx_px) < 0.5 and abs(a.dy_px - b.dy_px) < 0.5
    assert np.abs(estimate_shifts(ours, max_shift_px=10)).max() < 0.1


@pytest.mark.parametrize(
    ("flags", "max_rms_px"),
    [(["--coverage", "1.0"], 0.02), (["--reference", "previous"], 0.05)],
)
def test_coverage_and_chained_reference_stay_on_the_truth(
    tmp_path: Path, flags: list[str], max_rms_px: float
) -> None:
    stack = tmp_path / "ex.tif"
    assert main(["register", str(stack), "--example", "--no-progress", "-q"]) == 0
    shifts = tmp_path / "s.csv"
    code = main(
        ["register", str(stack), "--shifts", str(shifts), "--no-progress", *flags]
    )
    assert code == 0
    truth = np.loadtxt(tmp_path / "ex.truth.csv", delimiter=",", skiprows=1)[:, 1:]
    measured = np.genfromtxt(shifts, delimiter=",", skip_header=1, usecols=(1, 2))
    assert measured[0].tolist() == [0.0, 0.0]
    assert float(np.sqrt(np.mean((measured - truth) ** 2))) <= max_rms_px


def test_coverage_outside_zero_one_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["register", str(tmp_path / "x.tif"), "--coverage", "1.5"])
    assert exc.value.code == 2
