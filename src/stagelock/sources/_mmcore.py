"""Frames from Micro-Manager through pymmcore-plus.

Two ways to get frames from a ``CMMCorePlus`` (compiled devices) or ``UniMMCore``
(Python devices):

* **own mode** — the source runs the acquisition itself: a continuous sequence
  acquisition (``interval_ms=0``), a snap loop at ``interval_ms``, or a useq MDA
  sequence;
* **observe mode** — someone else (a script, napari-micromanager) runs the
  acquisition and the source only watches: MDA frames arrive through
  ``core.mda.events.frameReady``; continuous/live sequences have no per-frame
  signal, so the circular buffer is polled with the *non-consuming*
  ``getLastImageAndMD()`` — never ``popNextImage()``, which would steal frames
  from the acquisition's owner.

Frames are handed to ``on_frame`` at once from the thread that received them; the
consumer is expected to be a latest-wins slot.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from ._protocol import Frame, FrameCallback

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy.typing as npt
    import useq
    from pymmcore_plus import CMMCorePlus

    from stagelock.config import MicroManagerSourceConfig

__all__ = ["MMCoreSource", "SourceState", "open_core", "release_core"]

logger = logging.getLogger(__name__)

# together these change from frame to frame, also across sequences (whose image
# numbers restart at 0)
_IMAGE_NUMBER_KEYS = ("ImageNumber", "ElapsedTime-ms", "TimeReceivedByCore")


class SourceState(str, Enum):
    """Where an :class:`MMCoreSource` is in its life."""

    IDLE = "idle"
    """Created, not started."""
    RUNNING = "running"
    """Delivering frames (or waiting for an acquisition to observe)."""
    LOST = "lost"
    """The camera failed; the source keeps retrying."""
    STOPPED = "stopped"
    """``stop()`` was called; terminal."""


class MMCoreSource:
    """A :class:`~stagelock.sources.FrameSource` reading a pymmcore-plus core.

    Parameters
    ----------
    core : CMMCorePlus
        A loaded core (``CMMCorePlus`` or ``UniMMCore``) with a camera selected.
    interval_ms : float
        Own mode only: 0 runs a continuous sequence acquisition (frames as fast
        as the camera delivers them); > 0 snaps one frame every ``interval_ms``.
    observe : bool
        Watch acquisitions run by someone else instead of running one.
    mda_sequence : useq.MDASequence, optional
        Own mode only: run this MDA (``core.run_mda``) and deliver its frames.
    name : str, optional
        Name put in every frame's ``source``; default ``"mmcore:<camera label>"``.
    poll_interval_s : float
        How often the circular buffer is checked in continuous own mode, and
        the shortest polling period in observe mode (which otherwise polls at
        half the exposure time, at most every 50 ms, because each look copies
        the newest frame).
    retry_s : float
        After a camera error in own mode, how long to wait before trying again.
    lock_channel, lock_z : optional
        Which MDA frames are lock frames (``metadata["lock"]``; default the
        sequence's first channel and middle plane); the others follow.

    Notes
    -----
    State machine (``state``)::

        IDLE --start()--> RUNNING --camera error--> LOST --recovered--> RUNNING
          any --stop()--> STOPPED

    ``reconnects`` counts LOST → RUNNING transitions. Frame indices are the
    source's own count of delivered frames, from 0; the camera's own image
    number (when known) and, for MDA frames, ``mda_index`` (``{"t": 3}``) and
    the event's stage position (``x_um``, ``y_um``) are in ``frame.metadata``,
    with ``position``, ``position_name``, ``channel``, ``z``, ``grid`` and
    ``lock`` (and, when a :class:`~stagelock.stage.LockingEngine` set the event
    up, the ``offset_x_um``/``offset_y_um`` it commanded and ``lock_time_s``).
    """

    def __init__(
        self,
        core: CMMCorePlus,
        *,
        interval_ms: float = 0.0,
        observe: bool = False,
        mda_sequence: useq.MDASequence | None = None,
        name: str | None = None,
        poll_interval_s: float = 0.002,
        retry_s: float = 1.0,
        lock_channel: str | int | None = None,
        lock_z: int | None = None,
    ) -> None:
        if not interval_ms >= 0:
            raise ValueError(f"interval_ms must be >= 0; got {interval_ms}")
        if observe and mda_sequence is not None:
            raise ValueError("mda_sequence runs an acquisition; it cannot be observed")
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0; got {poll_interval_s}")
        self.core = core
        self.frames_at_start = True
        self.interval_ms = float(interval_ms)
        self.observe = bool(observe)
        self.mda_sequence = mda_sequence
        self.name: str = name or f"mmcore:{core.getCameraDevice() or 'camera'}"
        self.poll_interval_s = float(poll_interval_s)
        self.retry_s = float(retry_s)
        self.lock_channel = lock_channel
        self.lock_z = lock_z
        self._selector: Any = None
        self._selector_for: Any = None
        self.state = SourceState.IDLE
        self.reconnects = 0
        self.frames_delivered = 0
        self._on_frame: FrameCallback | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mda_thread: threading.Thread | None = None
        self._connected = False
        self._lock = threading.Lock()

    # -- public API ---------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True while the camera is failing."""
        return self.state is SourceState.LOST

    def start(self, on_frame: FrameCallback) -> None:
        """Begin delivering frames to ``on_frame``; returns immediately.

        Raises
        ------
        RuntimeError
            When started twice, or when no camera is selected in the core.
        """
        if self.state is not SourceState.IDLE:
            raise RuntimeError(f"MMCoreSource can start once; it is {self.state.value}")
        if not self.core.getCameraDevice():
            raise RuntimeError(
                "the core has no camera selected: load a configuration or call "
                "core.setCameraDevice(label) first"
            )
        self._on_frame = on_frame
        self.state = SourceState.RUNNING
        if self.observe or self.mda_sequence is not None:
            self.core.mda.events.frameReady.connect(self._on_mda_frame)
            self._connected = True
        if self.mda_sequence is not None:
            self._mda_thread = self.core.run_mda(self.mda_sequence)
            return
        target = self._observe_loop if self.observe else self._own_loop
        self._thread = threading.Thread(
            target=target, name=f"stagelock-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop delivering frames and any acquisition started here; idempotent."""
        if self.state is SourceState.STOPPED:
            return
        self._stop.set()
        if self._connected:
            with contextlib.suppress(Exception):
                self.core.mda.events.frameReady.disconnect(self._on_mda_frame)
            self._connected = False
        if self._mda_thread is not None:
            if self._mda_thread.is_alive():
                self.core.mda.cancel()
            self._mda_thread.join(timeout=10.0)
            self._mda_thread = None
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():  # pragma: no cover - a wedged camera call
                logger.warning("%s: acquisition thread did not stop in 10 s", self.name)
            self._thread = None
        self.state = SourceState.STOPPED

    @property
    def finished(self) -> bool:
        """True once an MDA this source ran itself has ended: no frame will follow."""
        thread = self._mda_thread
        return thread is not None and not thread.is_alive()

    def wait_done(self, timeout_s: float | None = None) -> bool:
        """Wait for an own-mode MDA to finish; True when it has (or there is none)."""
        thread = self._mda_thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    # -- delivery -------------------------------------------------------------------

    def _deliver(self, image: npt.NDArray[Any], metadata: Mapping[str, Any]) -> None:
        callback = self._on_frame
        if callback is None or self._stop.is_set():
            return
        with self._lock:
            index = self.frames_delivered
            self.frames_delivered += 1
        frame = Frame(image, index, time.time(), self.name, metadata)
        try:
            callback(frame)
        except Exception:
            # a failing consumer must never break the acquisition thread
            logger.exception("%s: the frame consumer raised", self.name)

    def _on_mda_frame(self, image: npt.NDArray[Any], event: Any, meta: Any) -> None:
        # runs on the MDA thread: build the frame and hand it over, nothing more;
        # plain JSON-friendly values only (sinks may serialise the metadata)
        meta_out: dict[str, Any] = {"mda_index": dict(event.index)}
        for key, value in (("x_um", event.x_pos), ("y_um", event.y_pos)):
            if value is not None:
                meta_out[key] = float(value)
        meta_out.update(self._position_meta(event))
        self._deliver(image, meta_out)

    def _position_meta(self, event: Any) -> dict[str, Any]:
        """Position, channel, plane and lock role of an MDA frame (see the daemon)."""
        from stagelock.stage._mda import META_KEY, LockSelector

        index = event.index
        meta: dict[str, Any] = {
            "position": int(index.get("p", 0)),
            "position_name": event.pos_name,
            "channel": None if event.channel is None else event.channel.config,
            "z": index.get("z"),
            "grid": index.get("g"),
        }
        record = event.metadata.get(META_KEY)
        if record:  # a LockingEngine set this event up: what it commanded
            meta["lock"] = bool(record["lock"])
            meta["offset_x_um"] = float(record["offset_x_um"])
            meta["offset_y_um"] = float(record["offset_y_um"])
            meta["lock_time_s"] = float(record["time_s"])
            return meta
        sequence = event.sequence
        if sequence is not None:
            if self._selector is None or self._selector_for is not sequence:
                self._selector = LockSelector(self.lock_channel, self.lock_z)
                self._selector.begin(sequence)
                self._selector_for = sequence
            meta["lock"] = self._selector.is_lock(event)
        return meta

    def _mark_lost(self, error: BaseException) -> None:
        if self.state is not SourceState.LOST:
            logger.warning("%s: camera lost: %s", self.name, error)
            self.state = SourceState.LOST

    def _mark_ok(self) -> None:
        if self.state is SourceState.LOST:
            self.reconnects += 1
            logger.warning("%s: camera reconnected", self.name)
            self.state = SourceState.RUNNING

    # -- own mode -------------------------------------------------------------------

    def _own_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.interval_ms > 0:
                    self._snap_loop()
                else:
                    self._sequence_loop()
            except Exception as error:
                self._mark_lost(error)
                self._stop.wait(self.retry_s)

    def _snap_loop(self) -> None:
        core = self.core
        next_t = time.monotonic()
        while not self._stop.is_set():
            core.snapImage()
            image = core.getImage()
            self._mark_ok()
            self._deliver(image, {"camera": core.getCameraDevice()})
            next_t += self.interval_ms / 1000.0
            now = time.monotonic()
            if next_t < now:  # we fell behind: don't burst to catch up
                next_t = now
            self._stop.wait(next_t - now)

    def _sequence_loop(self) -> None:
        core = self.core
        if core.isSequenceRunning():
            raise RuntimeError(
                "a sequence acquisition is already running on this core; "
                "use observe=True to watch it"
            )
        core.startContinuousSequenceAcquisition(0)
        try:
            while not self._stop.is_set():
                if core.getRemainingImageCount() > 0:
                    # we own this sequence, so consuming its frames is right
                    # (and keeps the circular buffer from filling up)
                    image, md = core.popNextImageAndMD()
                    self._mark_ok()
                    self._deliver(image, _md_dict(md))
                elif not core.isSequenceRunning():
                    raise RuntimeError("the sequence acquisition stopped by itself")
                else:
                    self._stop.wait(self.poll_interval_s)
        finally:
            with contextlib.suppress(Exception):
                core.stopSequenceAcquisition()

    # -- observe mode ---------------------------------------------------------------

    def _observe_loop(self) -> None:
        core = self.core
        last_key: object = None
        was_running = False
        period_s = self.poll_interval_s
        while not self._stop.wait(period_s):
            try:
                # every look copies the newest frame: poll at about twice the
                # frame rate, not faster, so big cameras don't cost a core
                exposure_s = float(core.getExposure()) / 1000.0
                period_s = max(self.poll_interval_s, min(0.05, exposure_s / 2))
                # MDA frames come through frameReady; a hardware-sequenced MDA
                # also fills the buffer, which must not be delivered twice
                if core.mda.is_running():
                    was_running = False
                    continue
                running = core.isSequenceRunning()
                # one more look after the sequence ends: its last frame
                if not running and not was_running:
                    continue
                was_running = running
                try:
                    image, md = core.getLastImageAndMD()
                except (IndexError, RuntimeError):
                    continue  # sequence started, buffer still empty
            except Exception as error:  # pragma: no cover - core torn down
                logger.debug("%s: polling failed: %s", self.name, error)
                continue
            meta = _md_dict(md)
            key = _frame_key(image, meta)
            if key == last_key:
                continue
            last_key = key
            self._deliver(image, meta)


def _md_dict(md: Any) -> dict[str, Any]:
    """Convert a pymmcore ``Metadata`` to a plain dict (empty on failure)."""
    try:
        return {key: md.GetSingleTag(key).GetValue() for key in md.GetKeys()}
    except Exception:  # pragma: no cover - exotic metadata objects
        return {}


def _frame_key(image: npt.NDArray[Any], meta: Mapping[str, Any]) -> object:
    """Something that changes from one camera frame to the next."""
    key = tuple(meta[k] for k in _IMAGE_NUMBER_KEYS if k in meta)
    if key:
        return key
    # no counter in the metadata: fall back to a sample of the pixels
    flat = np.ascontiguousarray(image).reshape(-1)
    return hash(flat[:: max(1, flat.size // 4096)].tobytes())


def _demo_installed() -> bool:
    """Tell whether the ``demo`` extra (``mm-test-adapters``) can be imported."""
    try:
        import mm_test_adapters  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def open_core(settings: MicroManagerSourceConfig | None = None) -> CMMCorePlus:
    """Load a Micro-Manager core as ``[source.micromanager]`` describes it.

    The one way stagelock opens a core (the daemon and ``stagelock calibrate``):
    the system configuration (default: the demo configuration of the
    ``mm-test-adapters`` wheel), then the camera, then every device property.

    Parameters
    ----------
    settings : MicroManagerSourceConfig, optional
        ``config_file``, ``camera`` and ``properties``; default: the demo
        configuration as it loads.

    Returns
    -------
    CMMCorePlus
        Loaded; release it with :func:`release_core`.

    Raises
    ------
    RuntimeError
        When the configuration cannot be loaded or a property cannot be set;
        one line naming what failed. Nothing is left loaded.
    """
    from pymmcore_plus import CMMCorePlus

    config_file = None if settings is None else settings.config_file
    what = config_file or "the demo configuration (mm-test-adapters)"
    if config_file is None and not _demo_installed():
        raise RuntimeError(
            "no config_file given and the Micro-Manager demo devices are not "
            'installed: pip install "stagelock[demo]" (or set '
            "source.micromanager.config_file to your .cfg)"
        )
    core = CMMCorePlus()
    try:
        try:
            if config_file is None:
                core.loadSystemConfiguration()
            else:
                core.loadSystemConfiguration(str(config_file))
        except Exception as exc:
            raise RuntimeError(f"cannot load {what}: {exc}") from None
        if settings is not None and settings.camera:
            try:
                core.setCameraDevice(settings.camera)
            except Exception as exc:
                raise RuntimeError(
                    f"camera: cannot select {settings.camera!r}: {exc}"
                ) from None
        for device, prop, value in () if settings is None else settings.properties:
            try:
                core.setProperty(device, prop, value)
            except Exception as exc:
                raise RuntimeError(
                    f"properties: cannot set {device}.{prop} = {value!r}: {exc}"
                ) from None
    except BaseException:
        release_core(core)
        raise
    return core


def release_core(core: CMMCorePlus | None) -> None:
    """Stop acquisitions, unload all devices and collect garbage.

    A compiled core still alive at interpreter exit can abort the process (exit
    134); call this in ``finally`` blocks and fixture teardowns, then drop your
    own references to ``core``.

    Parameters
    ----------
    core : CMMCorePlus or None
        The core to release; None is accepted and ignored.
    """
    if core is None:
        return
    with contextlib.suppress(Exception):
        if core.mda.is_running():
            core.mda.cancel()
            deadline = time.monotonic() + 10.0
            while core.mda.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
    with contextlib.suppress(Exception):
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    with contextlib.suppress(Exception):
        core.unloadAllDevices()
    gc.collect()
