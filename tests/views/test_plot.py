"""``stagelock plot``: reading records (daemon CSV/JSONL, register CSV) and the PNG."""

from __future__ import annotations

import csv
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stagelock.cli import main
from stagelock.sim import random_drift
from stagelock.views import load_record, plot_record

PIXEL_SIZE_UM = 0.65
COLUMNS = "frame,time,dx_px,dy_px,dx_um,dy_um,confidence,status,skipped,source"
FAILED = (40, 41, 97)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def daemon_rows(n: int = 150) -> list[dict[str, object]]:
    drift = random_drift(n, seed=3)
    rows: list[dict[str, object]] = []
    for i, (dx, dy) in enumerate(drift):
        failed = i in FAILED
        rows.append(
            {
                "frame": i,
                "time": 1_700_000_000.0 + 0.5 * i,
                "dx_px": None if failed else float(dx),
                "dy_px": None if failed else float(dy),
                "dx_um": None if failed else float(dx) * PIXEL_SIZE_UM,
                "dy_um": None if failed else float(dy) * PIXEL_SIZE_UM,
                "confidence": 0.05 if failed else 0.95,
                "status": "blank" if failed else "ok",
                "skipped": 0,
                "source": "scope-1",
            }
        )
    return rows


@pytest.fixture
def daemon_csv(tmp_path: Path) -> Path:
    path = tmp_path / "record.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS.split(","))
        writer.writeheader()
        for row in daemon_rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def test_daemon_csv_is_read_with_units_gaps_and_time(daemon_csv: Path) -> None:
    record = load_record(daemon_csv)
    truth = random_drift(150, seed=3)
    assert record.n_shifts == 150 and record.n_failed == len(FAILED)
    assert np.flatnonzero(record.failed).tolist() == list(FAILED)
    ok = ~record.failed
    np.testing.assert_allclose(record.dx_px[ok], truth[ok, 0])
    np.testing.assert_allclose(record.dy_px[ok], truth[ok, 1])
    assert record.pixel_size_um == pytest.approx(PIXEL_SIZE_UM)
    assert record.time is not None and record.time[1] - record.time[0] == 0.5
    assert record.sources == ("scope-1",) and record.corrections == ()


def test_plot_png_has_the_size_dpi_times_figsize(
    daemon_csv: Path, tmp_path: Path
) -> None:
    out = plot_record(
        load_record(daemon_csv), tmp_path / "drift.png", dpi=80, figsize_in=(10.0, 6.0)
    )
    assert png_size(out) == (800, 480)


def test_jsonl_with_status_rows_corrections_and_a_truncated_tail(
    tmp_path: Path,
) -> None:
    path = tmp_path / "record.jsonl"
    lines = []
    for row in daemon_rows(60):
        lines.append(json.dumps({"topic": "stagelock.shift", **row}))
        if row["frame"] % 20 == 10:
            # a heartbeat carries dx_px too: it must not become a frame
            lines.append(
                json.dumps(
                    {
                        "topic": "stagelock.status",
                        "dx_px": 99.0,
                        "dy_px": 99.0,
                        "state": "measuring",
                    }
                )
            )
            lines.append(
                json.dumps(
                    {
                        "topic": "stagelock.correction",
                        "frame": row["frame"],
                        "time": row["time"],
                        "move_x_um": -0.3,
                        "move_y_um": 0.1,
                        "stage_x_um": 1.0,
                        "stage_y_um": 2.0,
                        "status": "moved",
                    }
                )
            )
    lines.append('{"topic": "stagelock.shift", "frame": 60, "dx_')  # killed mid-write
    path.write_text("\n".join(lines) + "\n")
    record = load_record(path)
    assert record.n_shifts == 60 and record.unreadable_lines == 1
    assert not (record.dx_px == 99.0).any()
    assert [c.frame for c in record.corrections] == [10, 30, 50]
    assert record.corrections[0].move_x_um == -0.3
    out = plot_record(record, tmp_path / "drift.png", dpi=50)
    assert png_size(out) == (600, 375)


def test_register_csv_without_time_plots_against_frame(tmp_path: Path) -> None:
    path = tmp_path / "shifts.csv"
    path.write_text(
        "frame,dx_px,dy_px,confidence,status\n"
        "0,0.0,0.0,1.0,ok\n1,0.5,-0.25,0.9,ok\n2,nan,nan,0.1,no_peak\n3,1.5,-0.75,0.9,ok\n"
    )
    record = load_record(path)
    assert record.time is None and record.dx_um is None and record.pixel_size_um is None
    assert record.frame.tolist() == [0, 1, 2, 3] and record.n_failed == 1
    assert record.status == ("ok", "ok", "no_peak", "ok")
    assert png_size(plot_record(record, tmp_path / "p.png", dpi=40)) == (480, 300)


def test_cli_plot_writes_png_with_title_and_dpi(
    daemon_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drift.png"
    code = main(
        [
            "plot",
            str(daemon_csv),
            "-o",
            str(out),
            "--dpi",
            "60",
            "--title",
            "overnight run",
        ]
    )
    assert code == 0
    assert png_size(out) == (720, 450)
    assert capsys.readouterr().out.strip() == (
        f"wrote {out} (150 frames, 3 without a shift, 0 corrections)"
    )


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.csv", None, "no such file"),
        ("empty.csv", b"", "is empty"),
        ("blank.csv", b"\n  \n", "is empty"),
        ("binary.csv", bytes(range(256)) * 4, "not a text record"),
        (
            "words.txt",
            b"hello, world\nthis is not, a record\n",
            "missing column(s) frame, dx_px, dy_px",
        ),
        ("header.csv", (COLUMNS + "\n").encode(), "has no frame rows"),
        (
            "bad.csv",
            b"frame,dx_px,dy_px\n0,0.1,0.2\n1,zero,0.2\n",
            "bad.csv:3: column dx_px: not a number: 'zero'",
        ),
        ("junk.jsonl", b"{not json\n{also not\n", "no JSON object line with dx_px"),
    ],
)
def test_cli_plot_bad_input_is_one_line_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes | None,
    needle: str,
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out.png"
    assert main(["plot", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagelock plot: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists()


def test_cli_plot_unwritable_output_is_one_line_error(
    daemon_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "no" / "such" / "dir" / "drift.png"
    assert main(["plot", str(daemon_csv), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


def test_missing_matplotlib_gives_the_install_hint(
    daemon_csv: Path, tmp_path: Path
) -> None:
    # a fresh interpreter where importing matplotlib fails, as when it is absent
    argv = ["plot", str(daemon_csv), "-o", str(tmp_path / "x.png")]
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "from stagelock.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "stagelock plot: error: plotting needs matplotlib, which is not installed: "
        'pip install "stagelock[plot]"'
    )


def test_real_daemon_record_plots(tmp_path: Path) -> None:
    """A record written by ``stagelock run`` (simulated microscope, loop closed)."""
    record_path = tmp_path / "run.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagelock",
            "run",
            "--publish",
            "tcp://127.0.0.1:0",
            "--control",
            "tcp://127.0.0.1:0",
            "--record",
            str(record_path),
            "--frames",
            "30",
            "--pixel-size",
            "0.5",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    record = load_record(record_path)
    assert record.n_shifts == 30 and record.sources == ("simulated",)
    assert record.pixel_size_um == pytest.approx(0.5)
    assert record.time is not None and np.all(np.diff(record.time) > 0)
    assert record.corrections  # the simulated stage is corrected (loop closed)
    assert all(math.isfinite(c.move_x_um) for c in record.corrections)
    out = tmp_path / "run.png"
    assert main(["plot", str(record_path), "-o", str(out), "--dpi", "50"]) == 0
    assert png_size(out) == (600, 375)
