"""stagelock's registration benchmark: accuracy and speed against the peer tools.

Every tool estimates, for each movie, the shift of every frame relative to frame 0
(``dx, dy`` = displacement of the sample, px, ``+x`` = columns, ``+y`` = rows) on
the same movies in the same run.  Movies: real micrographs bundled in installed
packages (scikit-image, stagelock) and the real PC12 stack when present, moved by
exact Fourier sub-pixel drift, with sCMOS noise, bleaching and debris (see
``_movies.py``).  Reported per tool and movie: RMS and max error, frames > 0.5 px
and > 1 px off, NaN frames, frame-0 error, ms/frame with one thread and with the
default threads; per tool: bias vs fractional shift (pixel-locking sweep); for
stagelock: per-frame ``Registrar.measure`` latency (median, p95) and RMS / speed
ratios against the best peer per movie.

Run from the project root::

    python bench/registration.py --quick                 # ~1 min smoke run
    python bench/registration.py                         # full: 512 and 2048 px
    python bench/registration.py --sizes 512 --tools stagelock,pystackreg \\
        --movies 'cell-*' --json /tmp/r.json --md /tmp/r.md
    python bench/registration.py --render bench/results/registration.json

The one-thread pass runs in a subprocess whose environment limits every BLAS /
OpenMP pool to one thread before numpy loads (and calls ``cv2.setNumThreads(1)``);
the default-threads pass runs in a second subprocess for the tools whose speed
depends on OpenCV's pool.  Accuracy comes from the one-thread pass.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _movies as movies
import _peers as peers
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Sequence

HERE = Path(__file__).resolve().parent
ONE_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
)
OFF_PX = (0.5, 1.0)
Row = dict[str, Any]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- running


def run_tool(
    tool: peers.Tool, movie: npt.NDArray[np.generic]
) -> tuple[np.ndarray, Row]:
    """Run one tool on one movie: (estimates (T, 2), timing), after a warm-up."""
    t_count = movie.shape[0]
    warm = movie[: min(2, t_count)]
    if tool.prepare is not None:
        tool.prepare(warm[0])(warm[-1])
    elif tool.stack is not None:
        tool.stack(warm)
    gc.collect()
    gc.disable()  # a collection inside a timed frame is not the tool's cost
    try:
        timing: Row = {"median_ms": None, "p95_ms": None}
        if tool.prepare is not None:
            t0 = time.perf_counter()
            step = tool.prepare(movie[0])
            est = np.empty((t_count, 2))
            dts = np.empty(t_count)
            for i in range(t_count):
                t1 = time.perf_counter()
                est[i] = step(movie[i])
                dts[i] = time.perf_counter() - t1
            total = time.perf_counter() - t0
            timing = {
                "median_ms": 1e3 * float(np.median(dts[1:] if t_count > 1 else dts)),
                "p95_ms": 1e3
                * float(np.percentile(dts[1:] if t_count > 1 else dts, 95)),
            }
        else:
            assert tool.stack is not None
            t0 = time.perf_counter()
            est = tool.stack(movie)
            total = time.perf_counter() - t0
    finally:
        gc.enable()
    est = np.asarray(est, dtype=np.float64)
    if est.shape != (t_count, 2):
        raise ValueError(
            f"{tool.name} returned shape {est.shape}, expected ({t_count}, 2)"
        )
    timing["mean_ms"] = 1e3 * total / t_count
    return est, timing


def metrics(est: np.ndarray, truth: np.ndarray, skip: Sequence[int] = ()) -> Row:
    """Errors over frames 1..T-1 (frame 0 is reported on its own)."""
    err = est - truth
    norm = np.hypot(err[:, 0], err[:, 1])
    n1 = norm[1:]
    finite = np.isfinite(n1)
    keep = np.ones(len(norm), bool)
    keep[0] = False
    keep[list(skip)] = False
    keep &= np.isfinite(norm)
    f = n1[finite]
    return {
        "rms_px": float(np.sqrt(np.mean(f**2))) if f.size else float("nan"),
        "rms_clean_px": float(np.sqrt(np.mean(norm[keep] ** 2)))
        if keep.any()
        else None,
        "max_px": float(f.max()) if f.size else float("nan"),
        "bias_x_px": float(np.nanmean(err[1:, 0])) if f.size else float("nan"),
        "bias_y_px": float(np.nanmean(err[1:, 1])) if f.size else float("nan"),
        "frame0_px": float(norm[0]),
        "n_off_05": int((f > OFF_PX[0]).sum()),
        "n_off_1": int((f > OFF_PX[1]).sum()),
        "n_nan": int((~finite).sum()),
    }


def bad_frames(est: np.ndarray, truth: np.ndarray, limit: int = 12) -> list[Row]:
    """Frames > 0.5 px off or NaN, with estimate and truth (for the lead)."""
    norm = np.hypot(*(est - truth).T)
    idx = [
        i for i in range(len(norm)) if not np.isfinite(norm[i]) or norm[i] > OFF_PX[0]
    ]
    return [
        {
            "frame": i,
            "est": np.round(est[i], 3).tolist(),
            "truth": np.round(truth[i], 3).tolist(),
            "err_px": None if not np.isfinite(norm[i]) else round(float(norm[i]), 3),
        }
        for i in idx[:limit]
    ] + ([{"more": len(idx) - limit}] if len(idx) > limit else [])


def guarded(
    tool: peers.Tool, movie: npt.NDArray[np.generic]
) -> tuple[np.ndarray | None, Row, str | None]:
    try:
        est, timing = run_tool(tool, movie)
        return est, timing, None
    except Exception as exc:  # a crashing tool is a result, not the end of the run
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if os.environ.get("BENCH_DEBUG"):
            msg += "\n" + traceback.format_exc(limit=5)
        return None, {}, msg


def worker(plan: Row) -> Row:
    """One thread pass: everything in ``plan``, in this process."""
    import cv2

    threads = plan["threads"]
    if threads == "1":
        cv2.setNumThreads(1)
    tools = {n: peers.TOOLS[n] for n in plan["tools"]}
    data_dir = Path(plan["data_dir"])
    out: Row = {"threads": threads, "cv2_threads": cv2.getNumThreads(), "runs": []}

    def load(spec_d: Row) -> tuple[movies.MovieSpec, np.ndarray, np.ndarray, Row]:
        spec = movies.MovieSpec(**spec_d)
        mv, tr, meta = movies.ensure(spec, data_dir, log=log)
        if plan.get("max_frames"):
            mv, tr = mv[: plan["max_frames"]], tr[: plan["max_frames"]]
        return spec, mv, tr, meta

    if plan.get("check"):
        spec, mv, tr, _ = load(plan["check"])
        out["check_movie"] = spec.name
        out["check"] = {}
        tt = tr[1:]
        for name, tool in tools.items():
            est, _t, err = guarded(tool, mv)
            if est is None:
                out["check"][name] = {"status": "error", "error": err}
                continue
            e = np.nan_to_num(est[1:])
            slope = [
                float(e[:, k] @ tt[:, k] / (tt[:, k] @ tt[:, k])) for k in range(2)
            ]
            cross = [
                float(e[:, 1 - k] @ tt[:, k] / (tt[:, k] @ tt[:, k])) for k in range(2)
            ]
            # 0.1 tolerance: a sign or axis error gives -1 or 0, an imprecise tool ~0.95
            if all(abs(s - 1) < 0.1 for s in slope):
                status = "ok"
            elif all(abs(s + 1) < 0.1 for s in slope):
                status = "sign flipped"
            elif all(abs(c - 1) < 0.1 for c in cross):
                status = "x/y swapped"
            else:
                status = "inconsistent"
            out["check"][name] = {
                "status": status,
                "slope_x": slope[0],
                "slope_y": slope[1],
                **metrics(est, tr),
            }
            log(f"[check] {name:15s} {status} slope=({slope[0]:.4f}, {slope[1]:.4f})")

    out["bounds"] = {}
    for k, spec_d in enumerate(plan["main"]):
        spec, mv, tr, meta = load(spec_d)
        if threads == "1":
            out["bounds"][spec.name] = movies.movie_bound(spec)
        debris = [int(b) for b in meta.get("debris_frames", []) if b < len(tr)]
        names = list(tools) if k % 2 == 0 else list(tools)[::-1]  # no order bias
        for name in names:
            tool = tools[name]
            if threads == "default" and not tool.threaded:
                continue
            est, timing, err = guarded(tool, mv)
            row: Row = {
                "movie": spec.name,
                "tool": name,
                "threads": threads,
                "size": spec.size,
                "frames": len(tr),
                "image": spec.image,
                "level": spec.level,
                "debris_frames": debris,
            }
            if est is None:
                row["error"] = err
                log(f"[run {threads}] {spec.name:24s} {name:15s} ERROR {err}")
            else:
                row |= metrics(est, tr, debris) | timing
                if name in peers.STAGELOCK_TOOLS:
                    row["bad_frames"] = bad_frames(est, tr)
                log(
                    f"[run {threads}] {spec.name:24s} {name:15s} "
                    f"rms={row['rms_px']:.4f} max={row['max_px']:.3f} "
                    f">0.5={row['n_off_05']} nan={row['n_nan']} "
                    f"{row['mean_ms']:.2f} ms/frame"
                )
            out["runs"].append(row)
        del mv

    if plan.get("sweep"):
        out["sweep"] = {}
        for spec_d in plan["sweep"]:
            spec, mv, tr, _ = load(spec_d)
            frac = np.round(tr[1:, 0] - 2.0, 4).tolist()
            res: Row = {"fraction": frac, "tools": {}}
            for name, tool in tools.items():
                est, _t, err = guarded(tool, mv)
                if est is None:
                    res["tools"][name] = {"error": err}
                    continue
                e = est[1:] - tr[1:]
                res["tools"][name] = {"ex": e[:, 0].tolist(), "ey": e[:, 1].tolist()}
            out["sweep"][spec.name] = res
            log(f"[sweep] {spec.name}")

    if plan.get("pc12") and movies.pc12_available():
        out["pc12"] = pc12_real(tools)
    return out


def pc12_real(tools: dict[str, peers.Tool]) -> Row:
    """Real drift, no truth: every tool's estimates and the peer's published correction.

    The published stack is ImageJ StackReg's (chained frame to frame); the shift it
    applied to frame t is measured here as the displacement of ``unreg[t]``
    relative to ``reg[t]`` (phase correlation x100 on the central part, away from
    the zero-filled borders of the registered frames).
    """
    from skimage.registration import phase_cross_correlation

    unreg, reg = movies.load_pc12()
    res: Row = {"frames": int(unreg.shape[0]), "tools": {}}
    for name, tool in tools.items():
        est, _t, err = guarded(tool, unreg)
        res["tools"][name] = (
            {"error": err} if est is None else np.round(est, 3).tolist()
        )
    if reg is not None:
        pub = []
        for u, r in zip(unreg, reg, strict=True):
            c = (slice(24, -24), slice(24, -24))
            shift, _e, _p = phase_cross_correlation(  # type: ignore[no-untyped-call]
                r[c].astype(np.float64), u[c].astype(np.float64), upsample_factor=100
            )
            pub.append([round(-float(shift[1]), 3), round(-float(shift[0]), 3)])
        res["published"] = pub
    return res


def spawn(plan: Row, threads: str) -> Row:
    """Run ``worker(plan)`` in a fresh interpreter with the thread env in place."""
    env = dict(os.environ)
    for v in ONE_THREAD_ENV:
        env.pop(v, None)
        if threads == "1":
            env[v] = "1"
    plan = plan | {"threads": threads}
    out_path = Path(plan["data_dir"]) / f"_worker-{threads}-{os.getpid()}.json"
    plan_path = out_path.with_suffix(".plan.json")
    plan_path.write_text(json.dumps(plan))
    rc = subprocess.call(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(plan_path),
            "--worker-out",
            str(out_path),
        ],
        env=env,
    )
    if rc != 0:
        raise SystemExit(
            f"benchmark worker ({threads} thread pass) failed with exit code {rc}"
        )
    out: Row = json.loads(out_path.read_text())
    out_path.unlink()
    plan_path.unlink()
    return out


# ----------------------------------------------------------------------------- tables


def _f(x: float | None, nd: int = 3) -> str:
    if x is None:
        return "—"
    if not np.isfinite(x):
        return "nan"
    if abs(x) < 0.5 * 10.0**-nd:
        x = 0.0  # no "-0.000"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _row(res: Row, movie: str, tool: str, threads: str = "1") -> Row | None:
    return next(
        (
            r
            for r in res["runs"]
            if r["movie"] == movie and r["tool"] == tool and r["threads"] == threads
        ),
        None,
    )


def _marks(r: Row) -> str:
    m = ""
    if r["n_off_05"]:
        m += f" ✗{r['n_off_05']}"
    if r["n_nan"]:
        m += f" nan{r['n_nan']}"
    return m


def ratios(res: Row) -> list[Row]:
    """Per movie: stagelock RMS / best peer RMS, best peer ms / stagelock ms."""
    out = []
    peer_names = [t for t in res["tools"] if t not in peers.STAGELOCK_TOOLS]
    for movie in res["movies"]:
        sl = _row(res, movie, "stagelock")
        live = _row(res, movie, "stagelock_live")
        cands = [
            r for t in peer_names if (r := _row(res, movie, t)) and not r.get("error")
        ]
        if sl is None or sl.get("error") or not cands:
            continue

        def score(r: Row) -> float:
            # NaN frames disqualify: a tool is only "best" if it measured every frame
            return (
                r["rms_px"] if r["n_nan"] == 0 and np.isfinite(r["rms_px"]) else np.inf
            )

        best = min(cands, key=score)
        fastest_ok = [r for r in cands if r["n_off_05"] == 0 and r["n_nan"] == 0]
        fast = min(fastest_ok, key=lambda r: r["mean_ms"]) if fastest_ok else None
        out.append(
            {
                "movie": movie,
                "best_peer": best["tool"],
                "best_rms": best["rms_px"],
                "stagelock_rms": sl["rms_px"],
                "rms_ratio": sl["rms_px"] / max(best["rms_px"], 1e-9),
                "speed_ratio": best["mean_ms"] / sl["mean_ms"],
                "live_ms": live["median_ms"]
                if live and not live.get("error")
                else None,
                "fastest_clean_peer": fast["tool"] if fast else None,
                "fastest_clean_ms": fast["mean_ms"] if fast else None,
                "stagelock_ms": sl["mean_ms"],
            }
        )
    return out


def dominance(res: Row) -> list[list[str]]:
    """Per movie and peer: the fastest stagelock setting at least as fast and accurate.

    Time per frame includes setup (whole-movie time / T); a setting with a frame
    > 0.5 px off or NaN does not count; a peer that errored is left out.
    """
    peer_names = [t for t in res["tools"] if t not in peers.STAGELOCK_TOOLS]
    settings = [t for t in res["tools"] if t in peers.STAGELOCK_TOOLS]
    grid = []
    for movie in res["movies"]:
        row = [movie]
        clean = [
            r
            for t in settings
            if (r := _row(res, movie, t))
            and not r.get("error")
            and r["n_off_05"] == 0
            and r["n_nan"] == 0
        ]
        for peer in peer_names:
            p = _row(res, movie, peer)
            if p is None or p.get("error"):
                row.append("—")
                continue
            p_rms = p["rms_px"] if np.isfinite(p["rms_px"]) else np.inf
            wins = [
                r
                for r in clean
                if r["mean_ms"] <= p["mean_ms"] and r["rms_px"] <= p_rms
            ]
            if wins:
                w = min(wins, key=lambda r: r["mean_ms"])
                name = w["tool"].removeprefix("stagelock").lstrip("_") or "default"
                row.append(f"{name} ({_f(w['mean_ms'], 2)} ms, {_f(w['rms_px'])})")
            else:
                row.append(
                    f"**none** (peer {_f(p['mean_ms'], 2)} ms, {_f(p['rms_px'])})"
                )
        grid.append(row)
    return grid


def tables(res: Row) -> str:
    tools: list[str] = res["tools"]
    mv: list[str] = res["movies"]
    ok = [r for r in res["runs"] if not r.get("error")]
    one = [r for r in ok if r["threads"] == "1"]
    sizes = sorted({r["size"] for r in res["runs"]})
    env = res["environment"]
    out = [
        f"Run {res['date']} on {env['platform']}, {env['cpu_count']} cores, Python "
        f"{env['python']}; wall {res['wall_s']:.0f} s; load average at start "
        f"{res['load_start']}, at end {res['load_end']} "
        "(shared machine: timings are noisy).\n",
        md_table(
            ["package", "version"], [[k, str(v)] for k, v in env["versions"].items()]
        ),
    ]
    if res.get("check"):
        out.append(f"\n### Sign-convention check ({res['check_movie']})\n")
        rows = []
        for t in tools:
            v = res["check"].get(t)
            if v is None:
                continue
            if v["status"] == "error":
                rows.append([t, "error: " + str(v["error"])[:70], "", "", "", ""])
            else:
                rows.append(
                    [
                        t,
                        v["status"],
                        f"{v['slope_x']:.4f}",
                        f"{v['slope_y']:.4f}",
                        _f(v["rms_px"], 4),
                        f"{v['frame0_px']:.4f}",
                    ]
                )
        out.append(
            md_table(
                ["tool", "status", "slope x", "slope y", "RMS px", "frame-0 px"], rows
            )
        )

    out.append("\n### Summary per tool\n")
    out.append(
        "RMS: median over the movies of that size of the per-movie RMS error (px); "
        "worst: largest per-movie RMS; off: frames > 0.5 px / > 1 px off / NaN, over "
        "all movies; ms/frame: median over movies of whole-movie time / T "
        "[median per-frame step time for streaming tools].\n"
    )
    head = ["tool"]
    for s in sizes:
        head += [f"RMS {s}", f"worst {s}"]
    head += ["off >0.5 / >1 / NaN"]
    head += [f"ms/frame {s} 1 thr" for s in sizes] + [
        f"ms/frame {s} default" for s in sizes
    ]
    rows = []
    for t in tools:
        rt = [r for r in one if r["tool"] == t]
        row = [t]
        for s in sizes:
            rs = [r["rms_px"] for r in rt if r["size"] == s]
            row += [_f(float(np.median(rs))) if rs else "—", _f(max(rs)) if rs else "—"]
        nt = sum(r["frames"] - 1 for r in rt)
        errs = sum(1 for r in res["runs"] if r["tool"] == t and r.get("error"))
        row.append(
            f"{sum(r['n_off_05'] for r in rt)} / {sum(r['n_off_1'] for r in rt)} / "
            f"{sum(r['n_nan'] for r in rt)} of {nt}"
            + (f", {errs} errors" if errs else "")
        )
        for th in ("1", "default"):
            for s in sizes:
                rr = [
                    r
                    for r in ok
                    if r["tool"] == t and r["threads"] == th and r["size"] == s
                ]
                if not rr:
                    row.append("—")
                    continue
                cell = _f(float(np.median([r["mean_ms"] for r in rr])), 2)
                meds = [r["median_ms"] for r in rr if r["median_ms"] is not None]
                row.append(
                    cell + (f" [{_f(float(np.median(meds)), 2)}]" if meds else "")
                )
        rows.append(row)
    out.append(md_table(head, rows))

    live = [r for r in ok if r["tool"] == "stagelock_live"]
    if live:
        out.append(
            "\n### stagelock per-frame latency: "
            "`Registrar(ref, max_shift_px=50).measure`\n"
        )
        rows = []
        for s in sizes:
            for th in ("1", "default"):
                rr = [r for r in live if r["size"] == s and r["threads"] == th]
                if rr:
                    rows.append(
                        [
                            str(s),
                            th,
                            str(len(rr)),
                            _f(float(np.median([r["median_ms"] for r in rr])), 2),
                            _f(float(np.median([r["p95_ms"] for r in rr])), 2),
                            _f(max(r["p95_ms"] for r in rr), 2),
                        ]
                    )
        out.append(
            md_table(
                [
                    "size",
                    "threads",
                    "movies",
                    "median ms",
                    "p95 ms (median over movies)",
                    "worst movie p95 ms",
                ],
                rows,
            )
        )

    out.append(
        "\n### RMS error px (max px) per movie, one thread; "
        "✗n = n frames > 0.5 px off, "
        "nanN = N frames not measured\n"
    )
    grid = []
    for m in mv:
        row = [m]
        for t in tools:
            r = _row(res, m, t)
            if r is None:
                row.append("—")
            elif r.get("error"):
                row.append("ERROR")
            else:
                row.append(f"{_f(r['rms_px'])} ({_f(r['max_px'], 2)}){_marks(r)}")
        grid.append(row)
    out.append(md_table(["movie", *tools], grid))

    bounds = res.get("bounds") or {}
    if any(bounds.values()):
        out.append(
            "\n### RMS / Cramér-Rao bound per movie, one thread\n\n"
            "bound = RMS the whole frame allows (`stagelock.registration.shift_crlb`"
            " of each frame's noiseless content at its bleached brightness, camera "
            "noise, noisy frame-0 reference, RMS over the frames); "
            "1.0 = at the physical limit. Over frames 1..T-1; NaN frames left out.\n"
        )
        grid = []
        for m in mv:
            b = bounds.get(m)
            if not b:
                continue
            row = [m, _f(b["rms_px"], 4)]
            for t in tools:
                r = _row(res, m, t)
                ok_r = r is not None and not r.get("error")
                row.append(_f(r["rms_px"] / b["rms_px"], 2) if ok_r and r else "—")
            grid.append(row)
        out.append(md_table(["movie", "bound px", *tools], grid))
        plot = res.get("plot")
        if plot:
            out.append(f"\n![RMS vs ms/frame]({plot})\n")

    rat = ratios(res)
    if rat:
        out.append("\n### stagelock vs the best peer per movie (one thread)\n")
        out.append(
            "best peer = lowest RMS among the peers with no NaN frames; RMS ratio = "
            "stagelock / best peer (< 1: stagelock more accurate); speed ratio = best "
            "peer ms/frame / stagelock ms/frame (> 1: stagelock faster); fastest clean "
            "peer = fastest peer with no frame > 0.5 px off.\n"
        )
        out.append(
            md_table(
                [
                    "movie",
                    "best peer",
                    "its RMS",
                    "stagelock RMS",
                    "RMS ratio",
                    "speed ratio",
                    "stagelock ms (stack / live)",
                    "fastest clean peer (ms)",
                ],
                [
                    [
                        r["movie"],
                        r["best_peer"],
                        _f(r["best_rms"]),
                        _f(r["stagelock_rms"]),
                        _f(r["rms_ratio"], 2),
                        _f(r["speed_ratio"], 2),
                        f"{_f(r['stagelock_ms'], 2)} / {_f(r['live_ms'], 2)}",
                        f"{r['fastest_clean_peer']} ({_f(r['fastest_clean_ms'], 2)})"
                        if r["fastest_clean_peer"]
                        else "none",
                    ]
                    for r in rat
                ],
            )
        )

    grid = dominance(res)
    if grid:
        out.append(
            "\n### Never beaten on both: the fastest stagelock setting at least as "
            "fast and as accurate as each peer (one thread)\n\n"
            "ms/frame includes setup (whole-movie time / T); settings with a frame "
            "> 0.5 px off or NaN do not count; **none** = that peer is faster or "
            "more accurate than every setting.\n"
        )
        peer_names = [t for t in res["tools"] if t not in peers.STAGELOCK_TOOLS]
        out.append(md_table(["movie", *peer_names], grid))

    for name, sw in res.get("sweep", {}).items():
        out.append(
            f"\n### Pixel locking ({name}): truth (2+f, −3+f), f = 0..1 step 0.05, "
            "noiseless; max |bias| and peak-to-peak, x / y, millipixels\n"
        )
        rows = []
        for t in tools:
            v = sw["tools"].get(t)
            if v is None:
                continue
            if "error" in v:
                rows.append([t, "error", "error"])
                continue
            ex, ey = np.array(v["ex"]), np.array(v["ey"])
            rows.append(
                [
                    t,
                    f"{1e3 * np.nanmax(np.abs(ex)):.0f} / "
                    f"{1e3 * np.nanmax(np.abs(ey)):.0f}",
                    f"{1e3 * np.ptp(ex):.0f} / {1e3 * np.ptp(ey):.0f}",
                ]
            )
        out.append(md_table(["tool", "max abs bias mpx", "peak-to-peak mpx"], rows))

    bad = [r for r in one if r["tool"] in peers.STAGELOCK_TOOLS and r.get("bad_frames")]
    out.append("\n### stagelock frames > 0.5 px off or NaN\n")
    if not bad:
        out.append("None.")
    for r in bad:
        frames = "; ".join(
            f"+{b['more']} more"
            if "more" in b
            else f"#{b['frame']} est ({b['est'][0]}, {b['est'][1]}) "
            f"truth ({b['truth'][0]}, "
            f"{b['truth'][1]}) err {b['err_px']}"
            for b in r["bad_frames"]
        )
        out.append(f"- `{r['movie']}` {r['tool']}: {frames}")

    pc = res.get("pc12")
    if pc:
        out.append(
            "\n### Real drift: pc12-unreg.tif (no ground truth), "
            "(dx, dy) px per frame\n"
        )
        out.append(
            "`published` = the shift ImageJ StackReg (chained frame to frame) "
            "removed in "
            "the peer's published `pc12-reg-translation.tif`, measured by phase "
            "correlation ×100: a qualitative reference, not truth.\n"
        )
        names = [*([] if "published" not in pc else ["published"]), *pc["tools"]]
        rows = []
        for i in range(pc["frames"]):
            row = [str(i)]
            for n in names:
                v = pc["published"] if n == "published" else pc["tools"][n]
                row.append(
                    "error"
                    if isinstance(v, dict)
                    else f"{_f(v[i][0], 2)}, {_f(v[i][1], 2)}"
                )
            rows.append(row)
        out.append(md_table(["frame", *names], rows))
    return "\n".join(out)


def draw_tradeoff(res: Row, path: Path) -> str | None:
    """RMS vs ms/frame per movie: stagelock over coverage as a curve, peers as dots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[plot] matplotlib missing: pip install matplotlib; no figure")
        return None
    one = [r for r in res["runs"] if r["threads"] == "1" and not r.get("error")]
    names = [m for m in res["movies"] if any(r["movie"] == m for r in one)]
    if not names:
        return None
    n_col = min(4, len(names))
    n_row = -(-len(names) // n_col)
    fig, axes = plt.subplots(
        n_row, n_col, figsize=(4.2 * n_col, 3.4 * n_row), squeeze=False
    )
    bounds = res.get("bounds") or {}
    for ax, movie in zip(axes.ravel(), names, strict=False):
        rows = [r for r in one if r["movie"] == movie]
        curve = sorted(
            (
                (peers.coverage_of(r["tool"]), r["mean_ms"], r["rms_px"])
                for r in rows
                if peers.coverage_of(r["tool"]) is not None
            ),
        )
        if curve:
            ax.plot(
                [c[1] for c in curve],
                [c[2] for c in curve],
                "o-",
                color="C0",
                label="stagelock (coverage)",
            )
            for c, ms, rms in curve:
                ax.annotate(
                    f"{c:g}",
                    (ms, rms),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        for r in rows:
            if peers.coverage_of(r["tool"]) is not None:
                continue
            # one colour per tool across the panels
            k = 1 + list(peers.TOOLS).index(r["tool"])
            marker = "s" if r["tool"].startswith("stagelock") else "^"
            ax.plot(
                r["mean_ms"], r["rms_px"], marker, color=f"C{k % 10}", label=r["tool"]
            )
        b = bounds.get(movie)
        if b:
            ax.axhline(b["rms_px"], color="k", lw=0.8, ls="--", label="CRB")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(movie, fontsize=9)
        ax.set_xlabel("ms/frame (1 thread)")
        ax.set_ylabel("RMS px")
        ax.grid(True, which="both", lw=0.3)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    log(f"[plot] {path}")
    try:
        return str(path.resolve().relative_to(HERE))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- main


def versions(tool_names: list[str]) -> dict[str, str]:
    import importlib.metadata as md

    dists = [
        "numpy",
        "scipy",
        "opencv-python-headless",
        "scikit-image",
        "pystackreg",
        "templatematchingpy",
        "stagelock",
    ]
    out = {"python": platform.python_version()}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = "not installed"
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small smoke run (~1 min)")
    ap.add_argument("--sizes", default="512,2048", help="comma list of frame sizes")
    ap.add_argument("--tools", help=f"comma list from {','.join(peers.TOOLS)}")
    ap.add_argument("--movies", help="comma list of glob patterns on movie names")
    ap.add_argument("--threads", choices=["1", "default", "both"], default="both")
    ap.add_argument("--max-frames", type=int, default=0, help="truncate movies")
    ap.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the sign check and the pixel-locking sweep (and their movies)",
    )
    ap.add_argument("--data-dir", type=Path, default=movies.default_data_dir())
    ap.add_argument("--json", type=Path, help="write all results (JSON) here")
    ap.add_argument("--md", type=Path, help="write the markdown tables here")
    ap.add_argument(
        "--render", type=Path, metavar="JSON", help="only print the tables of a JSON"
    )
    ap.add_argument(
        "--plot",
        type=Path,
        default=HERE / "results" / "registration_tradeoff.png",
        help="RMS vs ms/frame figure (stagelock's coverage curve, peers as points)",
    )
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        args.worker_out.write_text(
            json.dumps(worker(json.loads(args.worker.read_text())))
        )
        return 0
    if args.render:
        text = tables(json.loads(args.render.read_text()))
        print(text)
        if args.md:
            args.md.write_text(text + "\n")
        return 0

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"--sizes wants integers like 512,2048; got {args.sizes!r}"
        ) from None
    tool_names = list(peers.TOOLS)
    if args.tools:
        tool_names = [t.strip() for t in args.tools.split(",") if t.strip()]
        unknown = [t for t in tool_names if t not in peers.TOOLS]
        if unknown:
            raise SystemExit(
                f"unknown tool(s) {unknown}; known: {', '.join(peers.TOOLS)}"
            )
    groups = movies.suite(sizes, args.quick)
    main_specs = groups["main"]
    if args.movies:
        pats = [p.strip() for p in args.movies.split(",") if p.strip()]
        main_specs = [
            s for s in main_specs if any(fnmatch.fnmatch(s.name, p) for p in pats)
        ]
    if not main_specs:
        raise SystemExit("no movie matches --movies/--sizes")

    t0 = time.perf_counter()
    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(
        f"[bench] {len(main_specs)} movies in {args.data_dir}; "
        f"tools {', '.join(tool_names)}"
    )
    if args.no_sweep:
        groups["check"], groups["sweep"] = [], []
    for spec in [*groups["check"], *main_specs, *groups["sweep"]]:
        movies.ensure(spec, args.data_dir, log=log)  # generate up front: not timed
    plan: Row = {
        "tools": tool_names,
        "data_dir": str(args.data_dir),
        "max_frames": args.max_frames,
        "main": [asdict(s) for s in main_specs],
    }
    res: Row = {
        "tools": tool_names,
        "movies": [s.name for s in main_specs],
        "runs": [],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "convention": "dx, dy = sample displacement in frame t relative to frame 0, "
        "px; +x columns, +y rows",
        "off_px": list(OFF_PX),
    }
    if args.threads in ("1", "both"):
        one = spawn(
            plan
            | {
                "check": asdict(groups["check"][0]) if groups["check"] else None,
                "sweep": [asdict(s) for s in groups["sweep"]],
                "pc12": True,
            },
            "1",
        )
        res["runs"] += one["runs"]
        for k in ("check", "check_movie", "sweep", "pc12", "bounds"):
            if k in one:
                res[k] = one[k]
    if args.threads in ("default", "both"):
        threaded = [t for t in tool_names if peers.TOOLS[t].threaded]
        if threaded or args.threads == "default":
            tl = threaded if args.threads == "both" else tool_names
            dflt = spawn(plan | {"tools": tl}, "default")
            res["runs"] += dflt["runs"]
            res["cv2_default_threads"] = dflt["cv2_threads"]
    res["wall_s"] = time.perf_counter() - t0
    res["load_start"] = load_start
    res["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    res["environment"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(tool_names),
        "tools": {
            t: {"call": peers.TOOLS[t].call, "version": peers.TOOLS[t].version()}
            for t in tool_names
        },
    }
    if args.plot:
        res["plot"] = draw_tradeoff(res, args.plot)
    text = tables(res)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    log(f"[bench] done in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
