"""The per-position MDA lock on the simulated microscope: residuals with and without.

Scenario: a useq MDA with 3 positions ~407 µm apart, 2 channels, 24 time points
one simulated minute apart (the drift runs on an :class:`~stagelock.sim.EventClock`,
so the run takes seconds), camera rotated 12° and mirrored against the stage,
thermal creep of 0.02 µm/s plus a small random walk (~27 px over the run at
1 µm/px). The lock is calibrated at the start position (``attach(core,
feedback=True)`` with no calibration). Reported per position: true residual RMS
and max from time point 6 on, with and without the lock; corrections; what the
lock added to each event's ``setup_event``. With ``--z`` every position is a
3-plane z-stack (the lock measures the middle plane of the first channel).

Writes ``bench/results/mda_lock.json`` and ``bench/results/mda_lock.md``.

    python bench/mda_lock.py [--shape 256] [--z]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import useq

from stagelock import attach
from stagelock.sim import EventClock, MDATrial, create_simulated_core, run_mda_trial
from stagelock.sources import release_core

RESULTS = Path(__file__).resolve().parent / "results"
FROM_T = 6

POSITIONS = [
    {"x": 0.0, "y": 235.0, "name": "A"},
    {"x": -203.5, "y": -117.5, "name": "B"},
    {"x": 203.5, "y": -117.5, "name": "C"},
]


def settings(shape: int) -> dict[str, Any]:
    """Microscope settings of the scenario."""
    return {
        "shape_px": [shape, shape],
        "pixel_size_um": 1.0,
        "rotation_deg": 12.0,
        "flip_x": True,
        "creep_um_per_s": [0.02, -0.012],
        "random_walk_um_per_sqrt_s": 0.002,
        "exposure_ms": 2.0,
        "stage_speed_um_per_s": 50_000.0,
        "stage_settle_ms": 1.0,
        "peak_photons": 2000.0,
        "world_pad_px": (1536 - shape) // 2,
        "seed": 4,
    }


def sequence(z: bool) -> useq.MDASequence:
    """The MDA of the scenario."""
    return useq.MDASequence(
        stage_positions=POSITIONS,
        channels=["DAPI", "FITC"],
        time_plan={"interval": 0, "loops": 24},
        z_plan={"range": 2.0, "step": 1.0} if z else None,
        axis_order="tpcz",
    )


def run(shape: int, z: bool, lock: bool) -> MDATrial:
    """One acquisition, with or without the lock."""
    clock = EventClock(interval_s=60.0, position_s=5.0)
    core = create_simulated_core(settings(shape), clock=clock)
    try:
        core.mda.events.eventStarted.connect(clock.on_event)
        for preset in ("DAPI", "FITC"):
            core.defineConfig("Channel", preset)
        core.setChannelGroup("Channel")
        if not lock:
            return run_mda_trial(core, sequence(z))
        with attach(core, feedback=True, clock=clock, max_shift_px=40) as handle:
            return run_mda_trial(core, sequence(z), handle)
    finally:
        release_core(core)
        del core
        gc.collect()


def stats(trial: MDATrial, *, uncorrected: bool = False) -> dict[str, Any]:
    """Residual RMS / max per position from time point ``FROM_T``."""
    out = {}
    for p in trial.positions():
        r = trial.residuals(p, from_t=FROM_T, uncorrected=uncorrected)
        out[POSITIONS[p]["name"]] = {
            "rms_px": round(float(np.sqrt(np.mean(r**2))), 4),
            "max_px": round(float(r.max()), 4),
        }
    return out


def main() -> None:
    """Run the scenario and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=256)
    parser.add_argument("--z", action="store_true", help="3-plane z-stacks")
    args = parser.parse_args()
    logging.getLogger("pymmcore-plus").setLevel(logging.WARNING)
    free = run(args.shape, args.z, lock=False)
    locked = run(args.shape, args.z, lock=True)
    timing = locked.setup_timing
    assert timing is not None
    result = {
        "scenario": {
            "positions": 3,
            "spacing_um": 407,
            "channels": 2,
            "z_planes": 3 if args.z else 1,
            "time_points": 24,
            "interval_s_simulated": 60,
            "frame_px": args.shape,
            "residuals_from_t": FROM_T,
            "frames": len(locked.frames),
        },
        "without_lock": stats(free),
        "with_lock": stats(locked),
        "drift_over_run_px": {
            POSITIONS[p]["name"]: round(float(free.residuals(p).max()), 2)
            for p in free.positions()
        },
        "corrections": locked.n_corrections,
        "setup_event_added_ms": {
            "n_events": timing.n_events,
            "mean": round(timing.mean_ms, 3),
            "median": round(timing.median_ms, 3),
            "p95": round(timing.p95_ms, 3),
            "max": round(timing.max_ms, 3),
            "cpu_mean": round(timing.cpu_mean_ms, 3),
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_z" if args.z else ""
    (RESULTS / f"mda_lock{suffix}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# MDA lock{' (z-stacks)' if args.z else ''}: "
        f"{len(locked.frames)} frames, residual from t = {FROM_T}",
        "",
        "| position | without lock RMS / max (px) | with lock RMS / max (px) |",
        "|---|---|---|",
    ]
    for name, w in result["with_lock"].items():
        f = result["without_lock"][name]
        lines.append(
            f"| {name} | {f['rms_px']:.2f} / {f['max_px']:.2f} | "
            f"{w['rms_px']:.3f} / {w['max_px']:.3f} |"
        )
    s = result["setup_event_added_ms"]
    lines += [
        "",
        f"corrections: {result['corrections']}; setup_event added "
        f"{s['median']:.3f} ms median, {s['mean']:.3f} mean, {s['p95']:.3f} p95, "
        f"{s['max']:.3f} max wall clock ({s['cpu_mean']:.3f} ms CPU) over "
        f"{s['n_events']} events; load average {result['load_average']} on "
        f"{result['cpus']} CPUs",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"mda_lock{suffix}.md").write_text(text)
    print(text)
    if not all(math.isfinite(v["max_px"]) for v in result["with_lock"].values()):
        raise SystemExit("non-finite residual")


if __name__ == "__main__":
    main()
