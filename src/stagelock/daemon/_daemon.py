"""The live drift-measurement daemon: source → latest-wins slot → worker → sinks.

This module only wires parts together: a :class:`~stagelock.sources.FrameSource`
pushes frames into a :class:`~stagelock.daemon.KeyedLatestSlot` (latest wins,
per position); one worker thread takes the newest frame, measures it with a
:class:`~stagelock.Registrar` (one per position when frames carry one) and hands
the message to every sink (recorder first, then the ZeroMQ publisher, so anything
a subscriber saw is on disk); a control server answers commands from its own
thread; the main thread waits for a stop request (signal, ``stop`` command,
``--frames``/``--duration``) and runs the one shutdown path.

With ``[stage] feedback = true`` the worker also hands every measurement to a
:class:`~stagelock.stage.StageLoop`, which may start a stage move; each
correction (or refused correction) is sent on ``stagelock.correction`` right
after the shift that caused it. The camera→stage calibration comes from
``stage.calibration_file`` or is measured on the live core at start-up, before
the first frame is measured (:func:`build_stage_loop`).

Size: this module is over 600 lines because the state machine's transitions
(reference taking per position, resume from a state directory, quality and
stall alarms) all read and write the one state guarded by ``_lock``; wiring,
commands, alarms and status already live in their own modules. The next split
is the reference bookkeeping (taking, saving, resuming) into ``_references.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stagelock._pixels import finite_pixels
from stagelock.protocol import (
    CORRECTION_TOPIC,
    SHIFT_SCHEMA,
    SHIFT_TOPIC,
    STATUS_SCHEMA,
    STATUS_TOPIC,
    DaemonState,
    ShiftMessage,
    StatusMessage,
    finite_or_none,
    json_safe,
)
from stagelock.registration import Registrar, ShiftEstimate, Status

from ._alarms import Alarms
from ._commands import COMMANDS
from ._rpc import ControlServer
from ._sdnotify import SystemdNotifier
from ._slot import KeyedLatestSlot, SlotClosed
from ._status import DaemonStatus, stage_summary

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from stagelock.config import Config
    from stagelock.security import ServerKeys
    from stagelock.sinks import ShiftSink
    from stagelock.sources import Frame, FrameSource
    from stagelock.stage import Alarm, PositionKey, PositionLocks, StageLoop

    from ._state import SavedState, StateDir

__all__ = ["Daemon", "DaemonError"]

logger = logging.getLogger("stagelock.daemon")


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


class Daemon:
    """Measure every frame a source delivers and send the shifts to sinks.

    Parameters
    ----------
    config : Config
        Registration, logging, limits (``frames``, ``duration_s``), control
        endpoint.
    source : FrameSource
        Where frames come from; started by :meth:`start`, stopped on shutdown.
    sinks : sequence of ShiftSink
        Receive every message in order (put the recorder before the publisher).
    notifier : SystemdNotifier, optional
        systemd notifications; default one reading the environment.
    control : bool
        Bind the control socket at ``config.control.endpoint``.
    cleanup : sequence of callables
        Run last on shutdown (e.g. releasing a Micro-Manager core).
    position_locks : PositionLocks, optional
        Per-position lock state for frames that carry a ``position`` in their
        metadata (MDAs, multi-position folders); with feedback, the
        :class:`~stagelock.stage.LockingEngine` installed on the core reads its
        offsets from it. Default: a measure-only table made on the first such
        frame.
    stage_loop : StageLoop, optional
        Closed-loop correction: :meth:`StageLoop.update` is called with every
        measured frame on the worker thread, and what it returns is sent on
        ``stagelock.correction``. ``pause``/``resume`` pause and resume it too,
        a new reference resets its drift history (not its travel-limit origin:
        ``reset_origin`` does that).
    state_dir : StateDir, optional
        Where every new reference and the stage origin are saved as they
        change; :meth:`resume_from` continues from what was saved there.
    server_keys : ServerKeys, optional
        Make the control socket a CURVE server (the caller runs the
        authenticator; see :mod:`stagelock.security`).

    Notes
    -----
    State machine (:class:`DaemonState`)::

        starting → referencing → measuring ⇄ paused
                         ↑  rereference ↓     measuring ⇄ source_lost
        any → stopping → stopped

    ``paused`` stops measuring *and* correcting (the stage stays where it is);
    ``resume`` restarts both, and also clears a stage-driver error.

    Threads: the source's (calls :meth:`_on_frame`: counts and puts in the slot),
    the worker (measures, owns the sinks and the publisher socket), the control
    server's, and the caller of :meth:`run` (waits, then shuts down).
    """

    def __init__(
        self,
        config: Config,
        source: FrameSource,
        *,
        sinks: Sequence[ShiftSink] = (),
        notifier: SystemdNotifier | None = None,
        control: bool = True,
        cleanup: Sequence[Callable[[], None]] = (),
        publish_endpoint: str | None = None,
        record_path: str | None = None,
        stage_loop: StageLoop | None = None,
        position_locks: PositionLocks | None = None,
        state_dir: StateDir | None = None,
        server_keys: ServerKeys | None = None,
    ) -> None:
        self.config = config
        self.server_keys = server_keys
        self.state_dir = state_dir
        self.source = source
        self.sinks = list(sinks)
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self._cleanup = list(cleanup)
        self._want_control = control
        self.control: ControlServer | None = None
        self.pixel_size_um = config.effective_pixel_size_um
        self._publish_endpoint = publish_endpoint
        self._record_path = record_path
        self.stage_loop = stage_loop
        self.position_locks = position_locks
        if position_locks is not None and position_locks.on_alarm is None:
            position_locks.on_alarm = self._on_position_alarm
        self._no_frames_alarm = False
        if stage_loop is not None and stage_loop.on_alarm is None:
            stage_loop.on_alarm = self._on_stage_alarm

        # latest wins per position: a frame never replaces another position's
        self._slot: KeyedLatestSlot[Frame] = KeyedLatestSlot(_position_of)
        self._lock = threading.Lock()
        # the sinks are called from the worker (shifts, corrections, alarms)
        # and the run loop (heartbeats), and neither a ZeroMQ socket nor the
        # ShiftSink protocol promises thread safety, so every send goes through
        # this lock (re-entrant: a failing sink raises an alarm, which is sent too)
        self._send_lock = threading.RLock()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._worker: threading.Thread | None = None
        self._shutdown_done = False
        self._started_at = time.monotonic()

        # state shared with the control thread: read and written under _lock
        self._state = DaemonState.STARTING
        self._paused = False
        self._rereference = False
        self._frames_received = 0
        self._last_arrival: float | None = None
        self._frames_measured = 0
        self._frames_failed = 0
        self._last: tuple[Frame, ShiftEstimate] | None = None
        self._reference_frame: int | None = None
        self._references_taken = 0
        self._corrections = 0
        self.alarms = Alarms(source.name, self._send)
        self._measure_times: collections.deque[float] = collections.deque(maxlen=64)

        # worker-only state
        self._registrar: Registrar | None = None
        self._reference_shape: tuple[int, ...] | None = None
        self._mean_frames: list[Frame] = []
        self._bad_run = 0
        self._ready_sent = False
        coverage = config.registration.coverage
        self._coverage: float | None = None if coverage == "auto" else coverage
        self._resumed = False  # the registrar came from the state directory
        self._frame_base = 0  # added to the source's frame numbers (resumed run)
        self._note_failed = False
        self._fatal: str | None = None  # a stop that must fail the run (exit 2)
        self._failed_sinks: set[int] = set()
        self.exit_code = 0
        """What :meth:`run` returns: 0, or 1 when a sink (the record) failed."""

    # -- public control ---------------------------------------------------------------

    def pause(self) -> None:
        """Stop measuring (frames are dropped) until :meth:`resume`."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
        if self.stage_loop is not None:
            self.stage_loop.pause()
        self._set_state(DaemonState.PAUSED)

    def resume(self) -> None:
        """Measure again after :meth:`pause`."""
        with self._lock:
            if not self._paused:
                return
            self._paused = False
            has_ref = self._registrar is not None
        if self.stage_loop is not None:
            self.stage_loop.resume()
        self._set_state(DaemonState.MEASURING if has_ref else DaemonState.REFERENCING)

    def rereference(self) -> None:
        """Take a new reference from the next frames (per the strategy)."""
        with self._lock:
            self._rereference = True
        logger.info("new reference requested")

    def reset_origin(self) -> None:
        """Centre the stage's travel limit on its position at the next frame."""
        if self.stage_loop is None:
            raise ValueError("no stage loop (stage.feedback = false)")
        self.stage_loop.reset_origin()
        logger.info("travel-limit origin reset: the next frame's stage position")

    def resume_from(self, saved: SavedState, registrar: Registrar) -> None:
        """Continue from a saved state: its reference and stage origin (a restart).

        Call before :meth:`start`. Shifts stay relative to the saved reference;
        the stage loop keeps the saved travel-limit origin and reference position;
        frame numbers go on from the last one handled.

        Parameters
        ----------
        saved : SavedState
            Read from the state directory (:meth:`StateDir.load`).
        registrar : Registrar
            Rebuilt from the saved reference.
        """
        from ._state import DEFAULT_POSITION

        ref = saved.references[DEFAULT_POSITION]
        if json_safe(dict(ref.registrar)) != json_safe(self._registrar_kwargs()):
            logger.warning(
                "the [registration] settings differ from those of the saved "
                "reference; resuming with the saved ones (start with --fresh to "
                "apply the new ones)"
            )
        self._registrar = registrar
        self._resumed = True
        self._frame_base = saved.next_frame
        with self._lock:
            self._reference_frame = ref.frame
        if self.stage_loop is not None:
            self.stage_loop.restore(saved.origin_um, ref.stage_position_um)
        logger.info(
            "resumed from %s: reference %s taken %s, %d template regions",
            self.state_dir.path if self.state_dir is not None else "saved state",
            ref.what,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ref.taken_at)),
            len(registrar.regions),
        )

    def request_stop(self, reason: str) -> None:
        """Ask the daemon to stop; safe from any thread and from signal handlers."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def status(self) -> DaemonStatus:
        """Take a snapshot of counters, the last shift and the state."""
        # the stage is read outside the daemon's lock (a device call)
        stage = self._stage_status()
        with self._lock:
            last = self._last
            times = list(self._measure_times)
            fps = (
                (len(times) - 1) / (times[-1] - times[0])
                if len(times) >= 2 and times[-1] > times[0]
                else 0.0
            )
            est = last[1] if last else None
            corrections = (
                self._corrections if stage is None else int(stage["corrections"])
            )
            return DaemonStatus(
                state=self._state.value,
                source=self.source.name,
                frames_received=self._frames_received,
                frames_measured=self._frames_measured,
                frames_skipped=self._slot.skipped_total,
                frames_failed=self._frames_failed,
                fps=round(fps, 3),
                dx_px=finite_or_none(est.dx_px) if est else None,
                dy_px=finite_or_none(est.dy_px) if est else None,
                confidence=est.confidence if est else None,
                status=est.status.value if est else None,
                last_frame=last[0].index if last else None,
                reference_frame=self._reference_frame,
                references_taken=self._references_taken,
                corrections=corrections,
                alarm=self.alarms.summary(),
                uptime_s=round(time.monotonic() - self._started_at, 3),
                publish_endpoint=self._publish_endpoint,
                control_endpoint=self.control.endpoint if self.control else None,
                record_path=self._record_path,
                stage=stage,
            )

    def _stage_status(self) -> dict[str, Any] | None:
        loop = self.stage_loop
        if loop is None:
            return None
        out = dict(loop.status())
        try:
            x, y = loop.driver.get_position_um()
        except Exception:  # a status request must never fail on the stage
            out["position_um"] = None
            out["offset_um"] = None
            return out
        out["position_um"] = [x, y]
        start = loop.start_position_um
        out["offset_um"] = None if start is None else [x - start[0], y - start[1]]
        return out

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind the control socket, start the source, then the worker.

        Raises
        ------
        DaemonError
            When the control endpoint cannot be bound.
        """
        if self._want_control:
            import zmq

            try:
                self.control = ControlServer(
                    self.config.control.endpoint,
                    {
                        name: functools.partial(command, self)
                        for name, command in COMMANDS.items()
                    },
                    curve=self.server_keys,
                )
            except zmq.ZMQError as exc:
                raise DaemonError(
                    f"control.endpoint {self.config.control.endpoint}: {exc} "
                    "(is another stagelock running? choose --control ENDPOINT)"
                ) from None
            self.control.start()
        if hasattr(self.source, "wait_for_consumer"):
            # a folder's backlog waits for the worker instead of being skipped
            self.source.wait_for_consumer = self._wait_for_worker
        # the source first: the worker's first heartbeat tells clients that
        # frames written from now on are seen (a folder is watched by then)
        self.source.start(self._on_frame)
        self._worker = threading.Thread(
            target=self._work, name="stagelock-worker", daemon=True
        )
        self._worker.start()
        logger.info(
            "started: source %s, publishing on %s, control on %s",
            self.source.name,
            self._publish_endpoint or "(none)",
            self.control.endpoint if self.control else "(none)",
        )
        if not self.source.frames_at_start:
            # a watched folder may stay empty for hours: it is ready once watching
            self._send_ready()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until a stop is requested (or ``timeout_s``); True if requested."""
        return self._stop.wait(timeout_s)

    def run(self) -> int:
        """Start, wait for a stop request or a limit, shut down; return the exit code.

        0, or 1 when a sink failed during the run (e.g. the record hit a full
        disk), 2 when the configuration proved unusable on the first frame.

        ``config.duration_s`` ends the run by itself; ``config.frames`` is
        checked by the worker.
        """
        try:
            self.start()
            deadline = (
                None
                if self.config.duration_s is None
                else time.monotonic() + self.config.duration_s
            )
            while not self._stop.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self.request_stop(f"ran for {self.config.duration_s:g} s")
                    break
                finished = getattr(self.source, "finished", False)
                if finished and self._slot.wait_taken(0.0):
                    self.request_stop("the acquisition finished")
                    break
                self._stop.wait(0.5 if remaining is None else min(remaining, 0.5))
        finally:
            self.shutdown()
        if self._fatal is not None:
            raise DaemonError(self._fatal)
        return self.exit_code

    def shutdown(self, timeout_s: float = 1.5) -> None:
        """Shut down (the one path): finish the frame in hand, flush, close.

        Parameters
        ----------
        timeout_s : float
            How long the worker may take to finish its frame.
        """
        if self._shutdown_done:
            return
        self._shutdown_done = True
        self.request_stop(self._stop_reason or "shutdown")
        logger.info("stopping: %s", self._stop_reason)
        self._set_state(DaemonState.STOPPING)
        self.notifier.stopping()
        try:
            try:
                self.source.stop()
            except Exception:
                logger.exception("stopping the source failed")
            self._slot.close()
            if self._worker is not None:
                self._worker.join(timeout_s)
                if self._worker.is_alive():
                    logger.error("the worker did not finish within %.1f s", timeout_s)
        finally:
            # read the stage before the clean-ups release the core
            final_stage = self._stage_status()
            # not while a worker that outlived its join is still sending
            held = self._send_lock.acquire(timeout=timeout_s)
            try:
                for sink in self.sinks:
                    try:
                        sink.close()
                    except Exception:
                        logger.exception("closing sink %r failed", sink)
            finally:
                if held:
                    self._send_lock.release()
            if self.control is not None:
                self.control.close()
            for fn in self._cleanup:
                try:
                    fn()
                except Exception:
                    logger.exception("cleanup failed")
            self._set_state(DaemonState.STOPPED)
            st = self.status()
            logger.info(
                "stopped: %d frames measured, %d skipped, %d failed%s",
                st.frames_measured,
                st.frames_skipped,
                st.frames_failed,
                "" if final_stage is None else "; " + stage_summary(final_stage),
            )
            self.notifier.close()

    # -- source thread ----------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        # runs on the source's thread: count and hand over, nothing slow
        with self._lock:
            self._frames_received += 1
            self._last_arrival = time.monotonic()
        if frame.metadata.get("lock") is False:
            return  # another channel/plane of an MDA: never measured
        self._slot.put(frame)

    def _wait_for_worker(self) -> None:
        while not self._stop.is_set() and not self._slot.wait_taken(0.5):
            pass

    # -- worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        heartbeat_s = self.config.publish.heartbeat_s
        watchdog_s = self.notifier.watchdog_interval_s
        next_heartbeat = time.monotonic()
        next_watchdog = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait_s = min(next_heartbeat - now, 0.25)
                if watchdog_s is not None:
                    wait_s = min(wait_s, next_watchdog - now)
                try:
                    got = self._slot.get(max(wait_s, 0.0))
                except SlotClosed:
                    break
                if got is not None:
                    frame, skipped = got
                    if self._frame_base:
                        # a resumed run numbers on from where the last one ended
                        index = frame.index + self._frame_base
                        frame = dataclasses.replace(frame, index=index)
                    try:
                        self._handle(frame, skipped)
                    except Exception:  # never die in the loop
                        logger.exception("frame %d: unexpected error", frame.index)
                        with self._lock:
                            self._frames_failed += 1
                    self._note_frame(frame.index)
                now = time.monotonic()
                self._check_stall(now)
                self._check_control()
                if now >= next_heartbeat:
                    next_heartbeat = now + heartbeat_s
                    self._heartbeat()
                if watchdog_s is not None and now >= next_watchdog:
                    next_watchdog = now + watchdog_s
                    self.notifier.watchdog()
        finally:
            # the last heartbeat tells subscribers the daemon is going away
            try:
                self._heartbeat()
            except Exception:
                logger.exception("last heartbeat failed")

    def _handle(self, frame: Frame, skipped: int) -> None:
        self._send_ready()
        clean = finite_pixels(frame.image)
        if clean is not frame.image:
            # a NaN/inf pixel would make the whole frame look blank
            frame = dataclasses.replace(frame, image=clean)
        with self._lock:
            paused = self._paused
            rereference, self._rereference = self._rereference, False
        if paused:
            return
        if rereference:
            self._registrar = None
            self._resumed = False
            self._mean_frames = []
            if self.position_locks is not None:
                self.position_locks.reset()
            self._set_state(DaemonState.REFERENCING)
        if frame.metadata.get("position") is not None:
            self._handle_positioned(frame, skipped)
            return
        if self._resumed and not self._check_resumed(frame):
            return
        if self._registrar is None:
            self._take_reference(frame, skipped)
            return
        self._measure_and_send(frame, skipped)

    def _handle_positioned(self, frame: Frame, skipped: int) -> None:
        """Measure a frame of a multi-position acquisition against its position."""
        from stagelock.stage import PositionKey, PositionLocks

        meta = frame.metadata
        if meta.get("lock") is False:
            return  # another channel or plane: follows its position's correction
        locks = self.position_locks
        if locks is None:
            locks = self.position_locks = PositionLocks(
                self._registrar_kwargs(), on_alarm=self._on_position_alarm
            )
        grid = meta.get("grid")
        key = PositionKey(int(meta["position"]), None if grid is None else int(grid))
        applied = None
        if meta.get("offset_x_um") is not None:
            applied = (float(meta["offset_x_um"]), float(meta["offset_y_um"]))
        try:
            result = locks.measure(
                key,
                np.asarray(frame.image),
                time_s=float(meta.get("lock_time_s", frame.time_s)),
                applied_um=applied,
                frame=frame.index,
                name=meta.get("position_name"),
            )
        except ValueError as exc:
            with self._lock:
                self._frames_failed += 1
            logger.warning("frame %d not measured: %s", frame.index, exc)
            return
        est = result.estimate
        if result.reference:
            with self._lock:
                self._reference_frame = frame.index
                self._references_taken += 1
                paused = self._paused
            logger.info(
                "reference taken for position %s: frame %d", key.label, frame.index
            )
            if not paused:
                self._set_state(DaemonState.MEASURING)
        with self._lock:
            self._frames_measured += 1
            self._last = (frame, est)
            self._measure_times.append(time.monotonic())
            n = self._frames_measured
            if result.correction is not None and result.correction.move_x_um:
                self._corrections += 1
        self._send(SHIFT_TOPIC, self._shift_message(frame, est, skipped))
        if result.correction is not None:
            self._send(
                CORRECTION_TOPIC,
                {**result.correction.to_message(), "source": self.source.name},
            )
        self._track_quality(frame, est)
        if self.config.frames is not None and n >= self.config.frames:
            self.request_stop(f"measured {n} frames")

    def _on_position_alarm(self, key: PositionKey, alarm: Alarm, message: str) -> None:
        # called by the position table on the worker thread; one alarm per
        # position and kind, named after the position
        self.alarms.set(f"position_{key.label}_{alarm.value}", message)

    def _registrar_kwargs(self) -> dict[str, Any]:
        reg = self.config.registration
        return {
            "roi": reg.roi,
            "max_shift_px": reg.max_shift_px,
            "n_regions": reg.n_regions,
            "region_size_px": reg.region_size_px,
            "reference_strategy": "keyframe"
            if reg.reference == "keyframe"
            else "fixed",
            "min_confidence": reg.min_confidence,
            "coverage": self._coverage,
        }

    def _pick_coverage(self, frame: Frame) -> None:
        """Resolve ``registration.coverage = "auto"`` once, from the first frame."""
        reg = self.config.registration
        if reg.coverage != "auto" or self._coverage is not None:
            return
        from stagelock.registration import coverage_for_interval

        interval_s = self._frame_interval_s()
        shape = (int(frame.image.shape[0]), int(frame.image.shape[1]))
        if interval_s is None or interval_s <= 0:
            logger.info(
                "registration.coverage auto: frame interval unknown; using the "
                "template regions (set registration.coverage to a number to choose)"
            )
            return
        self._coverage = coverage_for_interval(
            shape, interval_s, budget_fraction=reg.coverage_budget
        )
        logger.info(
            "registration.coverage auto: %.3f for %dx%d frames every %.0f ms "
            "(measuring within %.0f %% of the interval)",
            self._coverage,
            shape[1],
            shape[0],
            interval_s * 1000,
            reg.coverage_budget * 100,
        )

    def _frame_interval_s(self) -> float | None:
        kind = self.config.source.kind
        if kind == "simulated":
            return self.config.simulation.frame_interval_ms / 1000.0
        if kind == "micromanager":
            ms = self.config.source.micromanager.interval_ms
            return ms / 1000.0 if ms > 0 else None
        return None

    def _roi_outside(self, frame: Frame) -> bool:
        """Stop the run (exit 2) when ``registration.roi`` misses the frames."""
        roi = self.config.registration.roi
        height, width = frame.image.shape[:2]
        if roi is None or (roi[0] + roi[2] <= width and roi[1] + roi[3] <= height):
            return False
        text = (
            f"registration.roi {list(roi)} lies outside the {width}×{height} px "
            "frames; choose x + w <= width and y + h <= height"
        )
        self.exit_code = 2
        self.alarms.set("config_error", text)
        self.request_stop(text)
        return True

    def _take_reference(self, frame: Frame, skipped: int) -> None:
        reg = self.config.registration
        self._pick_coverage(frame)
        if self._roi_outside(frame):
            return
        if reg.reference == "mean":
            self._mean_frames.append(
                dataclasses.replace(frame, image=np.array(frame.image, copy=True))
            )
            if len(self._mean_frames) < reg.n_mean:
                self._set_state(DaemonState.REFERENCING)
                return
            pending, self._mean_frames = self._mean_frames, []
            images: list[npt.NDArray[np.generic]] = [f.image for f in pending]
            # Registrar.from_frames's mean, kept to save it in the state directory
            mean: npt.NDArray[np.float32] = np.asarray(
                np.mean(np.stack(images).astype(np.float64), axis=0), dtype=np.float32
            )
            try:
                registrar = Registrar(mean, **self._registrar_kwargs())
            except ValueError as exc:
                logger.warning(
                    "mean of frames %d..%d unusable as reference: %s",
                    pending[0].index,
                    pending[-1].index,
                    exc,
                )
                return
            self._install_reference(
                registrar, pending[-1], f"mean of {len(pending)} frames", mean
            )
            for i, f in enumerate(pending):
                self._measure_and_send(f, skipped if i == len(pending) - 1 else 0)
            return
        try:
            registrar = Registrar(frame.image, **self._registrar_kwargs())
        except ValueError as exc:
            logger.warning("frame %d unusable as reference: %s", frame.index, exc)
            self._set_state(DaemonState.REFERENCING)
            return
        self._install_reference(registrar, frame, f"frame {frame.index}", frame.image)
        # the reference against itself is zero by definition: not measured, so
        # that the next frame is not kept waiting (the preparation of a 2048²
        # reference already takes most of a 50 fps frame interval)
        itself = ShiftEstimate.at_reference(len(registrar.regions))
        self._measure_and_send(frame, skipped, itself)

    def _install_reference(
        self,
        registrar: Registrar,
        frame: Frame,
        what: str,
        image: npt.NDArray[Any] | None = None,
    ) -> None:
        self._registrar = registrar
        self._reference_shape = tuple(frame.image.shape)
        if image is not None:
            self._save_reference(image, frame, what)
        with self._lock:
            self._reference_frame = frame.index
            self._references_taken += 1
            paused = self._paused
        if self.stage_loop is not None:
            # a new reference is a new target: forget the old start and history
            self.stage_loop.reset()
        logger.info(
            "reference taken: %s (%d template regions, strategy %s)",
            what,
            len(registrar.regions),
            self.config.registration.reference,
        )
        if not paused:
            self._set_state(DaemonState.MEASURING)

    def _measure_and_send(
        self, frame: Frame, skipped: int, known: ShiftEstimate | None = None
    ) -> None:
        """Measure ``frame`` (unless ``known`` is its estimate), publish, act on it."""
        assert self._registrar is not None
        if not self._right_size(frame, skipped):
            return
        try:
            est = known if known is not None else self._registrar.measure(frame.image)
        except ValueError as exc:
            with self._lock:
                self._frames_failed += 1
                failed = self._frames_failed
            if failed == 1 or failed % 100 == 0:
                logger.warning(
                    "frame %d not measured: %s (%d so far)", frame.index, exc, failed
                )
            return
        # count first: a status request answered after a subscriber saw this
        # message must include it
        with self._lock:
            self._frames_measured += 1
            self._last = (frame, est)
            self._measure_times.append(time.monotonic())
            n = self._frames_measured
        message = self._shift_message(frame, est, skipped)
        self._send(SHIFT_TOPIC, message)
        self._correct(frame, est)
        self._track_quality(frame, est)
        every = self.config.log.every_n_frames
        if every and n % every == 0:
            self._log_progress(n, frame, est)
        if self.config.frames is not None and n >= self.config.frames:
            self.request_stop(f"measured {n} frames")

    def _right_size(self, frame: Frame, skipped: int) -> bool:
        """Check the frame against the reference's size; alarm and publish if not.

        A frame of another size (binning or ROI changed mid-run) cannot be
        compared with the reference: it is counted as failed, published with
        status ``wrong_size`` and raises the ``frame_size_changed`` alarm until
        frames of the reference's size come back (or a new reference is taken).
        """
        shape, ref = tuple(frame.image.shape), self._reference_shape
        if ref is None or shape == ref:
            self.alarms.set("frame_size_changed", None)
            return True
        with self._lock:
            self._frames_failed += 1
        self.alarms.set(
            "frame_size_changed",
            f"frames are {shape[-1]}×{shape[0]} px, the reference "
            f"{ref[-1]}×{ref[0]} px: not measured ('stagelock ctl rereference' "
            "takes a new reference)",
        )
        message = self._shift_message(
            frame, ShiftEstimate.failed(Status.NO_PEAK), skipped
        )
        message["status"] = "wrong_size"
        self._send(SHIFT_TOPIC, message)
        return False

    def _log_progress(self, n: int, frame: Frame, est: ShiftEstimate) -> None:
        st = self.status()
        text = (
            f"{n} frames measured (frame {frame.index}): dx={est.dx_px:+.3f} "
            f"dy={est.dy_px:+.3f} px, confidence {est.confidence:.2f}, "
            f"{est.status.value}; {st.fps:.1f} fps, {st.frames_skipped} skipped"
        )
        if st.stage is not None:
            text += "; " + stage_summary(st.stage)
        logger.info("%s", text)

    def _correct(self, frame: Frame, est: ShiftEstimate) -> None:
        """Give the measurement to the stage loop; send what it decided."""
        loop = self.stage_loop
        if loop is None:
            return
        try:
            correction = loop.update(frame.index, frame.time_s, est)
        except Exception:  # the loop guards its driver; this is a bug, not a stop
            logger.exception("frame %d: stage loop failed", frame.index)
            return
        self._save_stage()
        if correction is not None:
            self._send(
                CORRECTION_TOPIC,
                {**correction.to_message(), "source": self.source.name},
            )
        if loop.alarm is None:
            # the loop clears its alarms silently; mirror that on the alarm topic
            self.alarms.clear_prefix("stage_")

    # -- state directory (worker thread) ----------------------------------------------

    def _save_reference(self, image: npt.NDArray[Any], frame: Frame, what: str) -> None:
        # before the first shift against it is sent: what a subscriber saw
        # measured against a reference survives a SIGKILL right after
        if self.state_dir is None:
            return
        from ._state import DEFAULT_POSITION

        try:
            self.state_dir.save_reference(
                DEFAULT_POSITION,
                image,
                registrar=self._registrar_kwargs(),
                frame=frame.index,
                what=what,
            )
        except OSError as exc:
            logger.error(
                "saving the reference to %s failed: %s", self.state_dir.path, exc
            )

    def _note_frame(self, index: int) -> None:
        if self.state_dir is None:
            return
        try:
            self.state_dir.note_frame(index)
        except OSError as exc:
            if not self._note_failed:  # once: the frames go on regardless
                self._note_failed = True
                logger.error(
                    "saving the frame number to %s failed: %s (a restart "
                    "will number frames from 0)",
                    self.state_dir.path,
                    exc,
                )

    def _save_stage(self) -> None:
        loop, state = self.stage_loop, self.state_dir
        if loop is None or state is None:
            return
        from ._state import DEFAULT_POSITION

        try:
            state.save_stage(
                loop.start_position_um,
                {DEFAULT_POSITION: loop.reference_position_um},
            )
        except OSError as exc:
            logger.error("saving the stage origin to %s failed: %s", state.path, exc)

    def _check_resumed(self, frame: Frame) -> bool:
        # a resumed reference is checked against the first frame it meets: a
        # state of another camera size is refused, never silently used
        self._resumed = False
        assert self._registrar is not None
        shape = tuple(frame.image.shape)
        if shape == self._registrar.shape:
            with self._lock:
                paused = self._paused
            if not paused:
                self._set_state(DaemonState.MEASURING)
            return True
        where = self.state_dir.path if self.state_dir is not None else "the state"
        self._fatal = (
            f"state_dir {where}: the saved reference is "
            f"{self._registrar.shape[0]}x{self._registrar.shape[1]} px but frame "
            f"{frame.index} is {shape[0]}x{shape[1]} px; start with --fresh to "
            "discard the saved state"
        )
        logger.error("%s", self._fatal)
        self._registrar = None
        self.request_stop("saved state does not fit")
        return False

    def _on_stage_alarm(self, alarm: Alarm, message: str) -> None:
        # called by the loop on the worker thread (in update) when it raises one
        name = f"stage_{alarm.value}"
        self.alarms.clear_prefix("stage_", keep=name)
        self.alarms.set(name, message)

    def _shift_message(
        self, frame: Frame, est: ShiftEstimate, skipped: int
    ) -> ShiftMessage:
        px = self.pixel_size_um
        dx, dy = finite_or_none(est.dx_px), finite_or_none(est.dy_px)
        return ShiftMessage(
            schema=SHIFT_SCHEMA,
            frame=frame.index,
            time=frame.time_s,
            dx_px=dx,
            dy_px=dy,
            dx_um=None if px is None or dx is None else dx * px,
            dy_um=None if px is None or dy is None else dy * px,
            confidence=round(float(est.confidence), 4),
            status=est.status.value,
            skipped=skipped,
            source=frame.source,
            latency_ms=round((time.time() - frame.time_s) * 1000.0, 3),
            n_regions=est.n_regions,
            position=_int_or_none(frame.metadata.get("position")),
            position_name=frame.metadata.get("position_name"),
            channel=frame.metadata.get("channel"),
            z=_int_or_none(frame.metadata.get("z")),
        )

    def _send(self, topic: str, message: Mapping[str, Any]) -> None:
        with self._send_lock:
            for sink in self.sinks:
                try:
                    sink.publish(topic, message)
                except Exception as exc:
                    self._sink_failed(sink, topic, exc)
                else:
                    if id(sink) in self._failed_sinks:
                        self._sink_recovered(sink)

    def _sink_recovered(self, sink: ShiftSink) -> None:
        if getattr(sink, "error", None) is not None:
            return  # still failing: the message was dropped, not written
        self._failed_sinks.discard(id(sink))
        self.alarms.set(getattr(sink, "failure_alarm", "sink_failed"), None)

    def _sink_failed(self, sink: ShiftSink, topic: str, exc: Exception) -> None:
        """Report a sink's failure once (one line, an alarm), not per message."""
        key = id(sink)
        if key in self._failed_sinks:
            logger.debug("sink %r failed again on %s: %s", sink, topic, exc)
            return
        self._failed_sinks.add(key)
        self.exit_code = 1
        alarm = getattr(sink, "failure_alarm", "sink_failed")
        where = getattr(sink, "path", None) or sink
        if isinstance(exc, OSError):
            # the alarm's own log line is the one line about it
            text = (
                f"cannot write {where}: {exc.strerror or exc}; recording paused, "
                "retried every few seconds (measuring goes on)"
            )
        else:
            text = f"{where} failed on {topic}: {exc}"
            logger.exception("sink %r failed on %s", sink, topic)
        self.alarms.set(alarm, text)

    def _track_quality(self, frame: Frame, est: ShiftEstimate) -> None:
        good = est.status is Status.OK
        if good:
            if self._bad_run:
                logger.info(
                    "frame %d: confidence back (%.2f)", frame.index, est.confidence
                )
            self._bad_run = 0
            self.alarms.set("measurement_failing", None)
            return
        self._bad_run += 1
        if self._bad_run == 1:
            logger.warning(
                "frame %d: %s (confidence %.2f)",
                frame.index,
                est.status.value,
                est.confidence,
            )
        limit = self.config.registration.alarm_after_bad_frames
        if self._bad_run >= limit:
            self.alarms.set(
                "measurement_failing",
                f"{self._bad_run} frames in a row without a trustworthy shift "
                f"(last: {est.status.value})",
            )

    def _check_control(self) -> None:
        """Watchdog on the control thread: its death is an alarm, not silence."""
        control = self.control
        if control is None or control.alive or self._stop.is_set():
            return
        self.alarms.set(
            "control_lost",
            f"the control socket {control.endpoint} stopped serving; stop the "
            "daemon with SIGTERM",
        )

    def _check_stall(self, now: float) -> None:
        with self._lock:
            arrival = self._last_arrival
            state = self._state
        if arrival is None:
            self._check_no_frames(now)
            return
        if self._no_frames_alarm:
            self._no_frames_alarm = False
            self.alarms.set("no_frames", None)
        lost = now - arrival > self.config.source.stall_timeout_s
        if lost and state is not DaemonState.SOURCE_LOST:
            self.alarms.set(
                "source_lost",
                f"no frame from {self.source.name} for "
                f"{self.config.source.stall_timeout_s:g} s",
            )
            self._set_state(DaemonState.SOURCE_LOST)
        elif not lost and state is DaemonState.SOURCE_LOST:
            self.alarms.set("source_lost", None)
            logger.info("source reconnected: frames arrive again")
            with self._lock:
                paused, has_ref = self._paused, self._registrar is not None
            self._set_state(
                DaemonState.PAUSED
                if paused
                else DaemonState.MEASURING
                if has_ref
                else DaemonState.REFERENCING
            )

    def _check_no_frames(self, now: float) -> None:
        """Raise ``no_frames`` when not one frame came within the stall timeout."""
        timeout_s = self.config.source.stall_timeout_s
        if self._no_frames_alarm or now - self._started_at <= timeout_s:
            return
        self._no_frames_alarm = True
        message = f"no frame from {self.source.name} in {timeout_s:g} s since start"
        mm = self.config.source.micromanager
        if self.config.source.kind == "micromanager" and mm.observe:
            message += (
                " (observe mode watches the core of THIS process: a Micro-Manager "
                "core lives in one process, so an acquisition run by another "
                "program or process is invisible here; measure inside the "
                "acquiring process with stagelock.attach(core) instead)"
            )
        self.alarms.set("no_frames", message)

    def _set_state(self, state: DaemonState) -> None:
        with self._lock:
            old, self._state = self._state, state
        if old is not state:
            logger.info("state: %s → %s", old.value, state.value)

    def _send_ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(f"receiving frames from {self.source.name}")

    def _heartbeat(self) -> None:
        st = self.status()
        message = StatusMessage(
            schema=STATUS_SCHEMA,
            time=time.time(),
            source=st.source,
            state=st.state,
            frames_measured=st.frames_measured,
            frames_skipped=st.frames_skipped,
            fps=st.fps,
            dx_px=st.dx_px,
            dy_px=st.dy_px,
            corrections=st.corrections,
            alarm=st.alarm,
        )
        self._send(STATUS_TOPIC, message)
        if self.notifier.enabled:
            shift = (
                f"dx={st.dx_px:+.3f} dy={st.dy_px:+.3f} px"
                if st.dx_px is not None and st.dy_px is not None
                else "no shift yet"
            )
            self.notifier.status(
                f"{st.state}: {st.frames_measured} frames measured, last {shift}, "
                f"{st.fps:.1f} fps"
            )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _position_of(frame: Frame) -> tuple[Any, Any]:
    """Return the slot key of a frame: its position and grid tile (None: one FOV)."""
    return frame.metadata.get("position"), frame.metadata.get("grid")
