"""``stagelock calibrate`` and ``stagelock demo``: the closed loop from the shell."""

from __future__ import annotations

import argparse  # noqa: TC003 - used at run time by add_commands callers
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CliError, add_verbosity, keep_log_level

if TYPE_CHECKING:
    from stagelock.config import StageSettings

__all__ = ["add_commands"]


def add_commands(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``calibrate`` and ``demo``."""
    cal = subparsers.add_parser(
        "calibrate",
        help="measure the camera-to-stage transform (pixel size, rotation, flip)",
        description=(
            "Move the XY stage in a small pattern, measure the image shifts and write "
            "the camera-to-stage calibration as TOML. Uses the simulated microscope "
            "unless the config's source.kind is 'micromanager'."
        ),
    )
    cal.add_argument("--config", type=Path, help="stagelock TOML configuration")
    cal.add_argument("--step-um", type=float, help="pattern step (default: probed)")
    cal.add_argument(
        "--pattern", choices=("cross", "grid"), help="stage pattern (default cross)"
    )
    cal.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("calibration.toml"),
        help="output file",
    )
    add_verbosity(cal)
    cal.set_defaults(func=_calibrate)

    demo = subparsers.add_parser(
        "demo",
        help="closed-loop drift correction on the simulated microscope",
        description=(
            "Run the simulated microscope with stage feedback and print the drift "
            "without correction next to the residual with correction."
        ),
    )
    demo.add_argument("--frames", type=int, default=200, help="frames to acquire")
    demo.add_argument(
        "--no-feedback", action="store_true", help="measure only (control run)"
    )
    demo.add_argument("--interval-s", type=float, default=0.05, help="frame period")
    demo.add_argument("--every", type=int, default=10, help="print every N frames")
    add_verbosity(demo)
    demo.set_defaults(func=_demo)


def _load(config_path: Path | None) -> tuple[Any, StageSettings]:
    from stagelock.config import StageSettings

    if config_path is None:
        return None, StageSettings()
    from stagelock.config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    stage = getattr(config, "stage", None)
    return config, stage if isinstance(stage, StageSettings) else StageSettings()


def _open_core(config: Any) -> Any:
    """Open the simulated core, or the config's Micro-Manager core."""
    kind = "simulated" if config is None else config.source.kind
    if kind not in ("simulated", "micromanager"):
        raise CliError(
            f"calibration needs a camera and a stage; source.kind is {kind!r}"
        )
    with keep_log_level():
        from stagelock.sim import create_simulated_core
        from stagelock.sources import open_core
    if kind == "micromanager":
        try:
            return open_core(config.source.micromanager)
        except RuntimeError as exc:
            raise CliError(f"source.micromanager: {exc}") from None
    settings = None if config is None else config.simulation.microscope_settings()
    return create_simulated_core(settings)


def _calibrate(args: argparse.Namespace) -> int:
    from stagelock.sources import release_core
    from stagelock.stage import CalibrationError, calibrate

    config, stage = _load(args.config)
    opts = stage.calibration
    if args.step_um is not None and not args.step_um > 0:
        raise CliError(f"--step-um must be > 0; got {args.step_um}")
    core = _open_core(config)
    try:
        # the [stage.calibration] keys are calibrate()'s keyword arguments
        options = opts.model_dump()
        if args.step_um is not None:
            options["step_um"] = args.step_um
        if args.pattern:
            options["pattern"] = args.pattern
        cal = calibrate(core, device=stage.device, **options)
    except (CalibrationError, ValueError, TimeoutError) as exc:
        raise CliError(str(exc)) from None
    finally:
        release_core(core)
    path = cal.to_file(args.output)
    print(
        f"pixel size {cal.pixel_size_um:.4f} µm, rotation {cal.rotation_deg:.2f}°, "
        f"flip {'yes' if cal.flipped else 'no'}, residual {cal.residual_px:.3f} px "
        f"({cal.n_points} images) -> {path}"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    with keep_log_level():
        from stagelock.sim import (
            DemoTrace,
            create_simulated_core,
            run_simulated,
            summarize,
        )
        from stagelock.sources import release_core

    if args.frames < 2:
        raise CliError(f"--frames must be >= 2; got {args.frames}")
    feedback = not args.no_feedback
    # a fast creep (~0.5 px/s) so the open-loop drift is obvious within seconds
    core: Any = create_simulated_core(
        {
            "shape_px": (256, 256),
            "creep_um_per_s": (0.3, -0.2),
            "random_walk_um_per_sqrt_s": 0.05,
        }
    )
    print(
        "frame   time_s  drift_px(x, y)        residual_px(x, y)    stage_um(x, y)",
        file=sys.stdout,
    )

    def show(k: int, trace: DemoTrace) -> None:
        if k % max(1, args.every) and k != args.frames - 1:
            return
        scope = core.simulation
        t = trace.time_s[-1]
        # the drift alone: what the image would show without any stage motion
        d = scope.image_shift_px(scope.true_drift_um())
        r = trace.true_px[-1]
        s = trace.stage_um[-1]
        print(
            f"{k:5d} {t:8.2f}  ({d[0]:+7.2f}, {d[1]:+7.2f})    "
            f"({r[0]:+6.2f}, {r[1]:+6.2f})     ({s[0]:+7.2f}, {s[1]:+7.2f})",
            flush=True,
        )

    try:
        trace = run_simulated(
            core,
            args.frames,
            feedback=feedback,
            interval_s=args.interval_s,
            on_frame=show,
        )
    finally:
        release_core(core)
    result = summarize(trace, lock_frames=min(20, args.frames // 2))
    rms = result["residual_rms_px"]
    final = float(np.hypot(*trace.true_px[-1]))
    label = "residual" if feedback else "drift (no feedback)"
    print(
        f"{label}: RMS {rms:.3f} px after lock, final {final:.2f} px; "
        f"{result['n_corrections']} corrections, "
        f"max travel {result['max_travel_um']:.2f} µm"
        if math.isfinite(rms)
        else f"{label}: final {final:.2f} px"
    )
    return 0
