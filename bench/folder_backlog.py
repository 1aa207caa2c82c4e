"""Folder source: backlog speed and idle CPU with thousands of old files (issue 11/17).

Compares the FolderSource of a git revision (default the re-layout commit,
before the fix) with the working tree's. Writes bench/results/folder_backlog.json.

    python bench/folder_backlog.py [--files 3000] [--before-rev 9ad9d93]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_folder_module(rev: str | None) -> object:
    if rev is None:
        from stagelock.sources import _folder

        return _folder
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/stagelock/sources/_folder.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "stagelock_folder_before.py"
    path.write_text(
        src.replace("from ._protocol import", "from stagelock.sources._protocol import")
    )
    spec = importlib.util.spec_from_file_location("stagelock_folder_before", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_files(folder: Path, n: int) -> None:
    img = np.random.default_rng(0).integers(0, 4000, (64, 64), dtype=np.uint16)
    old = time.time() - 3600
    for i in range(n):
        p = folder / f"img_{i:05d}.tif"
        tifffile.imwrite(p, img)
        os.utime(p, (old, old))


def backlog(mod: object, folder: Path, n: int, limit_s: float) -> float:
    frames: list[object] = []
    src = mod.FolderSource(folder, from_start=True)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    src.start(frames.append)
    while len(frames) < n and time.perf_counter() - t0 < limit_s:
        time.sleep(0.05)
    dt = time.perf_counter() - t0
    src.stop()
    return len(frames) / dt


def idle_cpu(mod: object, folder: Path, seconds: float) -> float:
    src = mod.FolderSource(folder, from_start=False)  # type: ignore[attr-defined]
    src.start(lambda f: None)
    time.sleep(1.0)
    c0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    frac = (time.process_time() - c0) / (time.perf_counter() - t0)
    src.stop()
    return frac


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--before-rev", default="9ad9d93")
    ap.add_argument("--limit-s", type=float, default=40.0)
    args = ap.parse_args()
    results = {"files": args.files, "load_avg": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_files(folder, args.files)
        for label, rev in (("before", args.before_rev), ("after", None)):
            mod = load_folder_module(rev)
            results[f"{label}_backlog_files_per_s"] = round(
                backlog(mod, folder, args.files, args.limit_s), 1
            )
            results[f"{label}_idle_cpu_fraction"] = round(idle_cpu(mod, folder, 5.0), 4)
            print(label, results, flush=True)
    out = HERE / "results" / "folder_backlog.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
