"""Register many stacks, and huge ones, on a Dask cluster; OME-Zarr in and out.

:func:`register_many` registers every input on its own (``out_dir/<stem>.shifts.csv``
and, when asked, the aligned stack), cutting each into time chunks that run as
tasks on a ``distributed`` cluster: an existing one (``client=``, or
``scheduler="tcp://HOST:PORT"``), a LocalCluster of ``workers`` single-threaded
processes on 127.0.0.1, or — for a job of one chunk — this process.
See :mod:`stagelock.batch._plan` for how chunks of a key-frame run are chained.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from ._plan import DEFAULT_CHUNK_FRAMES, Chunk, plan_chunks, runs_in_process
from ._progress import BatchProgress, summary_table
from ._readers import (
    BioImageSource,
    MMSequenceSource,
    StackSource,
    TiffSource,
    ZarrSource,
    expand_inputs,
    open_source,
    output_stem,
    stems_clash,
)
from ._run import (
    LOOPBACK_HTTP,
    InputSummary,
    Reference,
    RunOptions,
    cluster_client,
    run_jobs,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from ._writers import AlignedFormat

__all__ = [
    "DEFAULT_CHUNK_FRAMES",
    "LOOPBACK_HTTP",
    "BioImageSource",
    "Chunk",
    "InputSummary",
    "MMSequenceSource",
    "StackSource",
    "TiffSource",
    "ZarrSource",
    "expand_inputs",
    "open_source",
    "output_stem",
    "plan_chunks",
    "register_many",
    "summary_table",
]


def _needs_dask() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ValueError(
            "several chunks need dask.distributed: pip install 'stagelock[dask]'"
        ) from None


@contextlib.contextmanager
def _client(
    client: Any | None,
    workers: int | None,
    scheduler: str | None,
    memory_limit: str | int | None,
    n_chunks: int,
) -> Iterator[Any | None]:
    """Yield the client to run on (None: this process); close it if ours."""
    with _quiet_dask():
        yield from _pick(client, workers, scheduler, memory_limit, n_chunks)


@contextlib.contextmanager
def _quiet_dask() -> Iterator[None]:
    """Keep dask.distributed's INFO chatter (scheduler, nanny) off the console."""
    import logging

    logger = logging.getLogger("distributed")
    level = logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pick(
    client: Any | None,
    workers: int | None,
    scheduler: str | None,
    memory_limit: str | int | None,
    n_chunks: int,
) -> Iterator[Any | None]:
    if client is not None:
        yield client
        return
    if scheduler is not None:
        _needs_dask()
        from distributed import Client

        with Client(scheduler) as own:
            yield own
        return
    if workers == 0 or (workers is None and runs_in_process(n_chunks)):
        yield None
        return
    _needs_dask()
    with cluster_client(workers or os.cpu_count() or 1, memory_limit) as own:
        yield own


def register_many(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    client: Any | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    memory_limit: str | int | None = None,
    aligned: AlignedFormat | Literal["auto"] | None = None,
    overwrite: bool = False,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    reference: Reference = "first",
    n_mean: int = 10,
    channel: int = 0,
    progress: bool | None = False,
    **registrar_options: Any,
) -> tuple[InputSummary, ...]:
    """Register many stacks (and huge ones) in parallel; one summary per input.

    Parameters
    ----------
    paths : iterable of str or Path
        Files, globs and directories (see :func:`expand_inputs`): TIFF/OME-TIFF,
        OME-Zarr 0.4/0.5 (zarr v2/v3), Micro-Manager image-sequence folders,
        ND2/CZI/LIF with bioio installed.
    out_dir : str or Path
        Gets ``<stem>.shifts.csv`` per input (frame,dx_px,dy_px,confidence,status)
        and, with ``aligned``, ``<stem>.aligned.ome.zarr`` / ``<stem>.aligned.tif``.
    client : distributed.Client, optional
        Run on this cluster (not closed afterwards).
    workers : int, optional
        Start a LocalCluster of this many single-threaded worker processes on
        127.0.0.1 (0: run in this process). Default: this process when the whole
        job is one chunk, else one worker per core.
    scheduler : str, optional
        Address of a running scheduler (``tcp://127.0.0.1:8786``).
    memory_limit : str or int, optional
        Per-worker memory limit of the LocalCluster (``"500MB"``).
    aligned : {"auto", "zarr", "tiff"}, optional
        Also write the aligned stack: OME-Zarr, TIFF, or ``"auto"`` (TIFF for
        TIFF input, OME-Zarr otherwise). Default: shifts only.
    overwrite : bool
        Redo inputs whose outputs are already complete (default: skip them).
    chunk_frames : int
        Frames per task.
    reference : {"first", "mean", "keyframe", "previous"}
        As :func:`stagelock.iter_estimates`; key-frame and previous-frame
        chains are cut at chunk boundaries and re-joined (see
        :mod:`stagelock.batch._plan`).
    n_mean : int
        Frames averaged by ``reference="mean"``.
    channel : int
        Channel registered on; every channel is shifted in the aligned stack.
    progress : bool or None
        ``None``: a rich bar on a terminal, plain lines otherwise; ``False``
        (default): silent.
    **registrar_options
        Passed to :class:`stagelock.Registrar` (``roi``, ``max_shift_px``, ...).

    Returns
    -------
    tuple of InputSummary
        In input order; inputs that failed have ``outcome="failed"`` and an
        ``error`` line, the others are complete on disk.

    Raises
    ------
    ValueError
        If two inputs would write the same outputs, or no input is given.
    """
    inputs = expand_inputs(paths)
    if not inputs:
        raise ValueError("no input stacks given")
    clash = stems_clash(inputs)
    if clash:
        raise ValueError(clash)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1; got {chunk_frames}")
    if reference not in get_args(Reference):
        raise ValueError(
            "reference must be 'first', 'mean', 'keyframe' or 'previous'; "
            f"got {reference!r}"
        )
    options = RunOptions(
        reference=reference,
        n_mean=n_mean,
        channel=channel,
        chunk_frames=chunk_frames,
        aligned=aligned,
        overwrite=overwrite,
        registrar=dict(registrar_options),
    )
    n_chunks = _count_chunks(inputs, chunk_frames)
    with (
        _client(client, workers, scheduler, memory_limit, n_chunks) as active,
        BatchProgress(enabled=progress) as bar,
    ):
        return tuple(
            run_jobs(inputs, Path(out_dir), options, client=active, progress=bar)
        )


def _count_chunks(inputs: list[Path], chunk_frames: int) -> int:
    """Chunks of the whole job (an unreadable input counts as one)."""
    total = 0
    for path in inputs:
        try:
            n = open_source(path).n_frames
        except ValueError:
            n = 1
        total += max(1, -(-n // chunk_frames))
    return total
