"""Throughput of ``stagelock.register_many`` on 1 and 2 Dask workers.

Cases (each timed as the wall time of the whole ``register_many`` call, on a
cluster started beforehand; cluster start-up is reported separately):

- ``many``: ``--n-stacks`` TIFF stacks of ``--frames`` frames at ``--size``².
- ``huge``: one TIFF stack of ``--huge-frames`` frames, registered with the aligned
  OME-Zarr written by the workers, every worker under ``--memory-limit``.

- ``cli``: the same small stacks through the command a user types, timed whole:
  ``stagelock register ... --scheduler ADDR`` on the external cluster,
  ``stagelock register ... --workers N`` (its own LocalCluster, start-up included).
- ``killed`` (external, 2 workers): one worker is SIGKILLed while it runs a task;
  the job must still deliver every frame of every stack once.
- ``zarr``: one stack as a T×Y×X multiscale OME-Zarr 0.4 written by ome-zarr-py.

Clusters: ``local`` (LocalCluster, one thread per worker) and ``external``
(``dask scheduler`` + ``dask worker --nthreads 1`` processes on 127.0.0.1).
Writes ``bench/results/scale.json`` and ``bench/results/scale.md``.

    python bench/scale.py --quick
    python bench/scale.py --n-stacks 8 --frames 400 --size 512 --huge-frames 4000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from stagelock import register_many
from stagelock.batch import LOOPBACK_HTTP
from stagelock.sim import drifting_stack, random_drift

RESULTS = Path(__file__).parent / "results"


def make_stack(path: Path, n_frames: int, size: int, seed: int) -> np.ndarray:
    # the creep of 400 frames spread over the whole stack: a long stack drifts
    # ~20 px too, inside the default capture range (50 px)
    creep = 0.05 * min(1.0, 400 / n_frames), -0.03 * min(1.0, 400 / n_frames)
    truth = random_drift(n_frames, creep_px_per_frame=creep, seed=seed)

    def planes():
        for lo in range(0, n_frames, 50):
            yield from drifting_stack(
                truth[lo : lo + 50], shape=(size, size), seed=seed + lo
            )

    tifffile.imwrite(
        path,
        planes(),
        shape=(n_frames, size, size),
        dtype=np.uint16,
        photometric="minisblack",
        metadata={"axes": "TYX"},
        bigtiff=True,
    )
    return truth


def rms_of(csv_path: Path, truth: np.ndarray) -> float:
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["frame"]) for r in rows] == list(range(len(truth)))
    est = np.array([[float(r["dx_px"]), float(r["dy_px"])] for r in rows])
    return float(np.sqrt(np.nanmean((est - truth) ** 2)))


class External:
    """``dask scheduler`` + N ``dask worker --nthreads 1`` on 127.0.0.1."""

    def __init__(self, n_workers: int, memory_limit: str, tmp: Path) -> None:
        self.file = tmp / f"scheduler-{n_workers}.json"
        self.file.unlink(missing_ok=True)
        dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.procs = [
            subprocess.Popen(
                [
                    *dask,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(self.file),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        while not self.file.exists():
            time.sleep(0.1)
        time.sleep(0.2)
        self.address = json.loads(self.file.read_text())["address"]
        worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
        for _ in range(n_workers):
            self.procs.append(
                subprocess.Popen(
                    [
                        *worker,
                        self.address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--memory-limit",
                        memory_limit,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def write_ome_zarr(path: Path, stack_path: Path) -> None:
    """The TIFF stack as a multiscale T×Y×X OME-Zarr 0.4, written by ome-zarr-py."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    data = tifffile.imread(stack_path)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    write_image(
        data,
        group,
        axes="tyx",
        fmt=FormatV04(),
        scale_factors=(2,),
        storage_options={"chunks": (16, *data.shape[1:])},
    )


def run_cli(args: list[str]) -> float:
    """Wall time of one ``stagelock register`` command (fails loudly)."""
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stagelock",
            "register",
            *args,
            "--overwrite",
            "--no-progress",
        ],
        check=True,
    )
    return time.perf_counter() - t0


def register_command(
    small: list[Path], out: Path, chunk_frames: int, engine: list[str]
) -> list[str]:
    """The arguments of ``stagelock register`` for the small stacks."""
    return [
        *map(str, small),
        "--out-dir",
        str(out),
        "--chunk-frames",
        str(chunk_frames),
        *engine,
    ]


def check_outputs(out: Path, inputs: list[Path], truths: list[np.ndarray]) -> float:
    return max(
        rms_of(out / f"{p.stem}.shifts.csv", t)
        for p, t in zip(inputs, truths, strict=True)
    )


def killed_worker_case(
    client: Any, inputs: list[Path], truths: list[np.ndarray], out: Path, **kw: Any
) -> dict[str, Any]:
    """SIGKILL a worker that is running a task; the job must still be complete."""
    result: dict[str, Any] = {}

    def job() -> None:
        result["summaries"] = register_many(
            inputs, out, client=client, overwrite=True, **kw
        )

    t0 = time.perf_counter()
    runner = threading.Thread(target=job)
    runner.start()
    victim = None
    while victim is None and runner.is_alive():
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            victim = busy[0]
        else:
            time.sleep(0.02)
    killed_at = time.perf_counter() - t0
    if victim is not None:
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
    runner.join()
    wall = time.perf_counter() - t0
    summaries = result["summaries"]
    assert all(s.outcome == "done" for s in summaries), summaries
    frames = sum(s.n_frames for s in summaries)
    return {
        "wall_s": round(wall, 2),
        "killed_at_s": round(killed_at, 2),
        "frames": frames,
        "every_frame_once": True,  # rms_of asserts frames == 0..n-1
        "max_rms_px": round(check_outputs(out, inputs, truths), 4),
    }


def interleaved_cli(
    args: argparse.Namespace,
    small: list[Path],
    truths: list[np.ndarray],
    tmp: Path,
) -> list[dict[str, Any]]:
    """``stagelock register ... --scheduler`` on 1 and on 2 workers, alternated.

    One external cluster at a time (an idle Dask scheduler, nanny and worker
    still cost ~10-20 % of a core each here): start it, wait for its workers,
    time the command, stop it; 1 worker, then 2, ``--cli-pairs`` times.
    """
    from distributed import Client

    pairs = []
    for k in range(args.cli_pairs):
        walls = {}
        rms = 0.0
        for n in (1, 2):
            cluster = External(n, args.memory_limit, tmp)
            try:
                with Client(cluster.address) as c:
                    c.wait_for_workers(n, timeout=600)
                time.sleep(2.0)  # let the workers' start-up settle
                out = tmp / f"pair{n}"
                walls[n] = run_cli(
                    register_command(
                        small, out, args.chunk_frames, ["--scheduler", cluster.address]
                    )
                )
                rms = max(rms, check_outputs(out, small, truths))
            finally:
                cluster.close()
        pair = {
            "pair": k + 1,
            "one_s": round(walls[1], 2),
            "two_s": round(walls[2], 2),
            "speedup": round(walls[1] / walls[2], 3),
            "max_rms_px": round(rms, 4),
        }
        print(json.dumps(pair), flush=True)
        pairs.append(pair)
    return pairs


def run_case(
    client: Any, inputs: list[Path], truths: list[np.ndarray], out: Path, **kw: Any
) -> dict[str, Any]:
    t0 = time.perf_counter()
    summaries = register_many(inputs, out, client=client, overwrite=True, **kw)
    wall = time.perf_counter() - t0
    frames = sum(s.n_frames for s in summaries)
    assert all(s.outcome == "done" for s in summaries), summaries
    rms = max(rms_of(s.shifts_csv, t) for s, t in zip(summaries, truths, strict=True))
    return {
        "wall_s": round(wall, 2),
        "frames": frames,
        "fps": round(frames / wall, 1),
        "max_rms_px": round(rms, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="4 x 100 frames at 256², huge 1000"
    )
    ap.add_argument("--n-stacks", type=int, default=8)
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--huge-frames", type=int, default=4000)
    ap.add_argument("--memory-limit", default="400MB")
    ap.add_argument("--chunk-frames", type=int, default=100)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument(
        "--cli-repeat", type=int, default=3, help="command runs (median reported)"
    )
    ap.add_argument(
        "--cli-pairs",
        type=int,
        default=0,
        help="then time the command on 1 and 2 external workers alternately, N pairs",
    )
    ap.add_argument("--clusters", default="local,external")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("STAGELOCK_BENCH_DATA", "/tmp/stagelock-bench-scale"),
    )
    args = ap.parse_args()
    if args.quick:
        args.n_stacks, args.frames, args.size, args.huge_frames = 4, 100, 256, 1000
    from distributed import Client, LocalCluster

    data = Path(args.data_dir) / f"{args.n_stacks}x{args.frames}x{args.size}"
    data.mkdir(parents=True, exist_ok=True)
    small, truths = [], []
    for i in range(args.n_stacks):
        path = data / f"stack{i}.tif"
        truth_path = path.with_suffix(".npy")
        if not truth_path.exists():
            np.save(truth_path, make_stack(path, args.frames, args.size, seed=i))
        small.append(path)
        truths.append(np.load(truth_path))
    huge = data / f"huge{args.huge_frames}-creep400.tif"
    huge_mb = 0.0
    if args.huge_frames:  # 0: no huge case
        if not huge.with_suffix(".npy").exists():
            truth = make_stack(huge, args.huge_frames, args.size, 99)
            np.save(huge.with_suffix(".npy"), truth)
        huge_truth = np.load(huge.with_suffix(".npy"))
        huge_mb = huge.stat().st_size / 1e6
    zarr_input = data / "stack0.ome.zarr"
    if not (zarr_input / ".zattrs").exists():
        write_ome_zarr(zarr_input, small[0])

    results: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for kind in [k for k in args.clusters.split(",") if k != "none"]:
            for n in [int(w) for w in args.workers.split(",")]:
                t0 = time.perf_counter()
                if kind == "local":
                    cluster: Any = LocalCluster(
                        n_workers=n,
                        threads_per_worker=1,
                        processes=True,
                        host="127.0.0.1",
                        dashboard_address=None,
                        scheduler_kwargs=LOOPBACK_HTTP,
                        memory_limit=args.memory_limit,
                        silence_logs=40,
                    )
                    client = Client(cluster)
                else:
                    cluster = External(n, args.memory_limit, tmp)
                    client = Client(cluster.address)
                client.wait_for_workers(n, timeout=600)
                startup = time.perf_counter() - t0
                try:
                    many = run_case(
                        client,
                        small,
                        truths,
                        tmp / "many",
                        chunk_frames=args.chunk_frames,
                    )
                    big = (
                        run_case(
                            client,
                            [huge],
                            [huge_truth],
                            tmp / "huge",
                            chunk_frames=args.chunk_frames,
                            aligned="zarr",
                        )
                        if args.huge_frames
                        else {"wall_s": None, "fps": None, "max_rms_px": None}
                    )
                    zarr_case = run_case(
                        client,
                        [zarr_input],
                        [truths[0]],
                        tmp / "zarr",
                        chunk_frames=args.chunk_frames,
                    )
                    engine = (
                        ["--scheduler", cluster.address]
                        if kind == "external"
                        else ["--workers", str(n)]
                    )
                    if kind == "local":
                        # the command starts its own cluster: free these cores
                        client.close()
                        cluster.close()
                    cli_out = tmp / "cli"
                    cli_walls = [
                        run_cli(
                            register_command(small, cli_out, args.chunk_frames, engine)
                        )
                        for _ in range(args.cli_repeat)
                    ]
                    cli_wall = float(np.median(cli_walls)) if cli_walls else None
                    cli = {
                        "command": "stagelock register ... " + " ".join(engine),
                        "wall_s": None if cli_wall is None else round(cli_wall, 2),
                        "wall_s_samples": [round(w, 2) for w in cli_walls],
                        "fps": None
                        if cli_wall is None
                        else round(sum(len(t) for t in truths) / cli_wall, 1),
                        "max_rms_px": None
                        if cli_wall is None
                        else round(check_outputs(cli_out, small, truths), 4),
                    }
                    killed = None
                    if kind == "external" and n >= 2:
                        killed = killed_worker_case(
                            client,
                            small,
                            truths,
                            tmp / "killed",
                            chunk_frames=args.chunk_frames,
                        )
                finally:
                    client.close()
                    cluster.close()
                row = {
                    "cluster": kind,
                    "workers": n,
                    "startup_s": round(startup, 1),
                    "many": many,
                    "huge": big,
                    "zarr": zarr_case,
                    "cli": cli,
                    "killed": killed,
                }
                print(json.dumps(row), flush=True)
                results.append(row)
                write_results(args, huge_mb, results, pairs)
        if args.cli_pairs:
            pairs.extend(interleaved_cli(args, small, truths, tmp))
    write_results(args, huge_mb, results, pairs)


def write_results(
    args: argparse.Namespace,
    huge_mb: float,
    results: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
) -> None:
    """Write what is measured so far (after every row: a stopped run keeps it)."""
    load = os.getloadavg()
    doc = {
        "config": {
            **vars(args),
            "huge_mb": round(huge_mb, 1),
            "cpus": os.cpu_count(),
            "loadavg_after": [round(v, 1) for v in load],
        },
        "runs": results,
        "cli_pairs": pairs,
    }
    RESULTS.mkdir(exist_ok=True)
    # a pairs-only run (--clusters none) keeps the rows of the last full run
    stem = "scale" if results else "scale-command"
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"many: {args.n_stacks} x {args.frames} frames at {args.size}²; huge: "
        f"{args.huge_frames} frames ({huge_mb:.0f} MB) with aligned OME-Zarr, "
        f"--memory-limit {args.memory_limit}; {os.cpu_count()} cores, load "
        f"{load[0]:.1f} after the run",
        "",
        "| cluster | workers | start-up s | many: wall s | many: frames/s "
        "| many: RMS px | huge: wall s | huge: frames/s | huge: RMS px |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, h = r["many"], r["huge"]
        lines.append(
            f"| {r['cluster']} | {r['workers']} | {r['startup_s']} | {m['wall_s']} | "
            f"{m['fps']} | {m['max_rms_px']} | {h['wall_s']} | {h['fps']} | "
            f"{h['max_rms_px']} |"
        )
    lines += [
        "",
        f"| cluster | workers | command | wall s (median of {args.cli_repeat}) "
        "| frames/s | RMS px "
        "| OME-Zarr input: frames/s, RMS px | worker SIGKILLed at s: wall s, RMS px |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, z, k = r["cli"], r["zarr"], r["killed"]
        killed = "-" if k is None else f"{k['killed_at_s']}: {k['wall_s']}, "
        if k is not None:
            killed += f"{k['max_rms_px']} (every frame once)"
        lines.append(
            f"| {r['cluster']} | {r['workers']} | `{c['command']}` | {c['wall_s']} | "
            f"{c['fps']} | {c['max_rms_px']} | {z['fps']}, {z['max_rms_px']} | "
            f"{killed} |"
        )
    lines += ["", "Speed-up of 2 workers over 1 (wall time, same run):", ""]
    for kind in args.clusters.split(","):
        by_n = {r["workers"]: r for r in results if r["cluster"] == kind}
        if 1 in by_n and 2 in by_n:
            one, two = by_n[1], by_n[2]
            huge_ratio = (
                f"{one['huge']['wall_s'] / two['huge']['wall_s']:.2f}x"
                if args.huge_frames
                else "not run"
            )
            lines.append(
                f"- {kind}: many {one['many']['wall_s'] / two['many']['wall_s']:.2f}x, "
                f"huge {huge_ratio}, "
                "command "
                + (
                    f"{one['cli']['wall_s'] / two['cli']['wall_s']:.2f}x"
                    if one["cli"]["wall_s"] and two["cli"]["wall_s"]
                    else "see the pairs below"
                )
            )
    if pairs:
        lines += [
            "",
            "The whole command, 1 and 2 external workers alternated "
            "(1, 2, 1, 2, ...: a drifting machine speed hits both alike):",
            "",
            "| pair | 1 worker s | 2 workers s | speed-up | RMS px |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['pair']} | {p['one_s']} | {p['two_s']} | {p['speedup']}x | "
                f"{p['max_rms_px']} |"
            )
        one = float(np.median([p["one_s"] for p in pairs]))
        two = float(np.median([p["two_s"] for p in pairs]))
        lines += [
            "",
            f"Median: 1 worker {one:.1f} s, 2 workers {two:.1f} s: "
            f"**{one / two:.2f}x** (median of the pairs' ratios "
            f"{np.median([p['speedup'] for p in pairs]):.2f}x)",
        ]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
