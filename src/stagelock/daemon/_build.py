"""Wiring from a :class:`~stagelock.config.Config`: the source, sinks and stage loop.

Everything that turns configuration into running parts lives here, so
:mod:`._daemon` holds only the state machine. Each builder raises
:class:`~stagelock.daemon.DaemonError` with one line naming the config key, and
leaves nothing open when it fails.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from stagelock.protocol import ALARM_TOPIC, CORRECTION_TOPIC, SHIFT_TOPIC

from ._daemon import Daemon, DaemonError

if TYPE_CHECKING:
    from collections.abc import Callable

    from stagelock.config import Config
    from stagelock.security import ServerKeys
    from stagelock.sinks import ShiftSink
    from stagelock.sources import FrameSource
    from stagelock.stage import Calibration, PositionLocks, StageLoop

    from ._sdnotify import SystemdNotifier
    from ._state import SavedState, StateDir

__all__ = [
    "build_daemon",
    "build_mda_lock",
    "build_sinks",
    "build_source",
    "build_stage_loop",
]

logger = logging.getLogger("stagelock.daemon")


def build_source(config: Config) -> tuple[FrameSource, list[Callable[[], None]]]:
    """Create the frame source the configuration names, and its clean-ups.

    Raises
    ------
    DaemonError
        When the source cannot be created (missing folder, Micro-Manager config
        not loadable, the simulated microscope not available).
    """
    kind = config.source.kind
    if kind == "folder":
        from stagelock.sources import FolderSource

        folder = config.source.folder
        assert folder.path is not None  # checked by the config
        try:
            return (
                FolderSource(
                    folder.path,
                    pattern=folder.pattern,
                    from_start=folder.from_start,
                    poll_interval_s=folder.poll_interval_s,
                    give_up_after_s=folder.give_up_after_s,
                    position_pattern=folder.position_pattern,
                    lock_channel=folder.lock_channel,
                    lock_z=folder.lock_z,
                ),
                [],
            )
        except OSError as exc:  # missing, not a directory, not readable
            raise DaemonError(f"source.folder.path: {exc}") from None
        except ValueError as exc:
            raise DaemonError(f"source.folder.{exc}") from None
    from stagelock.sim import create_simulated_core
    from stagelock.sources import MMCoreSource, open_core, release_core

    if kind == "simulated":
        sim_core = create_simulated_core(config.simulation.microscope_settings())
        sim = MMCoreSource(
            sim_core,
            interval_ms=config.simulation.frame_interval_ms,
            name="simulated",
        )
        return sim, [lambda: release_core(sim_core)]
    mm = config.source.micromanager
    try:
        core = open_core(mm)
    except RuntimeError as exc:
        raise DaemonError(f"source.micromanager: {exc}") from None
    sequence = None
    if mm.mda_file is not None:
        import useq

        try:
            sequence = useq.MDASequence.from_file(mm.mda_file)
        except Exception as exc:
            release_core(core)
            raise DaemonError(
                f"source.micromanager.mda_file: cannot read {mm.mda_file}: {exc}"
            ) from None
    src = MMCoreSource(
        core,
        interval_ms=mm.interval_ms,
        observe=mm.observe,
        mda_sequence=sequence,
        lock_channel=mm.lock_channel,
        lock_z=mm.lock_z,
    )
    return src, [lambda: release_core(core)]


def _secure(config: Config) -> tuple[ServerKeys | None, Callable[[], None]]:
    """Check the endpoints' exposure, load the keys, start the authenticator.

    Returns the server keys (None without ``security.keys_dir``) and the
    authenticator's idempotent stop.
    """
    from stagelock.security import (
        SecurityError,
        check_exposure,
        load_server_keys,
        start_authenticator,
    )

    try:
        check_exposure(config)
        if config.security.keys_dir is None:
            return None, lambda: None
        keys = load_server_keys(config.security.keys_dir)
    except SecurityError as exc:
        raise DaemonError(str(exc)) from None
    auth = start_authenticator(keys)
    logger.info("CURVE on: admitting the client keys in %s", keys.authorized_dir)
    stopped: list[bool] = []

    def stop() -> None:
        if not stopped:
            stopped.append(True)
            auth.stop()

    return keys, stop


def build_sinks(
    config: Config, *, keys: ServerKeys | None = None
) -> tuple[list[ShiftSink], str | None, str | None]:
    """Create the recorder (if configured) then the publisher.

    ``keys`` makes the publisher a CURVE server (see :mod:`stagelock.security`).

    Raises
    ------
    DaemonError
        When the record file cannot be opened or the endpoint cannot be bound.
    """
    import zmq

    from stagelock.sinks import Recorder, ZmqPublisher

    sinks: list[ShiftSink] = []
    record_path = None
    if config.record.path is not None:
        try:
            sinks.append(
                # JSON lines keep corrections and alarms next to the shifts;
                # a CSV file takes only the shifts (its columns)
                Recorder(
                    config.record.path,
                    topics=(SHIFT_TOPIC, CORRECTION_TOPIC, ALARM_TOPIC),
                    fsync=config.record.flush == "fsync",
                )
            )
        except (OSError, ValueError) as exc:
            raise DaemonError(f"record.path: {exc}") from None
        record_path = str(config.record.path)
    try:
        publisher = ZmqPublisher(
            config.publish.endpoint, hwm=config.publish.hwm, curve=keys
        )
    except zmq.ZMQError as exc:
        for sink in sinks:
            sink.close()
        raise DaemonError(
            f"publish.endpoint {config.publish.endpoint}: {exc} "
            "(is another stagelock running? choose --publish ENDPOINT)"
        ) from None
    sinks.append(publisher)
    return sinks, record_path, publisher.endpoint


def build_stage_loop(
    config: Config, core: Any, *, calibration: Calibration | None = None
) -> StageLoop:
    """Create the closed loop the ``[stage]`` section describes, on ``core``.

    The calibration is read from ``stage.calibration_file``; without one (the
    simulated microscope, or ``stage.auto_calibrate = true``) it is measured now
    by moving the stage in a small pattern (:func:`stagelock.stage.calibrate`),
    so sign, scale, rotation and flip are found, never assumed.

    Parameters
    ----------
    config : Config
        With ``stage.feedback`` on.
    core : CMMCorePlus
        The loaded core whose camera is measured and whose XY stage is moved;
        no acquisition may be running (the calibration snaps).
    calibration : Calibration, optional
        The one measured at an earlier start (from the state directory): used
        instead of measuring again when no ``stage.calibration_file`` is set.

    Returns
    -------
    StageLoop

    Raises
    ------
    DaemonError
        When the calibration file is missing or invalid, the calibration fails,
        or the core has no usable XY stage; the message names the key.
    """
    from stagelock.stage import MMStageDriver, StageLoop

    stage = config.stage
    try:
        driver = MMStageDriver(core, stage.device)
    except ValueError as exc:
        raise DaemonError(f"stage.device: {exc}") from None
    if stage.calibration_file is not None:
        cal = _read_calibration(stage.calibration_file)
        how = f"from {stage.calibration_file}"
    elif calibration is not None:
        cal = calibration
        how = "from the state directory"
    else:
        cal = _calibrate_now(config, core)
        how = "measured at start-up"
    logger.info(
        "stage calibration %s: pixel size %.4f µm, rotation %+.2f°, flip %s, "
        "residual %.3f px (%d images)",
        how,
        cal.pixel_size_um,
        cal.rotation_deg,
        "yes" if cal.flipped else "no",
        cal.residual_px,
        cal.n_points,
    )
    loop = StageLoop(driver, cal, stage)
    logger.info(
        "stage feedback on: %s, gain %g, dead band %g px, travel limit ±%g µm",
        driver.device,
        stage.gain,
        stage.dead_band_px,
        stage.travel_limit_um,
    )
    return loop


def build_mda_lock(config: Config, core: Any) -> PositionLocks:
    """Install a :class:`~stagelock.stage.LockingEngine` on ``core`` for an MDA.

    The MDA's own stage moves then carry each position's correction (the stage
    is never moved behind the engine's back); the daemon feeds the returned
    table with the lock frames. The calibration comes from
    ``stage.calibration_file`` or is measured now, as for :func:`build_stage_loop`.

    Raises
    ------
    DaemonError
        When the calibration cannot be read or measured.
    """
    from pymmcore_plus.mda import MDAEngine

    from stagelock.stage import PositionLocks
    from stagelock.stage._mda import LockingEngine, LockSelector

    stage = config.stage
    if stage.calibration_file is not None:
        cal = _read_calibration(stage.calibration_file)
    else:
        cal = _calibrate_now(config, core)
    reg = config.registration
    locks = PositionLocks(
        {
            "roi": reg.roi,
            "max_shift_px": reg.max_shift_px,
            "n_regions": reg.n_regions,
            "region_size_px": reg.region_size_px,
            "min_confidence": reg.min_confidence,
        },
        calibration=cal,
        feedback=True,
        max_shift_px=stage.max_shift_px,
        travel_limit_um=stage.travel_limit_um,
        feed_forward=stage.feed_forward,
        jump_px=max(stage.jump_px, 3.0),
        max_velocity_px_s=stage.max_velocity_px_s,
    )
    mm = config.source.micromanager
    old = core.mda.engine
    options: dict[str, Any] = {}
    if isinstance(old, MDAEngine):
        options["use_hardware_sequencing"] = old.use_hardware_sequencing
    engine = LockingEngine(
        core, locks, selector=LockSelector(mm.lock_channel, mm.lock_z), **options
    )
    core.mda.set_engine(engine)
    logger.info(
        "MDA lock on: every position's correction rides on the acquisition's own "
        "moves (travel limit ±%g µm per position, max shift %g px)",
        stage.travel_limit_um,
        stage.max_shift_px,
    )
    return locks


def _read_calibration(path: Any) -> Calibration:
    from stagelock.stage import Calibration

    try:
        return Calibration.from_file(path)
    except FileNotFoundError:
        raise DaemonError(
            f"stage.calibration_file: {path} does not exist; write it with "
            "'stagelock calibrate --config FILE -o calibration.toml'"
        ) from None
    except (OSError, ValueError) as exc:
        raise DaemonError(
            f"stage.calibration_file: {exc}; write a new one with "
            "'stagelock calibrate --config FILE -o calibration.toml'"
        ) from None


def _calibrate_now(config: Config, core: Any) -> Calibration:
    from stagelock.stage import CalibrationError, calibrate

    opts = config.stage.calibration
    logger.info("calibrating the stage (moves it in a small pattern, ~2 s)")
    try:
        # the [stage.calibration] keys are calibrate()'s keyword arguments
        return calibrate(core, device=config.stage.device, **opts.model_dump())
    except (CalibrationError, ValueError, TimeoutError, RuntimeError) as exc:
        raise DaemonError(
            f"stage: the start-up calibration failed: {exc} (is the sample in "
            "focus and textured? or set stage.calibration_file from "
            "'stagelock calibrate')"
        ) from None


def open_state(
    config: Config, source: FrameSource, *, fresh: bool = False
) -> tuple[StateDir | None, SavedState | None]:
    """Open ``config.state_dir`` (if set) and read what fits ``source``.

    Raises
    ------
    DaemonError
        When the directory is unusable, in use, or holds the state of another
        source or camera size (the message names ``--fresh``).
    """
    if config.state_dir is None:
        return None, None
    from ._state import StateDir, StateError

    state = StateDir(
        config.state_dir, source_name=source.name, source_kind=config.source.kind
    )
    try:
        saved = state.load(fresh=fresh)
        core = source.core
        if saved is not None and saved.shape is not None and core is not None:
            # a camera knows its frame size now; a folder only at its first file
            shape = (int(core.getImageHeight()), int(core.getImageWidth()))
            if shape != saved.shape:
                raise StateError(
                    f"state_dir {state.path}: the saved reference is "
                    f"{saved.shape[0]}x{saved.shape[1]} px but the camera gives "
                    f"{shape[0]}x{shape[1]} px; start with --fresh to discard it"
                )
    except StateError as exc:
        state.close()
        raise DaemonError(str(exc)) from None
    return state, saved


def build_daemon(
    config: Config,
    *,
    notifier: SystemdNotifier | None = None,
    fresh: bool = False,
) -> Daemon:
    """Create a :class:`Daemon` with the source, sinks and stage loop configured.

    With ``stage.feedback`` on, the camera→stage calibration is read or measured
    here, before any frame is acquired (see :func:`build_stage_loop`). With
    ``state_dir`` set, the daemon resumes from the reference, calibration and
    stage origin saved there (unless ``fresh``).

    Raises
    ------
    DaemonError
        When a part cannot be created; nothing is left open.
    """
    keys, stop_auth = _secure(config)
    try:
        sinks, record_path, endpoint = build_sinks(config, keys=keys)
    except BaseException:
        stop_auth()
        raise
    cleanup: list[Callable[[], None]] = []
    try:
        source, cleanup = build_source(config)
        state, saved = open_state(config, source, fresh=fresh)
        if state is not None:
            cleanup.insert(0, state.close)
        loop = None
        locks = None
        if config.stage.feedback:
            core = source.core
            if core is None:
                raise DaemonError(
                    "stage.feedback = true needs a Micro-Manager core; source "
                    f"{source.name} has none (set stage.feedback = false)"
                )
            if config.source.micromanager.mda_file is not None:
                locks = build_mda_lock(config, core)
            else:
                saved_cal = None if saved is None else saved.calibration
                loop = build_stage_loop(config, core, calibration=saved_cal)
                if (
                    state is not None
                    and saved_cal is None
                    and config.stage.calibration_file is None
                ):
                    state.save_calibration(loop.calibration)
        daemon = Daemon(
            config,
            source,
            sinks=sinks,
            notifier=notifier,
            cleanup=cleanup,
            publish_endpoint=endpoint,
            record_path=record_path,
            stage_loop=loop,
            position_locks=locks,
            state_dir=state,
            server_keys=keys,
        )
        # the authenticator goes last, after both sockets are closed
        cleanup.append(stop_auth)
        if saved is not None:
            _resume(daemon, saved)
    except BaseException:
        for fn in cleanup:
            with contextlib.suppress(Exception):
                fn()
        for sink in sinks:
            sink.close()
        stop_auth()
        raise
    return daemon


def _resume(daemon: Daemon, saved: SavedState) -> None:
    from ._state import DEFAULT_POSITION

    ref = saved.references.get(DEFAULT_POSITION)
    if ref is None:
        # no reference yet, maybe an origin: keep the travel limit where it was
        if daemon.stage_loop is not None:
            daemon.stage_loop.restore(saved.origin_um, None)
        return
    try:
        registrar = ref.build_registrar()
    except (ValueError, TypeError) as exc:
        raise DaemonError(
            f"state_dir: the saved reference cannot be rebuilt ({exc}); start with "
            "--fresh to discard it"
        ) from None
    daemon.resume_from(saved, registrar)
