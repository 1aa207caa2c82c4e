from __future__ import annotations

import subprocess
import sys

import pytest

import stagelock


@pytest.mark.parametrize("name", stagelock.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(stagelock, name) is not None
    assert name in dir(stagelock)


def test_shift_is_the_shift_estimate() -> None:
    assert stagelock.Shift is stagelock.ShiftEstimate


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        stagelock.nope  # noqa: B018


def test_importing_the_package_and_cli_loads_no_heavy_dependency() -> None:
    # `stagelock ctl status` must answer fast: no pymmcore-plus, OpenCV, Dask
    code = (
        "import sys, stagelock, stagelock.cli; "
        "print(sorted(m for m in ('pymmcore_plus', 'cv2', 'dask', 'useq') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
