"""``stagelock register``: offline registration of a saved TIFF/OME-TIFF stack."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ._common import CliError, add_verbosity

__all__ = ["add_commands", "parse_roi"]


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """``"X,Y,W,H"`` → a tuple of four ints."""
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(
            f"--roi must be X,Y,W,H (4 integers); got {text!r}"
        )
    x, y, w, h = values
    return x, y, w, h


def _run(args: argparse.Namespace) -> int:
    from stagelock.stacks import register_file

    input_path = Path(args.input)
    if args.example:
        input_path = _make_example(Path(args.input))
    shifts_csv = (
        Path(args.shifts) if args.shifts else input_path.with_suffix(".shifts.csv")
    )
    try:
        shifts = register_file(
            input_path,
            output=Path(args.output) if args.output else None,
            shifts_csv=shifts_csv,
            roi=args.roi,
            reference=args.reference,
            channel=args.channel,
            max_shift_px=args.max_shift_px,
            progress=not args.no_progress,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    ok = np.isfinite(shifts[:, 0])
    print(f"registered {len(shifts)} frames of {input_path} ({ok.sum()} measured)")
    if ok.any():
        print(
            f"drift range: dx {np.nanmin(shifts[:, 0]):+.2f}.."
            f"{np.nanmax(shifts[:, 0]):+.2f} px, dy {np.nanmin(shifts[:, 1]):+.2f}.."
            f"{np.nanmax(shifts[:, 1]):+.2f} px"
        )
    print(f"shifts: {shifts_csv}")
    if args.output:
        print(f"aligned stack: {args.output}")
    return 0 if ok.any() else 1


def _make_example(path: Path) -> Path:
    """Write the bundled example stack (a drifting real sample) to ``path``."""
    import tifffile

    from stagelock.sim import CameraNoise, drifting_stack, random_drift

    truth = random_drift(40, creep_px_per_frame=(0.15, -0.1), walk_px=0.2, seed=7)
    stack = drifting_stack(truth, shape=(256, 256), noise=CameraNoise(peak_photons=500))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    truth_path = path.with_suffix(".truth.csv")
    np.savetxt(
        truth_path,
        np.column_stack([np.arange(len(truth)), truth]),
        delimiter=",",
        header="frame,dx_px,dy_px",
        comments="",
        fmt=["%d", "%.4f", "%.4f"],
    )
    print(f"wrote example stack {path} (40 frames, truth in {truth_path})")
    return path


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``stagelock register``."""
    p = subparsers.add_parser(
        "register",
        help="register a saved TIFF/OME-TIFF stack (shifts CSV, aligned stack)",
        description=(
            "Measure the XY drift of every frame of a TIFF/OME-TIFF stack "
            "(T×Y×X or T×C×Y×X) against a reference, page by page, and write the "
            "shifts as CSV and, with -o, the aligned stack."
        ),
    )
    p.add_argument(
        "input", help="TIFF/OME-TIFF stack (with --example: where to write it)"
    )
    p.add_argument("-o", "--output", help="write the aligned stack here (TIFF)")
    p.add_argument("--shifts", help="shifts CSV (default: INPUT.shifts.csv)")
    p.add_argument("--roi", type=parse_roi, help="template area X,Y,W,H in pixels")
    p.add_argument(
        "--reference",
        choices=("first", "mean", "keyframe"),
        default="first",
        help="first frame, mean of the first 10 frames, or key frames (default: first)",
    )
    p.add_argument(
        "--channel", type=int, default=0, help="channel to register on (T×C×Y×X)"
    )
    p.add_argument(
        "--max-shift-px", type=float, default=50.0, help="capture range (px)"
    )
    p.add_argument(
        "--example",
        action="store_true",
        help="first write the bundled example stack (a drifting real sample) to INPUT",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbosity(p)
    p.set_defaults(func=_run)
