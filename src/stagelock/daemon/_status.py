"""The daemon's status snapshot (the ``status`` reply) and its one-line summaries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DaemonStatus", "stage_summary"]


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """A consistent snapshot of the daemon (the ``status`` command's reply)."""

    state: str
    source: str
    frames_received: int
    frames_measured: int
    frames_skipped: int
    frames_failed: int
    fps: float
    dx_px: float | None
    dy_px: float | None
    confidence: float | None
    status: str | None
    last_frame: int | None
    reference_frame: int | None
    references_taken: int
    corrections: int
    alarm: str | None
    uptime_s: float
    publish_endpoint: str | None
    control_endpoint: str | None
    record_path: str | None
    stage: dict[str, Any] | None = None
    """The stage loop's :meth:`~stagelock.stage.StageLoop.status` plus the
    stage position (``position_um``) and the move from the start
    (``offset_um``); None without feedback."""

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)


def stage_summary(stage: Mapping[str, Any]) -> str:
    """``stage +0.62, -0.34 µm from start, 11 corrections, loop tracking``."""
    offset = stage.get("offset_um")
    where = (
        f"stage {offset[0]:+.3f}, {offset[1]:+.3f} µm from start"
        if offset is not None
        else "stage position unknown"
    )
    n = stage["corrections"]
    text = f"{where}, {n} correction{'' if n == 1 else 's'}, loop {stage['state']}"
    if stage.get("alarm"):
        text += f", alarm {stage['alarm']}"
    return text
