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
    from stagelock.sinks import ShiftSink
    from stagelock.sources import FrameSource
    from stagelock.stage import Calibration, StageLoop

    from ._sdnotify import SystemdNotifier

__all__ = ["build_daemon", "build_sinks", "build_source", "build_stage_loop"]

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
                ),
                [],
            )
        except OSError as exc:  # missing, not a directory, not readable
            raise DaemonError(f"source.folder.path: {exc}") from None
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
        core, interval_ms=mm.interval_ms, observe=mm.observe, mda_sequence=sequence
    )
    return src, [lambda: release_core(core)]


def build_sinks(config: Config) -> tuple[list[ShiftSink], str | None, str | None]:
    """Create the recorder (if configured) then the publisher.

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
        publisher = ZmqPublisher(config.publish.endpoint, hwm=config.publish.hwm)
    except zmq.ZMQError as exc:
        for sink in sinks:
            sink.close()
        raise DaemonError(
            f"publish.endpoint {config.publish.endpoint}: {exc} "
            "(is another stagelock running? choose --publish ENDPOINT)"
        ) from None
    sinks.append(publisher)
    return sinks, record_path, publisher.endpoint


def build_stage_loop(config: Config, core: Any) -> StageLoop:
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


def build_daemon(config: Config, *, notifier: SystemdNotifier | None = None) -> Daemon:
    """Create a :class:`Daemon` with the source, sinks and stage loop configured.

    With ``stage.feedback`` on, the camera→stage calibration is read or measured
    here, before any frame is acquired (see :func:`build_stage_loop`).

    Raises
    ------
    DaemonError
        When a part cannot be created; nothing is left open.
    """
    sinks, record_path, endpoint = build_sinks(config)
    cleanup: list[Callable[[], None]] = []
    try:
        source, cleanup = build_source(config)
        loop = None
        if config.stage.feedback:
            core = source.core
            if core is None:
                raise DaemonError(
                    "stage.feedback = true needs a Micro-Manager core; source "
                    f"{source.name} has none (set stage.feedback = false)"
                )
            loop = build_stage_loop(config, core)
    except BaseException:
        for fn in cleanup:
            with contextlib.suppress(Exception):
                fn()
        for sink in sinks:
            sink.close()
        raise
    return Daemon(
        config,
        source,
        sinks=sinks,
        notifier=notifier,
        cleanup=cleanup,
        publish_endpoint=endpoint,
        record_path=record_path,
        stage_loop=loop,
    )
