"""stagelock: hold a microscope's field of view still while it acquires.

Measure every frame's sub-pixel XY drift against a reference, publish it, record
it, and optionally feed it back to the motorised stage.

The public names are imported on first use (PEP 562), so ``stagelock ctl`` and
other light commands do not pay for pymmcore-plus, OpenCV and Dask.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._attach import AttachHandle, FrameShift, attach
    from .batch import register_many
    from .registration import (
        Registrar,
        ShiftEstimate,
        Status,
        estimate_shifts,
        iter_estimates,
        shift_image,
    )

    Shift = ShiftEstimate

    __version__: str

_LAZY = {
    "AttachHandle": "._attach",
    "FrameShift": "._attach",
    "attach": "._attach",
    "register_many": ".batch",
    "Registrar": ".registration",
    "ShiftEstimate": ".registration",
    "Shift": ".registration",  # alias of ShiftEstimate
    "Status": ".registration",
    "estimate_shifts": ".registration",
    "iter_estimates": ".registration",
    "shift_image": ".registration",
}

__all__ = [
    "AttachHandle",
    "FrameShift",
    "Registrar",
    "Shift",
    "ShiftEstimate",
    "Status",
    "__version__",
    "attach",
    "estimate_shifts",
    "iter_estimates",
    "register_many",
    "shift_image",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stagelock")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = value = _version()
        return value
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'stagelock' has no attribute {name!r}") from None
    value = getattr(
        importlib.import_module(module, __name__),
        "ShiftEstimate" if name == "Shift" else name,
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
