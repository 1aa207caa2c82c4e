"""Records of multi-position acquisitions: every position drawn, one selectable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagelock.cli import main
from stagelock.views import load_record


@pytest.fixture
def mda_record(tmp_path: Path) -> Path:
    lines = []
    frame = 0
    for t in range(5):
        for p, name in enumerate(("A", "B", "C")):
            lines.append(
                {
                    "topic": "stagelock.shift",
                    "schema": "stagelock.shift/2",
                    "frame": frame,
                    "time": 1_700_000_000.0 + 60 * t + p,
                    "dx_px": 0.1 * p * t,
                    "dy_px": -0.05 * t,
                    "confidence": 0.95,
                    "status": "ok",
                    "source": "mmcore:Camera",
                    "position": p,
                    "position_name": name,
                    "channel": "DAPI",
                    "z": None,
                }
            )
            frame += 1
        lines.append(
            {
                "topic": "stagelock.correction",
                "schema": "stagelock.correction/2",
                "frame": frame - 2,
                "time": 1_700_000_000.0 + 60 * t + 1,
                "move_x_um": 0.1,
                "move_y_um": 0.0,
                "status": "moved",
                "position": 1,
                "position_name": "B",
            }
        )
    path = tmp_path / "mda.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_record_knows_its_positions_and_selects_one(mda_record: Path) -> None:
    record = load_record(mda_record)
    assert record.positions == [0, 1, 2]
    assert record.position_names == {0: "A", 1: "B", 2: "C"}
    b = record.select_position(1)
    assert b.n_shifts == 5
    assert b.dx_px.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert len(b.corrections) == 5
    assert len(record.select_position(2).corrections) == 0


def test_cli_plot_draws_every_position_and_one_with_position(
    mda_record: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "all.png"
    assert main(["plot", str(mda_record), "-o", str(out), "--dpi", "40"]) == 0
    assert out.stat().st_size > 0
    assert "15 frames" in capsys.readouterr().out
    one = tmp_path / "b.png"
    code = main(["plot", str(mda_record), "-o", str(one), "--position", "1"])
    assert code == 0
    assert "5 frames" in capsys.readouterr().out
    assert main(["plot", str(mda_record), "-o", str(one), "--position", "7"]) == 2
    assert "no frames of position 7; positions: 0, 1, 2" in capsys.readouterr().err
