"""Closed loop on Micro-Manager's compiled demo devices (mm-test-adapters).

DemoCamera in ``Mode = "Fluorescent Beads"`` renders beads that follow DemoXYStage
(image moves against the stage, 1 px per µm). The bench calibrates (the sign and
scale are found, not given), takes a reference, then bumps the stage behind the
loop's back a few times and lets snap → measure → ``StageLoop.update`` bring the
image back. Prints, per bump: frames to settle below 0.3 px, overshoot %, final
stage error (µm); ``--json`` makes the last line one JSON object.

    python bench/closed_loop_demo.py [--frames 40] [--gain 0.7] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from typing import Any

import numpy as np

from stagelock.config import StageSettings
from stagelock.registration import Registrar
from stagelock.sources import release_core
from stagelock.stage import MMStageDriver, StageLoop, calibrate

CAMERA = "Camera"
XY = "XY"
SETTLED_PX = 0.3
# stage bumps (µm); each image jump is the opposite, in px
BUMPS_UM = [(6.0, -4.0), (-6.0, 4.0), (10.0, 0.0), (0.0, -10.0), (-12.0, -9.0)]


def run_bump(
    core: Any,
    loop: StageLoop,
    registrar: Registrar,
    bump_um: tuple[float, float],
    n_frames: int,
    first_frame: int,
) -> dict[str, Any]:
    """Bump the stage, run ``n_frames`` loop frames, summarise the recovery."""
    # the reference was taken at the loop's start: the image matches it there
    home = loop.start_position_um
    assert home is not None, "run a few loop frames before the first bump"
    corrections_before = loop.n_corrections
    core.setRelativeXYPosition(XY, *bump_um)
    core.waitForDevice(XY)
    t0 = time.perf_counter()
    residuals, times = [], []
    for k in range(n_frames):
        t = time.time()  # before the exposure: a conservative frame time
        est = registrar.measure(core.snap())
        loop.update(first_frame + k, t, est)
        residuals.append((est.dx_px, est.dy_px))
        times.append(time.perf_counter() - t0)
    res = np.array(residuals)
    size = np.hypot(res[:, 0], res[:, 1])
    above = np.flatnonzero(size >= SETTLED_PX)
    settled = int(above[-1]) + 1 if above.size else 0
    jump = -np.asarray(bump_um)
    along = res @ (jump / np.hypot(*jump))
    core.waitForDevice(XY)
    x, y = core.getXYPosition(XY)
    flips = sum(
        int(np.any(np.diff(np.sign(col[np.abs(col) > 0.05])) != 0)) for col in res.T
    )
    return {
        "bump_um": list(bump_um),
        "jump_px": [float(v) for v in res[0]],
        "frames_to_settle": settled if settled < n_frames else None,
        "time_to_settle_s": float(times[settled]) if settled < n_frames else None,
        "overshoot_pct": 100.0 * max(0.0, -float(along.min())) / float(np.hypot(*jump)),
        "sign_alternations": flips,
        "final_residual_px": float(size[-1]),
        "final_stage_error_um": float(math.hypot(x - home[0], y - home[1])),
        "corrections": loop.n_corrections - corrections_before,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="frames per bump")
    parser.add_argument("--gain", type=float, default=0.7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.frames < 2:
        parser.error(f"--frames must be at least 2; got {args.frames}")
    if not 0 < args.gain <= 1:
        parser.error(f"--gain must be in (0, 1]; got {args.gain}")

    from pymmcore_plus import CMMCorePlus

    core = CMMCorePlus()
    try:
        core.loadSystemConfiguration()  # mm-test-adapters' MMConfig_demo.cfg
        core.setProperty(CAMERA, "Mode", "Fluorescent Beads")
        t = time.perf_counter()
        cal = calibrate(core)
        calibration_s = time.perf_counter() - t
        registrar = Registrar(core.snap())
        loop = StageLoop(
            MMStageDriver(core, XY),
            cal,
            StageSettings(feedback=True, gain=args.gain, settle_s=0.0),
        )
        for k in range(5):  # the start position, seen still
            loop.update(k, time.time(), registrar.measure(core.snap()))
        bumps = [
            run_bump(core, loop, registrar, b, args.frames, 5 + i * args.frames)
            for i, b in enumerate(BUMPS_UM)
        ]
    finally:
        release_core(core)
        del core
        gc.collect()

    result: dict[str, Any] = {
        "calibration_px_to_um": [list(row) for row in cal.matrix],
        "calibration_pixel_size_um": cal.pixel_size_um,
        "calibration_rotation_deg": cal.rotation_deg,
        "calibration_flipped": cal.flipped,
        "calibration_residual_px": cal.residual_px,
        "calibration_s": calibration_s,
        "gain": args.gain,
        "bumps": bumps,
    }
    print(
        f"calibration: px_to_um {np.round(cal.px_to_um_matrix, 4).tolist()}, "
        f"pixel {cal.pixel_size_um:.4f} µm, rotation {cal.rotation_deg:.3f}°, "
        f"flip {cal.flipped}, residual {cal.residual_px:.4f} px, {calibration_s:.2f} s"
    )
    print(
        f"{'bump µm':>14} {'jump px':>16} {'frames':>6} {'settle s':>8} "
        f"{'overshoot %':>11} {'alt':>3} {'moves':>5} {'final px':>8} "
        f"{'stage err µm':>12}"
    )
    for b in bumps:
        frames = "-" if b["frames_to_settle"] is None else b["frames_to_settle"]
        secs = "-" if b["time_to_settle_s"] is None else f"{b['time_to_settle_s']:.3f}"
        print(
            f"{tuple(b['bump_um'])!s:>14} "
            f"({b['jump_px'][0]:6.2f}, {b['jump_px'][1]:6.2f}) {frames:>6} "
            f"{secs:>8} {b['overshoot_pct']:11.2f} {b['sign_alternations']:3d} "
            f"{b['corrections']:5d} {b['final_residual_px']:8.3f} "
            f"{b['final_stage_error_um']:12.3f}"
        )
    ok = all(
        b["frames_to_settle"] is not None
        and b["overshoot_pct"] <= 10.0
        and b["sign_alternations"] == 0
        and b["final_stage_error_um"] < 0.3
        for b in bumps
    )
    result["pass"] = ok
    print("PASS" if ok else "FAIL")
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
