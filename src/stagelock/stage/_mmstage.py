"""A :class:`StageDriver` over the XY stage of any pymmcore-plus core."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

__all__ = ["MMStageDriver"]


class MMStageDriver:
    """Drive a Micro-Manager XY stage through a ``CMMCorePlus``/``UniMMCore``.

    Parameters
    ----------
    core : CMMCorePlus
        A core with an XY stage loaded (compiled adapter or Python device).
    device : str, optional
        XY stage label; default the core's current XY stage device.
    poll_s : float
        Polling period of :meth:`wait`.

    Raises
    ------
    ValueError
        If no XY stage is selected or ``device`` is not loaded.

    Notes
    -----
    Moves use ``setRelativeXYPosition``, which returns once the command is sent
    for Micro-Manager stage adapters (the move completes in the background while
    ``deviceBusy`` is true), so measurement never waits for the stage. The core
    serialises device calls internally, so a driver may be used from a thread
    other than the acquisition's.
    """

    def __init__(
        self, core: CMMCorePlus, device: str | None = None, *, poll_s: float = 0.005
    ) -> None:
        label = device or core.getXYStageDevice()
        if not label:
            raise ValueError(
                "the core has no XY stage selected; load one or pass device='...'"
            )
        if label not in core.getLoadedDevices():
            raise ValueError(f"XY stage {label!r} is not loaded in the core")
        self.core = core
        self.device = str(label)
        self.poll_s = float(poll_s)

    def get_position_um(self) -> tuple[float, float]:
        """Return the stage's reported (x, y) position in µm."""
        x, y = self.core.getXYPosition(self.device)
        return float(x), float(y)

    def move_relative_um(self, dx_um: float, dy_um: float) -> None:
        """Start a relative move by (dx, dy) µm; returns without waiting."""
        self.core.setRelativeXYPosition(self.device, float(dx_um), float(dy_um))

    def is_busy(self) -> bool:
        """Return True while the stage moves or settles."""
        return bool(self.core.deviceBusy(self.device))

    def wait(self, timeout_s: float) -> None:
        """Block until the stage is idle.

        Raises
        ------
        TimeoutError
            If the stage is still busy after ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + float(timeout_s)
        while self.is_busy():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"XY stage {self.device!r} still busy after {timeout_s:g} s"
                )
            time.sleep(self.poll_s)

    def __repr__(self) -> str:
        return f"MMStageDriver(device={self.device!r})"
