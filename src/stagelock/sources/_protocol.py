"""The contract every frame source fulfils."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Frame", "FrameCallback", "FrameSource"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame as it arrives.

    Attributes
    ----------
    image : ndarray, shape (H, W)
        The pixels (not copied; consumers must not modify them).
    index : int
        Acquisition index (frame number in the source's own numbering).
    time_s : float
        Unix time at which the frame arrived (``time.time()``).
    source : str
        Name of the source (camera label, folder path...).
    metadata : mapping
        Anything else the source knows (file name, MDA event, stage position...).
    """

    image: npt.NDArray[np.generic]
    index: int
    time_s: float
    source: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


FrameCallback = Callable[[Frame], None]


@runtime_checkable
class FrameSource(Protocol):
    """Delivers frames by calling a callback, from a thread of its own.

    The callback must return quickly (it hands the frame to a latest-wins slot);
    a source never waits for a frame to be measured.

    Attributes
    ----------
    name : str
        Put in every frame's ``source`` and in every message.
    frames_at_start : bool
        True when frames flow as soon as :meth:`start` returns (a camera); False
        when the source may stay quiet for hours and is ready once started (a
        watched folder). The daemon tells systemd it is ready accordingly.
    core : CMMCorePlus or None
        The Micro-Manager core behind the frames, when there is one (optional
        capability: a stage loop needs it); None otherwise.
    finished : bool
        Optional capability: True once the source has ended for good (an MDA it
        ran itself is over); the daemon then stops after the last frame. Sources
        without it (a camera, a folder) run until stopped.
    """

    name: str
    frames_at_start: bool
    core: Any

    def start(self, on_frame: FrameCallback) -> None:
        """Begin delivering frames to ``on_frame``; returns immediately."""

    def stop(self) -> None:
        """Stop delivering frames and release resources; idempotent."""
