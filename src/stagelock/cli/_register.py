"""``stagelock register``: offline registration of a saved TIFF/OME-TIFF stack."""

from __future__ import annotations

import argparse
import math
import os
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
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(
            f"--roi X,Y must be >= 0 and W,H > 0 (pixels in the frame); got {text!r}"
        )
    return x, y, w, h


def _finite_positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text!r}")
    return value


def _check_writable(path: Path, what: str) -> None:
    """Fail now, before any work, if ``path`` cannot be created as a file."""
    if path.is_dir():
        raise CliError(f"{what} {path} is a directory; give a file name")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise CliError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{what} {path}: directory {parent} is not writable")


def _check_outputs(input_path: Path, output: Path | None, shifts_csv: Path) -> None:
    """Refuse outputs that would destroy the input or each other, or cannot be made."""
    from stagelock.stacks import same_file

    named = [("--shifts", shifts_csv)] + ([("-o", output)] if output else [])
    for flag, path in named:
        if same_file(path, input_path):
            raise CliError(
                f"{flag} {path} is the input file; it would be overwritten "
                "(choose another name)"
            )
    if output is not None and same_file(output, shifts_csv):
        raise CliError(
            f"-o {output} and --shifts {shifts_csv} name the same file; "
            "one would replace the other"
        )
    for flag, path in named:
        _check_writable(path, flag)


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0; got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def _coverage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]; got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    from stagelock.stacks import register_file

    if (
        args.out_dir is not None
        or len(args.input) > 1
        or args.workers is not None
        or args.scheduler is not None
    ):
        return _run_many(args)
    input_path = Path(args.input[0])
    output = Path(args.output) if args.output else None
    shifts_csv = (
        Path(args.shifts) if args.shifts else input_path.with_suffix(".shifts.csv")
    )
    if args.example:
        _check_example_target(input_path)
    elif not input_path.exists():
        raise CliError(f"no such file: {input_path}")
    _check_outputs(input_path, output, shifts_csv)
    if args.example:
        input_path = _make_example(input_path)
    try:
        shifts = register_file(
            input_path,
            output=output,
            shifts_csv=shifts_csv,
            roi=args.roi,
            reference=args.reference,
            channel=args.channel,
            max_shift_px=args.max_shift_px,
            coverage=args.coverage,
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


def _check_example_target(path: Path) -> None:
    """Refuse to write the example over anything that exists."""
    truth = path.with_suffix(".truth.csv")
    for target in (path, truth):
        if target.exists() or target.is_symlink():
            raise CliError(
                f"--example: {target} already exists; it is not overwritten "
                "(remove it or give another INPUT)"
            )
    # the example is the one case where a missing directory is created
    path.resolve().parent.mkdir(parents=True, exist_ok=True)


def _run_many(args: argparse.Namespace) -> int:
    """Many inputs (or a cluster): ``OUT_DIR/<stem>.shifts.csv`` per input.

    Exit status: 0 every input complete; 1 some input had no measurable frame;
    2 a bad command line or an input that could not be registered (each named
    on stderr; the other inputs are still complete).
    """
    import sys

    from rich.console import Console

    from stagelock.batch import register_many, summary_table

    if args.out_dir is None:
        raise CliError("several inputs, --workers and --scheduler need --out-dir DIR")
    for flag, value in (("-o/--output", args.output), ("--shifts", args.shifts)):
        if value:
            raise CliError(f"{flag} names one file; with --out-dir use --aligned")
    if args.example:
        raise CliError("--example writes one stack: give one INPUT and no --out-dir")
    if args.workers is not None and args.scheduler is not None:
        raise CliError("give --workers N or --scheduler ADDR, not both")
    try:
        summaries = register_many(
            args.input,
            Path(args.out_dir),
            workers=args.workers,
            scheduler=args.scheduler,
            memory_limit=args.memory_limit,
            aligned=args.aligned,
            overwrite=args.overwrite,
            chunk_frames=args.chunk_frames,
            reference=args.reference,
            channel=args.channel,
            roi=args.roi,
            max_shift_px=args.max_shift_px,
            coverage=args.coverage,
            progress=False if args.no_progress else None,
        )
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    Console(soft_wrap=True).print(summary_table(summaries))
    failed = [s for s in summaries if s.outcome == "failed"]
    for s in failed:
        print(f"stagelock register: error: {s.path}: {s.error}", file=sys.stderr)
    done = len(summaries) - len(failed)
    print(f"{done} of {len(summaries)} inputs complete in {args.out_dir}")
    if failed:
        return 2
    # as for one input: 1 when an input has no frame with a measured shift
    return 1 if any(math.isnan(s.max_shift_px) for s in summaries) else 0


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
        "input",
        nargs="+",
        help=(
            "TIFF/OME-TIFF stack (with --example: where to write it); with "
            "--out-dir any number of files, globs and directories (OME-Zarr, "
            "Micro-Manager image sequences, ND2/CZI/LIF through bioio)"
        ),
    )
    p.add_argument("-o", "--output", help="write the aligned stack here (TIFF)")
    p.add_argument("--shifts", help="shifts CSV (default: INPUT.shifts.csv)")
    p.add_argument("--roi", type=parse_roi, help="template area X,Y,W,H in pixels")
    p.add_argument(
        "--reference",
        choices=("first", "mean", "keyframe", "previous"),
        default="first",
        help=(
            "first frame, mean of the first 10 frames, key frames, or the previous "
            "frame chained back to frame 0 (default: first)"
        ),
    )
    p.add_argument(
        "--coverage",
        type=_coverage,
        help=(
            "fraction of the frame the sub-pixel fit uses, 0 < C <= 1 (1 = the "
            "whole overlap, most precise; default: the template regions, fastest)"
        ),
    )
    p.add_argument(
        "--channel", type=int, default=0, help="channel to register on (T×C×Y×X)"
    )
    p.add_argument(
        "--max-shift-px",
        type=_finite_positive,
        default=50.0,
        help="capture range (px)",
    )
    p.add_argument(
        "--example",
        action="store_true",
        help="first write the bundled example stack (a drifting real sample) to INPUT",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    many = p.add_argument_group(
        "many or huge stacks (dask.distributed; pip install 'stagelock[dask]')"
    )
    many.add_argument(
        "--out-dir",
        help="write OUT_DIR/<stem>.shifts.csv (and the aligned stack) per input",
    )
    many.add_argument(
        "--aligned",
        nargs="?",
        const="auto",
        choices=("auto", "zarr", "tiff"),
        help=(
            "also write OUT_DIR/<stem>.aligned.ome.zarr or .aligned.tif "
            "(auto: TIFF for TIFF input, OME-Zarr otherwise)"
        ),
    )
    many.add_argument(
        "--workers",
        type=_non_negative,
        help=(
            "start a LocalCluster of N single-threaded workers on 127.0.0.1 (0: in "
            "this process; default: in this process for one chunk, else one per core)"
        ),
    )
    many.add_argument(
        "--scheduler", metavar="ADDR", help="use a running cluster (tcp://HOST:PORT)"
    )
    many.add_argument(
        "--memory-limit", help="per-worker memory limit of the LocalCluster (500MB)"
    )
    many.add_argument(
        "--chunk-frames",
        type=_positive,
        default=200,
        help="frames per task (default: 200)",
    )
    many.add_argument(
        "--overwrite",
        action="store_true",
        help="redo inputs whose outputs are complete (default: skip them)",
    )
    add_verbosity(p)
    p.set_defaults(func=_run)
