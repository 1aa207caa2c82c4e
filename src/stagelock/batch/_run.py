"""Execution: tasks on a Dask cluster (or in this process), results chained in order.

The driver (this process) plans the chunks, submits one task per chunk and
collects the rows of each chunk as its task completes, in any order; it writes
each input's CSV itself, in frame order, once every chunk is in. A worker that
dies mid-job has its tasks re-run elsewhere by the Dask scheduler; as a task only
*returns* rows (and rewrites its own planes of the aligned stack), a re-run adds
nothing twice and loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._plan import Chunk, plan_chunks
from ._readers import StackSource, check_channel, open_source, output_stem
from ._writers import (
    AlignedFormat,
    AlignedTarget,
    count_csv_rows,
    create_target,
    finish_target,
    remove_partial,
    write_csv,
    write_region,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import numpy.typing as npt

    from ._progress import BatchProgress

__all__ = [
    "LOOPBACK_HTTP",
    "InputSummary",
    "Reference",
    "RunOptions",
    "cluster_client",
    "run_jobs",
]

log = logging.getLogger(__name__)

Reference = Literal["first", "mean", "keyframe", "previous"]
_CHAINED = ("keyframe", "previous")  # sequential: chunks chained by the driver
Outcome = Literal["done", "skipped", "failed"]
_WRITE_BATCH = 16  # aligned planes buffered per write (bounded memory)


@dataclass(frozen=True, slots=True)
class InputSummary:
    """What happened to one input of :func:`stagelock.register_many`.

    Attributes
    ----------
    path : Path
        The input.
    outcome : {"done", "skipped", "failed"}
        Registered now, skipped (its outputs were already complete), or failed
        (``error`` says why; no output under a final name).
    shifts_csv : Path
        ``out_dir/<stem>.shifts.csv``.
    aligned : Path or None
        The aligned stack, when asked for.
    n_frames : int
        Frames in the CSV (0 when failed).
    n_ok : int
        Frames with status ``ok``; ``n_not_ok = n_frames - n_ok``.
    max_shift_px : float
        Largest ``hypot(dx, dy)`` over the measured frames (NaN if none).
    error : str or None
        One line naming the problem, for failed inputs.
    """

    path: Path
    outcome: Outcome
    shifts_csv: Path
    aligned: Path | None = None
    n_frames: int = 0
    n_ok: int = 0
    max_shift_px: float = math.nan
    error: str | None = None

    @property
    def n_not_ok(self) -> int:
        """Frames whose status is not ``ok``."""
        return self.n_frames - self.n_ok


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Registration settings shared by every input of a batch."""

    reference: Reference = "first"
    n_mean: int = 10
    channel: int = 0
    chunk_frames: int = 200
    aligned: AlignedFormat | Literal["auto"] | None = None
    overwrite: bool = False
    registrar: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChunkRows:
    """The rows a chunk task returns (``start .. stop-1``), and its chain links."""

    chunk: Chunk
    dx: npt.NDArray[np.float64]
    dy: npt.NDArray[np.float64]
    confidence: npt.NDArray[np.float64]
    status: tuple[str, ...]
    link: tuple[float, float] | None = None
    anchor: tuple[float, float] | None = None
    aligned: bool = False


# -- the tasks (run on the workers; module-level so they pickle by reference) ----------


def _single_thread() -> None:
    """One OpenCV thread per task: the cluster's size is the only parallelism.

    Also undoes, once per worker process, what Dask's nanny sets for memory
    accounting (``MALLOC_TRIM_THRESHOLD_=65536``): an explicit trim threshold
    turns off glibc's adaptive mmap threshold, so every array above 128 kB
    (each frame's temporaries) becomes a fresh ``mmap`` with page faults on
    first touch. Measured: 17.7 → 29.5 ms per 512² frame in a plain process
    with that variable; the worker ran at 36 ms. Heap allocations up to 32 MiB
    and a 64 MiB trim threshold bring it back.
    """
    import cv2

    cv2.setNumThreads(1)
    _heap_allocations()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_heap_done = False


def _heap_allocations() -> None:
    global _heap_done  # once per process
    if _heap_done:
        return
    _heap_done = True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to undo
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


def prepare_reference(
    source: StackSource, channel: int, reference: Reference, n_mean: int
) -> npt.NDArray[Any]:
    """Prepare the global reference: frame 0, or the mean of the first ``n_mean``."""
    _single_thread()
    count = n_mean if reference == "mean" else 1
    head = list(islice(source.frames(channel, 0, min(count, source.n_frames)), count))
    if not head:
        raise ValueError(f"{source.path} holds no frames")
    if reference != "mean":
        return np.array(head[0])
    # as Registrar.from_frames: averaged in float64, kept as float32
    mean: npt.NDArray[Any] = np.mean(np.stack(head).astype(np.float64), axis=0)
    return mean.astype(np.float32)


def measure_chunk(
    source: StackSource,
    chunk: Chunk,
    channel: int,
    reference: Reference,
    image: npt.NDArray[Any],
    registrar_options: dict[str, Any],
    target: AlignedTarget | None,
) -> ChunkRows:
    """Measure the frames of one chunk (and align them when the shifts are final)."""
    from stagelock.registration import (
        Registrar,
        ShiftEstimate,
        iter_estimates,
    )

    _single_thread()
    estimates: list[ShiftEstimate] = []
    link = anchor = None
    if reference in _CHAINED:
        # a fresh chain from this chunk's first frame, one frame past its end
        # so the driver can chain it to the next chunk (see _plan)
        stop = min(chunk.stop + 1, source.n_frames)
        first: npt.NDArray[Any] | None = None

        def frames() -> Iterator[npt.NDArray[Any]]:
            nonlocal first
            for i, frame in enumerate(source.frames(channel, chunk.start, stop)):
                if i == 0:
                    first = frame
                yield frame

        estimates = list(
            iter_estimates(frames(), reference=reference, **registrar_options)
        )
        if len(estimates) > chunk.n_frames:
            last = estimates.pop()
            link = (last.dx_px, last.dy_px) if last.status.has_shift else None
        if chunk.start > 0 and first is not None:
            direct = Registrar(image, **registrar_options).measure(first)
            anchor = (direct.dx_px, direct.dy_px) if direct.status.has_shift else None
    else:
        registrar = Registrar(image, **registrar_options)
        frames_iter = source.frames(channel, chunk.start, chunk.stop)
        for t, frame in enumerate(frames_iter, start=chunk.start):
            if t == 0 and reference == "first":
                # the reference itself: zero by definition, as iter_estimates does
                estimates.append(ShiftEstimate.at_reference(len(registrar.regions)))
            else:
                estimates.append(registrar.measure(frame))
    if len(estimates) != chunk.n_frames:
        raise ValueError(
            f"{source.path}: read {len(estimates)} of the {chunk.n_frames} frames "
            f"{chunk.start}..{chunk.stop - 1}"
        )
    rows = ChunkRows(
        chunk,
        np.array([e.dx_px for e in estimates], dtype=np.float64),
        np.array([e.dy_px for e in estimates], dtype=np.float64),
        np.array([e.confidence for e in estimates], dtype=np.float64),
        tuple(e.status.value for e in estimates),
        link,
        anchor,
    )
    if target is not None and reference not in _CHAINED:
        align_chunk(source, chunk, rows.dx, rows.dy, target)
        rows = ChunkRows(
            rows.chunk, rows.dx, rows.dy, rows.confidence, rows.status, aligned=True
        )
    return rows


def align_chunk(
    source: StackSource,
    chunk: Chunk,
    dx: npt.NDArray[np.float64],
    dy: npt.NDArray[np.float64],
    target: AlignedTarget,
) -> int:
    """Write the chunk's planes, every channel shifted by its frame's shift."""
    from stagelock.registration import shift_image

    _single_thread()
    batch: list[npt.NDArray[Any]] = []
    start = chunk.start
    for i, block in enumerate(source.blocks(chunk.start, chunk.stop)):
        sx, sy = float(dx[i]), float(dy[i])
        if math.isfinite(sx) and math.isfinite(sy):
            block = np.stack([shift_image(plane, -sx, -sy) for plane in block])
        # unmeasurable frames are kept as they are rather than dropped
        batch.append(block)
        if len(batch) == _WRITE_BATCH:
            write_region(target, start, batch)
            start += len(batch)
            batch = []
    write_region(target, start, batch)
    return chunk.n_frames


# -- executors: a Dask client, or this process ---------------------------------------


class _LocalFuture:
    """A call run lazily, in submission order, by :class:`_LocalExecutor`."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            args = [a.result() if isinstance(a, _LocalFuture) else a for a in self.args]
            self.value = self.fn(*args)
        except Exception as exc:
            self.error = exc
        self.done = True

    def result(self) -> Any:
        if not self.done:
            self.run()
        if self.error is not None:
            raise self.error
        return self.value


class _LocalExecutor:
    """Runs the tasks one after the other in this process."""

    def __init__(self) -> None:
        self._queue: deque[_LocalFuture] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = _LocalFuture(fn, args)
        self._queue.append(future)
        return future

    def cancel(self, futures: Sequence[Any]) -> None:
        dropped = set(map(id, futures))
        self._queue = deque(f for f in self._queue if id(f) not in dropped)

    def completed(self) -> Iterator[Any]:
        while self._queue:
            future = self._queue.popleft()
            if not future.done:
                future.run()
            yield future

    @staticmethod
    def outcome(future: Any) -> tuple[Any, BaseException | None]:
        return future.value, future.error


class _DaskExecutor:
    """Submits to a ``distributed.Client``; yields futures as they complete."""

    def __init__(self, client: Any) -> None:
        from distributed import as_completed

        self._client = client
        self._done = as_completed()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = self._client.submit(fn, *args, pure=False)
        self._done.add(future)
        return future

    def cancel(self, futures: Sequence[Any]) -> None:
        if futures:
            self._client.cancel(list(futures))

    def completed(self) -> Iterator[Any]:
        yield from self._done

    @staticmethod
    def outcome(future: Any) -> tuple[Any, BaseException | None]:
        if future.cancelled():
            return None, None
        try:
            return future.result(), None
        except Exception as exc:
            return None, exc


LOOPBACK_HTTP = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
"""Scheduler options of our LocalClusters: no dashboard, HTTP on loopback."""


@contextlib.contextmanager
def cluster_client(
    workers: int, memory_limit: str | int | None = None
) -> Iterator[Any]:
    """Start a LocalCluster on 127.0.0.1: ``workers`` processes, one thread each.

    No dashboard; ``memory_limit`` per worker (Dask's "auto" share of the RAM
    when None), beyond which the nanny restarts the worker.
    """
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        # the scheduler's HTTP server (health, metrics) starts even without a
        # dashboard, on 8787 unless told: a free loopback port instead, so a
        # second cluster (or a Jupyter one) neither collides nor warns
        scheduler_kwargs=LOOPBACK_HTTP,
        memory_limit=memory_limit if memory_limit is not None else "auto",
        silence_logs=logging.ERROR,
    )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


# -- the driver ----------------------------------------------------------------------


@dataclass
class _Job:
    """Driver-side state of one input."""

    path: Path
    csv_path: Path
    source: StackSource
    chunks: list[Chunk]
    target: AlignedTarget | None
    rows: dict[int, ChunkRows] = field(default_factory=dict)
    pending: set[Any] = field(default_factory=set)
    dx: npt.NDArray[np.float64] | None = None
    dy: npt.NDArray[np.float64] | None = None
    status: list[str] = field(default_factory=list)
    confidence: npt.NDArray[np.float64] | None = None
    aligning: int = 0


def aligned_path(out_dir: Path, path: Path, fmt: AlignedFormat) -> Path:
    """``out_dir/<stem>.aligned.ome.zarr`` or ``.aligned.tif``."""
    suffix = ".aligned.ome.zarr" if fmt == "zarr" else ".aligned.tif"
    return out_dir / f"{output_stem(path)}{suffix}"


def _aligned_format(
    source: StackSource, wanted: AlignedFormat | Literal["auto"] | None
) -> AlignedFormat | None:
    from ._readers import TiffSource

    if wanted == "auto":
        return "tiff" if isinstance(source, TiffSource) else "zarr"
    return wanted


def _summarise(
    path: Path,
    outcome: Outcome,
    csv_path: Path,
    aligned: Path | None,
    dx: npt.NDArray[np.float64],
    dy: npt.NDArray[np.float64],
    status: Sequence[str],
) -> InputSummary:
    norm = np.hypot(dx, dy)
    finite = norm[np.isfinite(norm)]
    return InputSummary(
        path,
        outcome,
        csv_path,
        aligned,
        len(dx),
        sum(s == "ok" for s in status),
        float(finite.max()) if finite.size else math.nan,
    )


def _read_summary(
    path: Path, csv_path: Path, aligned: Path | None, outcome: Outcome
) -> InputSummary:
    """Summary of a complete CSV on disk (for skipped inputs)."""
    import csv

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    dx = np.array([float(r["dx_px"]) for r in rows], dtype=np.float64)
    dy = np.array([float(r["dy_px"]) for r in rows], dtype=np.float64)
    return _summarise(
        path, outcome, csv_path, aligned, dx, dy, [r["status"] for r in rows]
    )


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(exc, ValueError) else f"{type(exc).__name__}: {line}"


def _compose(job: _Job, chained: bool) -> None:
    """Concatenate the chunks' rows in order; chain sequential chunks (see _plan)."""
    parts = [job.rows[c.index] for c in job.chunks]
    dx = np.concatenate([p.dx for p in parts])
    dy = np.concatenate([p.dy for p in parts])
    confidence = np.concatenate([p.confidence for p in parts])
    status = [s for p in parts for s in p.status]
    offset: tuple[float, float] | None = (0.0, 0.0)
    for k in range(1, len(parts) if chained else 0):
        prev, part = parts[k - 1], parts[k]
        if offset is not None and prev.link is not None:
            offset = (offset[0] + prev.link[0], offset[1] + prev.link[1])
        else:
            offset = part.anchor
        lo, hi = part.chunk.start, part.chunk.stop
        if offset is None:
            dx[lo:hi] = dy[lo:hi] = np.nan
            status[lo:hi] = ["no_peak"] * (hi - lo)
        else:
            dx[lo:hi] += offset[0]
            dy[lo:hi] += offset[1]
    job.dx, job.dy, job.confidence, job.status = dx, dy, confidence, status


def run_jobs(
    paths: Sequence[Path],
    out_dir: Path,
    options: RunOptions,
    *,
    client: Any | None,
    progress: BatchProgress,
) -> list[InputSummary]:
    """Register every input; return one summary per input, in input order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    executor: _LocalExecutor | _DaskExecutor = (
        _LocalExecutor() if client is None else _DaskExecutor(client)
    )
    summaries: dict[int, InputSummary] = {}
    jobs: dict[int, _Job] = {}
    owner: dict[Any, tuple[int, str]] = {}  # future -> (job, "ref"/"measure"/"align")
    chained = options.reference in _CHAINED

    def fail(index: int, path: Path, csv_path: Path, message: str) -> None:
        log.debug("input %s failed: %s", path, message)
        summaries[index] = InputSummary(path, "failed", csv_path, error=message)
        job = jobs.pop(index, None)
        if job is not None:
            executor.cancel(list(job.pending))
            if job.target is not None:
                remove_partial(job.target.partial)
        progress.input_finished(failed=True)

    for index, path in enumerate(paths):
        csv_path = out_dir / f"{output_stem(path)}.shifts.csv"
        try:
            source = open_source(path)
            check_channel(source, options.channel)
        except ValueError as exc:
            fail(index, path, csv_path, str(exc))
            continue
        fmt = _aligned_format(source, options.aligned)
        final = aligned_path(out_dir, path, fmt) if fmt else None
        if not options.overwrite and count_csv_rows(csv_path) == source.n_frames:
            if final is None or final.exists():
                summaries[index] = _read_summary(path, csv_path, final, "skipped")
                continue
        remove_partial(csv_path)  # an older CSV never stands for this run
        target = create_target(source, final, fmt) if final and fmt else None
        chunks = plan_chunks(index, source.n_frames, options.chunk_frames)
        job = jobs[index] = _Job(path, csv_path, source, chunks, target)
        progress.add_total(source.n_frames * (2 if target else 1))
        ref = executor.submit(
            prepare_reference,
            source,
            options.channel,
            options.reference,
            options.n_mean,
        )
        owner[ref] = (index, "ref")
        job.pending.add(ref)
        for chunk in chunks:
            future = executor.submit(
                measure_chunk,
                source,
                chunk,
                options.channel,
                options.reference,
                ref,
                options.registrar,
                target,
            )
            owner[future] = (index, "measure")
            job.pending.add(future)

    def finish(index: int) -> None:
        job = jobs.pop(index)
        assert job.dx is not None and job.dy is not None and job.confidence is not None
        if job.target is not None:
            finish_target(job.target)
        write_csv(job.csv_path, job.dx, job.dy, job.confidence, job.status)
        summaries[index] = _summarise(
            job.path,
            "done",
            job.csv_path,
            job.target.final if job.target else None,
            job.dx,
            job.dy,
            job.status,
        )
        progress.input_finished(failed=False)

    for future in executor.completed():
        index, kind = owner.pop(future, (-1, ""))
        current = jobs.get(index)
        if current is None:
            continue  # its input failed already
        job = current
        job.pending.discard(future)
        value, error = executor.outcome(future)
        if error is not None:
            fail(index, job.path, job.csv_path, _error_text(error))
            continue
        if kind == "measure":
            rows: ChunkRows = value
            job.rows[rows.chunk.index] = rows
            progress.advance(rows.chunk.n_frames * (2 if rows.aligned else 1))
            if len(job.rows) < len(job.chunks):
                continue
            _compose(job, chained)
            if job.target is not None and chained:
                assert job.dx is not None and job.dy is not None
                for chunk in job.chunks:
                    lo, hi = chunk.start, chunk.stop
                    f = executor.submit(
                        align_chunk,
                        job.source,
                        chunk,
                        job.dx[lo:hi],
                        job.dy[lo:hi],
                        job.target,
                    )
                    owner[f] = (index, "align")
                    job.pending.add(f)
                    job.aligning += 1
                continue
            finish(index)
        elif kind == "align":
            progress.advance(int(value))
            job.aligning -= 1
            if job.aligning == 0:
                finish(index)
    for index, job in list(jobs.items()):  # should not happen: tasks vanished
        fail(index, job.path, job.csv_path, "its tasks did not complete")
    return [summaries[i] for i in range(len(paths))]
