"""Chunk planning: which time ranges become tasks, and how chunks are chained.

Every input is cut into time chunks of ``chunk_frames`` frames; each chunk is one
task. All chunks of an input measure against the same prepared reference
(frame 0 for ``"first"``, the mean of the first ``n_mean`` frames for
``"mean"``), so they are independent and their rows are exactly what a serial
run computes frame by frame.

``"keyframe"`` (and ``"previous"``, a chain of every frame to the one before)
is sequential by nature (a frame becomes the reference when the sample has
changed). Chunks still run in parallel: chunk *k* starts a fresh key
frame chain at its own first frame *s_k* and also measures the first frame of
the next chunk, *s_{k+1}* (one frame of overlap). The driver then chains the
chunks in order: the offset of chunk *k* is the offset of chunk *k-1* plus
chunk *k-1*'s measurement of *s_k*, exactly as a serial key-frame chain would
hand over; where that link failed (blank or unmatched frame), chunk *k*'s first
frame measured directly against the global reference (frame 0) is used instead,
and when both fail the chunk's frames are reported as ``no_peak``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CHUNK_FRAMES", "Chunk", "plan_chunks", "runs_in_process"]

DEFAULT_CHUNK_FRAMES = 200
"""Frames per task: large enough to amortise a task (~1 ms of scheduling and
the reference preparation), small enough for smooth progress and load balance."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Time points ``start .. stop-1`` of input ``job`` (its ``index``-th chunk)."""

    job: int
    index: int
    start: int
    stop: int

    @property
    def n_frames(self) -> int:
        """Number of frames in the chunk."""
        return self.stop - self.start


def plan_chunks(job: int, n_frames: int, chunk_frames: int) -> list[Chunk]:
    """Split ``n_frames`` into consecutive chunks of at most ``chunk_frames``.

    >>> [(c.start, c.stop) for c in plan_chunks(0, 5, 2)]
    [(0, 2), (2, 4), (4, 5)]
    """
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1; got {chunk_frames}")
    return [
        Chunk(job, i, start, min(start + chunk_frames, n_frames))
        for i, start in enumerate(range(0, n_frames, chunk_frames))
    ]


def runs_in_process(n_chunks: int) -> bool:
    """Whether a job without a cluster asked for runs in this process.

    The rule: one chunk in total (a single input of at most ``chunk_frames``
    frames) runs in the calling process, because starting a LocalCluster (1-3 s
    and a process per worker) costs more than the work; anything larger gets a
    LocalCluster with one single-threaded worker per core.
    """
    return n_chunks <= 1
