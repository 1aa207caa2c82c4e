"""RMS / Cramér-Rao bound over many draws of the reference's noise.

A movie's RMS error against its own noisy frame 0 shares one draw of that frame's
noise between all its frames: with a dozen frames the per-movie ratio to the bound
(which averages over the reference's noise too) is mostly that one draw. Here
frame 0 of every noisy movie of the suite is redrawn ``--draws`` times from its
noiseless content and the camera model (frames 1..T-1 stay as they are), every
tool registers each variant, and the table gives per movie and tool the median
and the RMS-combined ratio ``sqrt(mean(ratio²))`` over the draws; the latter is
the one the bound speaks to. Draw 0 is the movie's own frame 0.

    python bench/reference_draws.py --quick --draws 12
    python bench/reference_draws.py --sizes 512 --draws 8 --tools stagelock_c1

Writes ``bench/results/reference_draws.json`` and ``.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _movies as movies  # noqa: E402
import _peers as peers  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_TOOLS = "stagelock,stagelock_c1,pystackreg,skimage_pcc"


def redraw_reference(
    spec: movies.MovieSpec, truth0: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A fresh noisy frame 0: the movie's noiseless frame 0, a new camera draw."""
    from stagelock.sim import CameraNoise

    canvas, _factor = movies.make_canvas(spec.image, spec.size)
    clean = movies.Shifter(canvas, spec.size)(float(truth0[0]), float(truth0[1]))
    noise = CameraNoise(peak_photons=movies.LEVELS[spec.level])
    return np.asarray(noise.expose(np.clip(clean, 0.0, None), rng))


STATUS_SETTINGS = {"stagelock": None, "stagelock_c1": 1.0}
"""stagelock's settings whose statuses are checked: name -> coverage."""


def false_oks(
    movie: np.ndarray, truth: np.ndarray, coverage: float | None
) -> tuple[int, int]:
    """Frames 1..T-1 reported ``ok`` but > 0.5 px off, and frames reported ok."""
    from stagelock import iter_estimates

    bad = ok = 0
    for i, est in enumerate(
        iter_estimates(movie, coverage=coverage, max_shift_px=peers.MAX_SHIFT_PX)
    ):
        if i == 0 or not est.ok:
            continue
        ok += 1
        dx, dy = truth[i] - truth[0]
        bad += bool(np.hypot(est.dx_px - dx, est.dy_px - dy) > 0.5)
    return bad, ok


def rms_px(est: np.ndarray, truth: np.ndarray) -> float:
    err = est[1:] - (truth[1:] - truth[0])
    return float(np.sqrt(np.nanmean(np.sum(err**2, axis=1))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 192-256 px suite")
    ap.add_argument("--sizes", default="512", help="comma list of frame sizes")
    ap.add_argument("--draws", type=int, default=12)
    ap.add_argument("--tools", default=DEFAULT_TOOLS)
    ap.add_argument("--movies", help="comma list of substrings of movie names")
    ap.add_argument("--data-dir", type=Path, default=movies.default_data_dir())
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reference_draws")
    args = ap.parse_args(argv)
    # one thread, like the bench's accuracy pass
    import cv2

    cv2.setNumThreads(1)
    tools = {n: peers.TOOLS[n] for n in args.tools.split(",")}
    sizes = [int(s) for s in args.sizes.split(",")]
    specs = [
        s
        for s in movies.suite(sizes, args.quick)["main"]
        if s.level in movies.LEVELS
        and (not args.movies or any(m in s.name for m in args.movies.split(",")))
    ]
    started = time.time()
    results: dict[str, Any] = {
        "run": {
            "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "draws": args.draws,
            "versions": {n: t.version() for n, t in tools.items()},
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        },
        "movies": {},
    }
    for spec in specs:
        movie, truth, _meta = movies.ensure(spec, args.data_dir, log=print)
        bound = movies.movie_bound(spec)
        assert bound is not None
        rng = np.random.default_rng(movies.seed_of("reference-draws", spec.name))
        ratios: dict[str, list[float]] = {n: [] for n in tools}
        # stagelock's own verdict on each frame: a frame > 0.5 px off must not
        # be reported ok
        false_ok = dict.fromkeys(STATUS_SETTINGS, 0)
        n_ok = dict.fromkeys(STATUS_SETTINGS, 0)
        for draw in range(args.draws):
            variant = np.array(movie)
            if draw:
                variant[0] = redraw_reference(spec, truth[0], rng)
            for name, tool in tools.items():
                if tool.stack is not None:
                    est = tool.stack(variant)
                else:
                    assert tool.prepare is not None
                    step = tool.prepare(variant[0])
                    est = np.array([step(f) for f in variant], dtype=np.float64)
                ratios[name].append(rms_px(est, truth) / bound["rms_px"])
            for label, coverage in STATUS_SETTINGS.items():
                bad, ok = false_oks(variant, truth, coverage)
                false_ok[label] += bad
                n_ok[label] += ok
        row = {
            "bound_px": bound["rms_px"],
            "tools": {
                n: {
                    "own_reference": r[0],
                    "median": float(np.median(r)),
                    "rms_combined": float(np.sqrt(np.mean(np.square(r)))),
                    "min": float(np.min(r)),
                    "max": float(np.max(r)),
                }
                for n, r in ratios.items()
            },
            "false_ok": {
                k: {"frames": false_ok[k], "of_ok": n_ok[k]} for k in STATUS_SETTINGS
            },
        }
        results["movies"][spec.name] = row
        print(
            spec.name,
            " ".join(f"{n} {v['rms_combined']:.2f}" for n, v in row["tools"].items()),
            flush=True,
        )
    results["run"]["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(results) + "\n")
    print(render(results))
    return 0


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render(results: dict[str, Any]) -> str:
    run = results["run"]
    names = (
        list(next(iter(results["movies"].values()))["tools"])
        if results["movies"]
        else []
    )
    lines = [
        f"Run {run['utc']} on {run['platform']}, Python {run['python']}, "
        f"{run['draws']} draws of frame 0's noise per movie (draw 0: the movie's "
        f"own), wall {run.get('wall_s', '?')} s. Versions: "
        + ", ".join(f"{n} {v}" for n, v in run["versions"].items())
        + ".",
        "",
        "RMS / Cramér-Rao bound: RMS-combined over the draws (median; the movie's "
        "own reference; min-max).",
        "",
    ]
    ratios = [
        [
            movie,
            f"{row['bound_px']:.4f}",
            *(
                f"**{t['rms_combined']:.2f}** ({t['median']:.2f}; "
                f"{t['own_reference']:.2f}; {t['min']:.2f}-{t['max']:.2f})"
                for t in row["tools"].values()
            ),
        ]
        for movie, row in results["movies"].items()
    ]
    lines += md_table(["movie", "bound px", *names], ratios)
    lines += [
        "",
        "Frames reported `ok` but more than 0.5 px off (of the frames reported ok), "
        "over all draws:",
        "",
    ]
    false_ok = [
        [movie, *(f"{v['frames']} of {v['of_ok']}" for v in row["false_ok"].values())]
        for movie, row in results["movies"].items()
    ]
    lines += md_table(["movie", *STATUS_SETTINGS], false_ok)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
