from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import zmq

if TYPE_CHECKING:
    from collections.abc import Iterator

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    # The suite starts ~100 Python processes (daemons, CLIs, Dask workers). With
    # PYTHONDONTWRITEBYTECODE set (as on these machines) each one recompiled
    # stagelock, pydantic, useq, pymmcore-plus and dask from source: ~10 s of a
    # simulated daemon's 22 s start. Bytecode written once is read by all.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False


def pytest_report_header(config: pytest.Config) -> list[str]:
    names = ["numpy", "opencv-python-headless", "pyzmq", "pymmcore-plus", "tifffile"]
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name} missing")
    return ["stagelock deps: " + ", ".join(versions)]


@pytest.fixture
def shared_data() -> Path:
    """The real microscope stacks beside the project; skip where absent."""
    path = SHARED / "data"
    if not (path / "pc12-unreg.tif").exists():
        pytest.skip("../shared/data is not present on this machine")
    return path


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A ZeroMQ context whose sockets are all closed with linger 0 at the end."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)
