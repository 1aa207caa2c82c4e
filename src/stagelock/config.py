"""The daemon's configuration: one TOML file, one frozen, strictly validated model.

Every section forbids unknown keys, so a typo stops start-up with the key path
(``publish.endpont: Extra inputs are not permitted``) instead of being ignored.
Command-line flags override the file through :meth:`Config.with_overrides`, which
validates the result again.

Environment variables (read only by ``stagelock run``, below the command line and
above the file):

==========================  ============================  =====================
variable                    overrides                     example
==========================  ============================  =====================
``STAGELOCK_CONFIG``        ``--config``                  ``/etc/stagelock/a.toml``
``STAGELOCK_PUBLISH``       ``publish.endpoint``          ``tcp://127.0.0.1:5556``
``STAGELOCK_CONTROL``       ``control.endpoint``          ``tcp://127.0.0.1:5557``
``STAGELOCK_RECORD``        ``record.path``               ``/var/lib/stagelock/s.jsonl``
``STAGELOCK_STATE_DIR``     ``state_dir``                 ``/var/lib/stagelock``
``STAGELOCK_KEYS``          ``security.keys_dir``         ``/etc/stagelock/keys``
==========================  ============================  =====================

Size: over 600 lines because it is the one configuration model: every
section is declared here, with its documentation, by design.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .protocol import DEFAULT_CONTROL_ENDPOINT, DEFAULT_PUBLISH_ENDPOINT

if TYPE_CHECKING:
    from collections.abc import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_CONTROL_ENDPOINT",
    "DEFAULT_PUBLISH_ENDPOINT",
    "CalibrationSettings",
    "CameraConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "FolderSourceConfig",
    "LogConfig",
    "MicroManagerSourceConfig",
    "PublishConfig",
    "RecordConfig",
    "RegistrationConfig",
    "SecurityConfig",
    "SimulationConfig",
    "SimulationSettings",
    "SourceConfig",
    "StageSettings",
    "format_validation_error",
    "load_config",
    "validate_config",
]

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite number; a string such as ``"0.5"`` is an error, not a number."""
Bool = Annotated[bool, Field(strict=True)]
"""``true`` or ``false``; ``"yes"`` or ``1`` is an error."""
Int = Annotated[int, Field(strict=True)]
"""An integer; ``"5"`` or ``5.0`` is an error."""
PositiveFloat = Annotated[Number, Field(gt=0)]
"""A finite number > 0 (``inf`` and ``nan`` are errors)."""
Endpoint = Annotated[str, Field(pattern=r"^(tcp|ipc|inproc)://.+")]


class _Section(BaseModel):
    """Base of every section: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ConfigError(ValueError):
    """The configuration is unusable; the message is one line naming the key."""


class CameraConfig(_Section):
    """``[camera]``: what is known about the camera."""

    pixel_size_um: PositiveFloat | None = None
    """Sample-plane pixel size; enables ``dx_um``/``dy_um`` in every message."""


class FolderSourceConfig(_Section):
    """``[source.folder]``: watch a directory for TIFF files."""

    path: Path | None = None
    """Directory to watch (required when ``source.kind = "folder"``)."""
    pattern: str = Field(default="*.tif*", min_length=1)
    """Glob of the files to read."""
    from_start: Bool = False
    """Also process files already present when the daemon starts."""
    poll_interval_s: PositiveFloat = 0.05
    """How often a file's size is checked while it is being written."""
    give_up_after_s: PositiveFloat = 5.0
    """An unreadable file whose size did not change for this long is corrupt."""
    position_pattern: str | None = None
    """Regex with named groups ``position``/``channel``/``z`` for other programs'
    multi-position names; default Micro-Manager's ``position###``, ``channel###``,
    ``z###``. Each position gets its own reference."""
    lock_channel: Annotated[int, Field(strict=True, ge=0)] = 0
    """Channel index measured at every position (the others are not measured)."""
    lock_z: Annotated[int, Field(strict=True, ge=0)] = 0
    """z index measured at every position."""


class MicroManagerSourceConfig(_Section):
    """``[source.micromanager]``: a Micro-Manager core in this process."""

    config_file: Path | None = None
    """System configuration; none = the demo config of ``mm-test-adapters``."""
    camera: str | None = None
    """Camera device label; default the core's current camera."""
    interval_ms: Annotated[Number, Field(ge=0)] = 0.0
    """Time between frames (0 = as fast as the camera runs)."""
    mda_file: Path | None = None
    """A useq-schema MDA sequence (YAML/JSON) to run instead of live acquisition."""
    observe: Bool = False
    """Observe an acquisition someone else runs (never pops frames)."""
    lock_channel: str | None = None
    """MDA channel measured at every position; default the sequence's first."""
    lock_z: Annotated[int, Field(strict=True, ge=0)] | None = None
    """MDA z index measured; default the middle plane."""
    properties: tuple[tuple[str, str, str | float | int], ...] = ()
    """Device properties set after loading, ``[["Camera", "Mode", "Fluorescent
    Beads"], ...]`` (device label, property name, value)."""


class SourceConfig(_Section):
    """``[source]``: where frames come from."""

    kind: Literal["simulated", "micromanager", "folder"] = "simulated"
    stall_timeout_s: PositiveFloat = 5.0
    """No frame for this long (after the first) = source lost (logged, alarmed)."""
    folder: FolderSourceConfig = FolderSourceConfig()
    micromanager: MicroManagerSourceConfig = MicroManagerSourceConfig()

    @model_validator(mode="after")
    def _folder_needs_path(self) -> SourceConfig:
        if self.kind == "folder" and self.folder.path is None:
            raise ValueError(
                'source.kind = "folder" needs source.folder.path (or --watch DIR)'
            )
        return self


class SimulationSettings(_Section):
    """The simulated microscope (:func:`stagelock.sim.create_simulated_core`).

    Every key has a default; numbers must be finite.

    Attributes
    ----------
    shape_px : (rows, cols)
        Camera sensor size.
    pixel_size_um : float
        Sample-plane size of one camera pixel.
    rotation_deg : float
        Rotation of the camera relative to the stage axes (counter-clockwise in
        (x = columns, y = rows) image coordinates).
    flip_x, flip_y : bool
        Mirror the stage's x / y axis as seen by the camera.
    exposure_ms : float
        Initial camera exposure; a snap takes this long.
    peak_photons : float
        Photo-electrons at the brightest point of the sample (sets the noise).
    creep_um_per_s : (x, y)
        Linear thermal creep of the sample.
    random_walk_um_per_sqrt_s : float
        Diffusion coefficient of the random-walk part of the drift, per axis.
    bump_every_s : float
        Mean interval between sudden steps of the sample (Poisson); 0 = never.
    bump_um : float
        Size of each step (random direction).
    stage_speed_um_per_s : float
        Stage travel speed (vector).
    stage_settle_ms : float
        Time the stage stays busy after reaching its target.
    stage_step_um : float
        Stage resolution: targets are rounded to multiples of this; 0 = exact.
    backlash_um : float
        Mechanical play per axis: after a direction reversal the sample does not
        follow the motor for this distance.
    travel_range_um : (xmin, xmax, ymin, ymax), optional
        Stage travel limits (motor coordinates); moves outside raise.
    seed : int
        Seed of the drift and the camera noise.
    world_pad_px : int, optional
        Real sample around the initial view, per side (px); beyond it the
        texture is mirror-repeated. Default ``max(256, max(shape_px) // 2)``;
        raise it for stage positions far apart (up to ``(3·512 - frame) / 2``
        the world is one bicubic upscale of the sample, without seams).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    shape_px: tuple[Annotated[Int, Field(ge=16)], Annotated[Int, Field(ge=16)]] = (
        512,
        512,
    )
    pixel_size_um: Annotated[Number, Field(gt=0)] = 0.65
    rotation_deg: Number = 0.0
    flip_x: Bool = False
    flip_y: Bool = False
    exposure_ms: Annotated[Number, Field(gt=0)] = 10.0
    peak_photons: Annotated[Number, Field(gt=0)] = 500.0
    creep_um_per_s: tuple[Number, Number] = (0.05, -0.03)
    random_walk_um_per_sqrt_s: Annotated[Number, Field(ge=0)] = 0.02
    bump_every_s: Annotated[Number, Field(ge=0)] = 0.0
    bump_um: Annotated[Number, Field(ge=0)] = 2.0
    stage_speed_um_per_s: Annotated[Number, Field(gt=0)] = 200.0
    stage_settle_ms: Annotated[Number, Field(ge=0)] = 20.0
    stage_step_um: Annotated[Number, Field(ge=0)] = 0.01
    backlash_um: Annotated[Number, Field(ge=0)] = 0.0
    travel_range_um: tuple[Number, Number, Number, Number] | None = None
    """Stage limits ``[xmin, xmax, ymin, ymax]``; none = unlimited."""
    seed: Annotated[Int, Field(strict=True)] = 0
    world_pad_px: Annotated[Int, Field(ge=64)] | None = None

    @model_validator(mode="after")
    def _ordered_travel_range(self) -> SimulationSettings:
        r = self.travel_range_um
        if r is not None and not (r[0] < r[1] and r[2] < r[3]):
            raise ValueError(
                f"travel_range_um must have xmin < xmax and ymin < ymax; got {list(r)}"
            )
        return self

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> SimulationSettings:
        """Validate a settings mapping (e.g. a TOML table).

        Raises
        ------
        ValueError
            On an unknown key or an invalid value (one line naming the key).
        """
        try:
            return cls.model_validate(dict(settings or {}))
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc)) from None

    @property
    def camera_matrix(self) -> npt.NDArray[np.float64]:
        """2×2 matrix taking a sample displacement in µm to an image shift in px."""
        theta = math.radians(self.rotation_deg)
        rot = np.array(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        flips = np.diag([-1.0 if self.flip_x else 1.0, -1.0 if self.flip_y else 1.0])
        return np.asarray(rot @ flips / self.pixel_size_um, dtype=np.float64)


class SimulationConfig(SimulationSettings):
    """``[simulation]``: the built-in simulated microscope (kind "simulated").

    The defaults drift visibly but realistically: 0.05 µm/s of thermal creep
    (about 3 µm a minute, as a stage that has not warmed up) plus a random walk,
    seen at 10 frames per second. The keys are those of
    :class:`SimulationSettings` plus the acquisition's ``frame_interval_ms``.
    """

    frame_interval_ms: Annotated[Number, Field(ge=0)] = 100.0
    """Time between frames (0 = as fast as the simulated camera runs)."""

    def microscope_settings(self) -> SimulationSettings:
        """Return the microscope's part (everything but ``frame_interval_ms``).

        Returns
        -------
        SimulationSettings
        """
        return SimulationSettings.model_validate(
            self.model_dump(exclude={"frame_interval_ms"})
        )


class RegistrationConfig(_Section):
    """``[registration]``: how shifts are measured (see :class:`Registrar`)."""

    max_shift_px: PositiveFloat = 50.0
    n_regions: Annotated[Int, Field(ge=1, le=64)] = 9
    region_size_px: Annotated[Int, Field(ge=8)] | None = None
    roi: (
        tuple[
            Annotated[Int, Field(ge=0)],
            Annotated[Int, Field(ge=0)],
            Annotated[Int, Field(ge=8)],
            Annotated[Int, Field(ge=8)],
        ]
        | None
    ) = None
    """Rectangle ``[x, y, w, h]`` of the reference to cut templates from."""
    reference: Literal["first", "mean", "keyframe"] = "first"
    """First good frame, mean of the first ``n_mean`` frames, or key frames."""
    n_mean: Annotated[Int, Field(ge=1, le=1000)] = 5
    min_confidence: Annotated[Number, Field(ge=0, le=1)] = 0.25
    coverage: Annotated[Number, Field(gt=0, le=1)] | Literal["auto"] | None = None
    """Fraction of the frame the sub-pixel fit uses (1.0 = the whole overlap);
    ``"auto"`` picks the largest that measures within ``coverage_budget`` of the
    frame interval (logged at start); none = the template regions only (fastest)."""
    coverage_budget: Annotated[Number, Field(gt=0, le=1)] = 0.3
    """Share of the frame interval that measuring may take with ``"auto"``."""
    alarm_after_bad_frames: Annotated[Int, Field(ge=1)] = 10
    """Consecutive frames without a trustworthy shift that raise an alarm."""


class PublishConfig(_Section):
    """``[publish]``: the ZeroMQ PUB socket."""

    endpoint: Endpoint = DEFAULT_PUBLISH_ENDPOINT
    hwm: Annotated[Int, Field(ge=1)] = 1000
    heartbeat_s: PositiveFloat = 1.0
    """Period of ``stagelock.status`` messages."""


class ControlConfig(_Section):
    """``[control]``: the ZeroMQ REP control socket."""

    endpoint: Endpoint = DEFAULT_CONTROL_ENDPOINT


class RecordConfig(_Section):
    """``[record]``: append every measurement to a file."""

    path: Path | None = None
    """``.csv`` or ``.jsonl``; none = no record."""
    flush: Literal["line", "fsync"] = "line"
    """Flush every line; ``"fsync"`` also forces it to disk."""


class SecurityConfig(_Section):
    """``[security]``: CURVE encryption and authentication of both sockets."""

    keys_dir: Path | None = None
    """Directory written by ``stagelock keys generate``: the server's key pair
    and ``authorized_clients/*.key``; none = plain sockets (loopback only)."""
    insecure: Bool = False
    """Allow binding a non-loopback address without keys (logged as a warning)."""


class LogConfig(_Section):
    """``[log]``: the daemon's log lines."""

    every_n_frames: Annotated[Int, Field(ge=0)] = 100
    """One summary line per N measured frames (0 = none)."""


class CalibrationSettings(_Section):
    """How ``stagelock calibrate`` moves the stage (``[stage.calibration]``).

    Attributes
    ----------
    step_um : float, optional
        Stage step of the pattern; default: probed so that a step moves the image
        by ~``target_shift_px``.
    target_shift_px : float
        Image shift aimed at by the automatic step.
    pattern : {"cross", "grid"}
        ``cross``: ±x, ±y; ``grid``: the 8 neighbours of a 3×3 grid. The start
        position is revisited between points, so linear drift during the
        calibration is fitted and removed.
    approach_um : float, optional
        Every position is approached from the same side after a pre-move of this
        size, so backlash shifts all points equally; default 20 % of the step.
    settle_s : float
        Extra wait after the stage reports idle, before snapping.
    max_residual_px : float
        Refuse a fit whose RMS residual exceeds this.
    max_anisotropy : float
        Refuse a fit whose two singular values differ by more than this fraction
        (strong skew or a degenerate, e.g. one-axis, response).
    move_timeout_s : float
        Maximum wait for one move.
    """

    step_um: Number | None = Field(default=None, gt=0)
    target_shift_px: Number = Field(default=15.0, gt=0)
    pattern: Literal["cross", "grid"] = "cross"
    approach_um: Number | None = Field(default=None, ge=0)
    settle_s: Number = Field(default=0.05, ge=0)
    max_residual_px: Number = Field(default=0.5, gt=0)
    max_anisotropy: Number = Field(default=0.1, ge=0)
    move_timeout_s: Number = Field(default=10.0, gt=0)


class StageSettings(_Section):
    """Closed-loop stage compensation (the config's ``[stage]`` section).

    Attributes
    ----------
    feedback : bool
        Move the stage to cancel the measured drift. Off: measure only.
    device : str, optional
        XY stage label; default the core's current XY stage.
    calibration_file : path, optional
        TOML written by ``stagelock calibrate``. Required when ``feedback`` is on,
        unless ``auto_calibrate`` is set or the source is the simulated
        microscope (both calibrate at start-up instead).
    auto_calibrate : bool
        Without ``calibration_file``: run the calibration on the live core when
        the daemon starts, before measuring.
    gain : float
        Fraction of the measured residual corrected per move (0 < gain ≤ 1).
    dead_band_px : float
        Residuals smaller than this (and predicted corrections smaller than
        this) cause no move: avoids hunting around the stage's resolution.
    max_step_um : float
        Largest single correction (vector length); larger ones are shortened.
    min_interval_s : float
        Minimum time between two corrections.
    settle_s : float
        Time after the stage reports idle before a frame counts as settled
        (should cover the exposure time).
    max_shift_px : float
        A larger measured shift raises an alarm instead of a move.
    travel_limit_um : float
        The stage never goes further than this from its start position, per axis.
    feed_forward : bool
        Add the estimated drift velocity times the loop delay to each move,
        removing the lag on linear creep.
    velocity_window_s : float
        History used by the robust drift-velocity fit.
    velocity_min_points : int
        Settled frames needed before feed-forward starts.
    jump_px : float
        A drift jump larger than this resets the velocity history (a bump is
        not creep).
    max_velocity_px_s : float
        Cap on the feed-forward velocity.
    calibration : CalibrationSettings
        How ``stagelock calibrate`` runs.
    """

    feedback: Bool = False
    device: str | None = None
    calibration_file: Path | None = None
    auto_calibrate: Bool = False
    gain: Number = Field(default=0.7, gt=0, le=1)
    dead_band_px: Number = Field(default=0.1, ge=0)
    max_step_um: Number = Field(default=5.0, gt=0)
    min_interval_s: Number = Field(default=0.0, ge=0)
    settle_s: Number = Field(default=0.02, ge=0)
    max_shift_px: Number = Field(default=20.0, gt=0)
    travel_limit_um: Number = Field(default=100.0, gt=0)
    feed_forward: Bool = True
    velocity_window_s: Number = Field(default=8.0, gt=0)
    velocity_min_points: Int = Field(default=6, ge=3)
    jump_px: Number = Field(default=2.0, gt=0)
    max_velocity_px_s: Number = Field(default=5.0, gt=0)
    calibration: CalibrationSettings = CalibrationSettings()


class Config(_Section):
    """The whole ``stagelock run`` configuration.

    ``[stage]`` is :class:`StageSettings` (closed-loop
    correction; off unless ``feedback = true``).
    """

    pixel_size_um: PositiveFloat | None = None
    """Sample-plane pixel size (same as ``camera.pixel_size_um``)."""
    camera: CameraConfig = CameraConfig()
    source: SourceConfig = SourceConfig()
    simulation: SimulationConfig = SimulationConfig()
    registration: RegistrationConfig = RegistrationConfig()
    publish: PublishConfig = PublishConfig()
    control: ControlConfig = ControlConfig()
    record: RecordConfig = RecordConfig()
    log: LogConfig = LogConfig()
    stage: StageSettings = StageSettings()
    security: SecurityConfig = SecurityConfig()
    state_dir: Path | None = None
    """Directory keeping the reference(s), calibration and stage origin across
    restarts (systemd: ``StateDirectory=stagelock``); none = nothing is kept."""
    frames: Annotated[Int, Field(ge=1)] | None = None
    """Stop by itself after this many measured frames."""
    duration_s: PositiveFloat | None = None
    """Stop by itself after this many seconds."""

    @model_validator(mode="after")
    def _one_pixel_size(self) -> Config:
        top, cam = self.pixel_size_um, self.camera.pixel_size_um
        if top is not None and cam is not None and top != cam:
            raise ValueError(
                f"pixel_size_um ({top}) and camera.pixel_size_um ({cam}) disagree; "
                "set one of them"
            )
        return self

    @model_validator(mode="after")
    def _two_endpoints(self) -> Config:
        pub, ctl = self.publish.endpoint, self.control.endpoint
        same = pub == ctl and not pub.endswith((":*", ":0"))
        a, b = _tcp_address(pub), _tcp_address(ctl)
        if a is not None and b is not None and a[1] == b[1] not in ("*", "0"):
            wild = {"*", "0.0.0.0"}  # noqa: S104 - compared, not bound
            same |= a[0] == b[0] or a[0] in wild or b[0] in wild
        if same:
            raise ValueError(
                f"publish.endpoint ({pub}) and control.endpoint ({ctl}) use the "
                "same port; give them different ports"
            )
        return self

    @model_validator(mode="after")
    def _feedback_needs_a_stage(self) -> Config:
        if self.stage.feedback and self.source.kind == "folder":
            raise ValueError(
                "stage.feedback = true needs a stage: source.kind must be "
                '"simulated" or "micromanager", not "folder"'
            )
        if self.stage.auto_calibrate and self.stage.calibration_file is not None:
            raise ValueError(
                "stage.auto_calibrate and stage.calibration_file are both set; "
                "keep one (the file, or a calibration at every start)"
            )
        stage = self.stage
        if (
            stage.feedback
            and self.source.kind == "micromanager"
            and stage.calibration_file is None
            and not stage.auto_calibrate
        ):
            raise ValueError(
                "stage.feedback = true needs stage.calibration_file (write one with "
                "'stagelock calibrate --config FILE -o calibration.toml') or "
                "stage.auto_calibrate = true"
            )
        return self

    @classmethod
    def quickstart(cls) -> Config:
        """Return the configuration of ``stagelock run`` without a file.

        The built-in simulated microscope with the closed loop on (calibrated
        automatically at start-up) and a log line every 10 frames (one a
        second), so a first run shows drift being measured and corrected.

        Returns
        -------
        Config
        """
        return cls(
            stage=StageSettings(feedback=True),
            log=LogConfig(every_n_frames=10),
        )

    @property
    def effective_pixel_size_um(self) -> float | None:
        """The pixel size from the file or flags; the simulation's when simulated."""
        if self.pixel_size_um is not None:
            return self.pixel_size_um
        if self.camera.pixel_size_um is not None:
            return self.camera.pixel_size_um
        if self.source.kind == "simulated":
            return self.simulation.pixel_size_um
        return None

    def with_overrides(self, **flags: Any) -> Config:
        """Return a validated copy with overrides; ``None`` values are ignored.

        Parameters
        ----------
        **flags
            ``publish__endpoint="tcp://..."`` style keys: ``__`` separates
            sections. ``None`` means "flag not given".

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            When the result does not validate (one line naming the key).
        """
        doc = self.model_dump(mode="python", exclude_unset=True)
        for key, value in flags.items():
            if value is None:
                continue
            *sections, leaf = key.split("__")
            node = doc
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        return validate_config(doc)


def _tcp_address(endpoint: str) -> tuple[str, str] | None:
    """``tcp://host:port`` → ``(host, port)``; None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    return (host.strip("[]"), port) if host else None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, ``key.path: reason``, joined with ``; ``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        # whole-document checks name their keys in the message itself
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_config(doc: Mapping[str, Any]) -> Config:
    """Validate a parsed document.

    Raises
    ------
    ConfigError
        One line naming every bad key and why.
    """
    try:
        return Config.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML configuration file.

    Parameters
    ----------
    path : str or Path
        The ``.toml`` file.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        When the file is missing, not TOML, or does not validate; the message is
        one line naming the file and the key.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a TOML configuration (not UTF-8 text)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return validate_config(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
