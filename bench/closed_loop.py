"""Closed-loop acceptance on the simulated microscope (pymmcore-plus UniMMCore).

Scenario: 1 px/s creep plus a random walk; a control run without feedback, then
the same microscope with feedback, with a 10 px bump injected mid-run. Prints the
numbers; ``--json`` makes the last line one JSON object. Writes
``bench/results/closed_loop.png`` (drift without correction vs residual with
correction).

    python bench/closed_loop.py [--frames 300] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path

import numpy as np

from stagelock.sim import create_simulated_core, run_simulated, summarize

HERE = Path(__file__).resolve().parent

PIXEL_UM = 0.5
SETTINGS = {
    "shape_px": (256, 256),
    "pixel_size_um": PIXEL_UM,
    "rotation_deg": 15.0,
    "flip_y": True,
    "creep_um_per_s": (0.8 * PIXEL_UM, 0.6 * PIXEL_UM),  # 1 px/s
    "random_walk_um_per_sqrt_s": 0.03,
    "stage_speed_um_per_s": 200.0,
    "stage_settle_ms": 20.0,
    "stage_step_um": 0.02,
    "backlash_um": 0.1,
    "exposure_ms": 10.0,
    "seed": 1,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--interval-s", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--plot", type=Path, default=HERE / "results" / "closed_loop.png"
    )
    args = parser.parse_args()
    bump = int(args.frames * 0.6)
    traces = {}
    for feedback in (False, True):
        core = create_simulated_core(SETTINGS)
        try:
            traces[feedback] = run_simulated(
                core,
                args.frames,
                feedback=feedback,
                interval_s=args.interval_s,
                bump_frame=bump if feedback else None,
                bump_px=(10.0, 0.0),
            )
        finally:
            del core
            gc.collect()
    open_loop, closed = traces[False], traces[True]
    result = dict(summarize(closed))
    result["open_loop_drift_px"] = float(np.hypot(*open_loop.true_px[-1]))
    result["duration_s"] = float(closed.time_s[-1])
    result["frames"] = args.frames
    result["frame_interval_s"] = float(np.median(np.diff(closed.time_s)))
    steady = closed.true_px[20:bump]
    result["residual_rms_before_bump_px"] = float(
        np.sqrt(np.mean(np.sum(steady**2, 1)))
    )
    _plot(open_loop, closed, args.plot)
    for key, value in result.items():
        print(f"{key:28s} {value}")
    ok = (
        result["residual_rms_px"] <= 0.3
        and result["overshoot_pct"] <= 10
        and not result["oscillating"]
        and math.isfinite(result["residual_rms_px"])
    )
    print("PASS" if ok else "FAIL")
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


def _plot(open_loop, closed, path: Path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, i, name in zip(axes, (0, 1), ("x", "y"), strict=True):
        ax.plot(open_loop.time_s, open_loop.true_px[:, i], label="drift, no feedback")
        ax.plot(closed.time_s, closed.true_px[:, i], label="residual, feedback on")
        for c in closed.corrections:
            ax.axvline(c.time - closed.t0_s, color="0.85", lw=0.5, zorder=0)
        ax.set_ylabel(f"d{name} (px)")
        ax.grid(alpha=0.3)
    if closed.bump_frame is not None:
        axes[0].annotate(
            "10 px bump",
            (closed.time_s[closed.bump_frame], 10),
            xytext=(5, -5),
            textcoords="offset points",
        )
    axes[0].legend(loc="upper left")
    axes[1].set_xlabel("time (s); grey lines: stage corrections")
    fig.suptitle("stagelock closed loop on the simulated microscope (1 px/s creep)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
