"""Where coverage 1.0 loses to the Cramér-Rao bound: a decomposition per movie.

For each movie (frame 0 redrawn ``--draws`` times, as in ``reference_draws.py``)
it measures the whole-frame fit (:class:`stagelock.registration.FrameFit`,
started 0.1 px from the truth, so only the sub-pixel estimator is judged) as
RMS / bound:

- ``single-image σ=1``: the noise model estimated from the reference alone,
  kept (the engine before 2026-12-03);
- ``learnt σ=1``: FrameFit's default, the model fitted once to the first
  frame's residuals;
- ``learnt auto``: that, and the pre-blur the reference's spectrum predicts
  best (``smooth_sigma_px="auto"``, the engine's default);
- ``camera σ=s``: the camera's true noise model, pre-blur ``s`` px;

and, from the noiseless frame 0 alone, what a linearised estimator with
spectral weight ``W(k)`` can reach under white noise of the frame's mean
variance (both images noisy):
``Var = Σ W² k² (2|S|²σ² + σ⁴) / (Σ W k² |S|²)²``; ``theory opt`` is the
Wiener-type optimum ``W = |S|² / (2|S|²σ² + σ⁴)``, ``theory σ=s`` the Gaussian
pre-blur ``W = |G_s|²`` (the blur of both images).

It also prints the noise models (single-image, learnt, camera) and the σ that
auto chose. Numbers settle what to build next: a measured gap between
``camera`` and ``theory`` is estimator loss beyond the blur and the noise model.

    OMP_NUM_THREADS=1 python bench/efficiency_gap.py --draws 3

Writes ``bench/results/efficiency_gap.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _movies as movies  # noqa: E402
import numpy as np  # noqa: E402
import reference_draws as rd  # noqa: E402

DEFAULT_MOVIES = (
    "cell-512-p500,cell-512-p50,spots-512-p5000,spots-512-p500,lattice-512-p5000"
)
SIGMAS = (0.75, 1.0, 1.5)


def camera_noise_model() -> Any:
    """The bench camera's noise in ADU²: ``(ADU - offset) / gain + read² / gain²``."""
    from stagelock.registration._fullframe import NoiseModel
    from stagelock.sim import CameraNoise

    cam = CameraNoise(peak_photons=1.0)
    g, r = cam.gain_e_per_adu, cam.read_noise_e
    return NoiseModel(
        1.0 / g,
        -cam.offset_adu / g + r * r / (g * g),
        (cam.background_photons + r * r) / (g * g),
    )


def fit_ratio(
    movie: np.ndarray,
    truth: np.ndarray,
    refs: list[np.ndarray],
    bound: float,
    sigma: float | str,
    noise: Any,
) -> tuple[float, Any]:
    """RMS-combined RMS / bound of FrameFit over the reference draws, and the
    fit of the movie's own reference (draw 0).

    ``noise``: a NoiseModel, None (FrameFit learns it from the first frame), or
    "single" (the single-image estimate of each reference, kept).
    """
    from stagelock.registration._fullframe import FrameFit, estimate_noise

    ratios, first = [], None
    for ref in refs:
        model = estimate_noise(ref) if noise == "single" else noise
        fit = FrameFit(ref, coverage=1.0, smooth_sigma_px=sigma, noise=model)
        first = first or fit
        est = np.zeros((len(movie), 2))
        for i in range(1, len(movie)):
            dx, dy = truth[i] - truth[0]
            sol = fit.refine(movie[i], dy + 0.1, dx - 0.1)
            est[i] = (np.nan, np.nan) if sol is None else (sol.d_col, sol.d_row)
        ratios.append(rd.rms_px(est, truth) / bound)
    return float(np.sqrt(np.mean(np.square(ratios)))), first


def theory(spec: movies.MovieSpec) -> dict[str, float]:
    """Linearised-estimator RMS / bound per spectral weight (white-noise model)."""
    img, var = movies.frame0_expected(spec)
    ext = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])
    s2 = np.abs(np.fft.fft2(ext - ext.mean())) ** 2
    n2 = float(var.mean()) * ext.size  # white noise power per mode
    ky = 2 * np.pi * np.fft.fftfreq(ext.shape[0])[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(ext.shape[1])[None, :]
    k2 = kx * kx

    def variance(weight: np.ndarray) -> float:
        num = float(np.sum(weight**2 * k2 * (2 * s2 * n2 + n2 * n2)))
        return num / float(np.sum(weight * k2 * s2)) ** 2

    limit = 2 * n2 / float(np.sum(k2 * s2))
    out = {"theory opt": np.sqrt(variance(s2 / (2 * s2 * n2 + n2 * n2)) / limit)}
    for sigma in SIGMAS:
        blur2 = np.exp(-(kx**2 + ky**2) * sigma**2)
        out[f"theory σ={sigma:g}"] = np.sqrt(variance(blur2) / limit)
    return {k: float(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movies", default=DEFAULT_MOVIES)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--data-dir", type=Path, default=movies.default_data_dir())
    ap.add_argument("--out", type=Path, default=HERE / "results" / "efficiency_gap")
    args = ap.parse_args(argv)
    import cv2

    from stagelock.registration._fullframe import estimate_noise

    cv2.setNumThreads(1)
    wanted = args.movies.split(",")
    specs = [s for s in movies.suite([512], False)["main"] if s.name in wanted]
    camera = camera_noise_model()
    started = time.time()
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        movie, truth, _meta = movies.ensure(spec, args.data_dir, log=print)
        bound_row = movies.movie_bound(spec)
        assert bound_row is not None
        bound = bound_row["rms_px"]
        rng = np.random.default_rng(movies.seed_of("reference-draws", spec.name))
        refs = [np.asarray(movie[0], np.float32)] + [
            rd.redraw_reference(spec, truth[0], rng).astype(np.float32)
            for _ in range(args.draws - 1)
        ]
        est = estimate_noise(refs[0])
        row: dict[str, Any] = {"bound_px": bound}
        row["single-image σ=1"] = fit_ratio(movie, truth, refs, bound, 1.0, "single")[0]
        row["learnt σ=1"], learnt = fit_ratio(movie, truth, refs, bound, 1.0, None)
        row["learnt auto"], auto = fit_ratio(movie, truth, refs, bound, "auto", None)
        for sigma in SIGMAS:
            row[f"camera σ={sigma:g}"] = fit_ratio(
                movie, truth, refs, bound, sigma, camera
            )[0]
        row.update(theory(spec))
        row["auto σ"] = auto.sigma
        row["noise estimated"] = [est.alpha, est.beta, est.floor]
        model = learnt.noise
        row["noise learnt"] = [model.alpha, model.beta, model.floor]
        row["noise camera"] = [camera.alpha, camera.beta, camera.floor]
        rows[spec.name] = row
        print(spec.name, {k: v for k, v in row.items() if isinstance(v, float)})
    results = {
        "run": {
            "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "draws": args.draws,
            "wall_s": round(time.time() - started, 1),
        },
        "movies": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(results) + "\n")
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    """The markdown table: RMS / bound per variant, and the two noise models."""
    rows = results["movies"]
    if not rows:
        return "no movies"
    first = next(iter(rows.values()))
    keys = [
        k
        for k, v in first.items()
        if isinstance(v, float) and k not in ("bound_px", "auto σ")
    ]
    run = results["run"]
    lines = [
        f"Run {run['utc']}, {run['draws']} draws of frame 0 per movie, "
        f"wall {run['wall_s']} s. RMS / Cramér-Rao bound.",
        "",
        "| movie | bound px | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for name, row in rows.items():
        cells = [f"{row[k]:.2f}" for k in keys]
        lines.append(f"| {name} | {row['bound_px']:.4f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Noise model (alpha, beta, floor) of the movie's own reference:",
        "",
        "| movie | single-image estimate | learnt (first frame) | camera | auto σ |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        models = [
            ", ".join(f"{v:.4g}" for v in row[f"noise {kind}"])
            for kind in ("estimated", "learnt", "camera")
        ]
        lines.append(f"| {name} | " + " | ".join(models) + f" | {row['auto σ']:g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
