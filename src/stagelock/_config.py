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
==========================  ============================  =====================
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .control._settings import StageSettings

if TYPE_CHECKING:
    from collections.abc import Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
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
    "SimulationConfig",
    "SourceConfig",
    "StageSettings",
    "format_validation_error",
    "load_config",
    "validate_config",
]

DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5557"

PositiveFloat = Annotated[float, Field(gt=0)]
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
    from_start: bool = False
    """Also process files already present when the daemon starts."""
    poll_interval_s: PositiveFloat = 0.05
    """How often a file's size is checked while it is being written."""
    give_up_after_s: PositiveFloat = 5.0
    """An unreadable file whose size did not change for this long is corrupt."""


class MicroManagerSourceConfig(_Section):
    """``[source.micromanager]``: a Micro-Manager core in this process."""

    config_file: Path | None = None
    """System configuration; none = the demo config of ``mm-test-adapters``."""
    camera: str | None = None
    """Camera device label; default the core's current camera."""
    interval_ms: Annotated[float, Field(ge=0)] = 0.0
    """Time between frames (0 = as fast as the camera runs)."""
    mda_file: Path | None = None
    """A useq-schema MDA sequence (YAML/JSON) to run instead of live acquisition."""
    observe: bool = False
    """Observe an acquisition someone else runs (never pops frames)."""
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


class SimulationConfig(_Section):
    """``[simulation]``: the built-in simulated microscope (kind "simulated").

    The defaults drift visibly but realistically: 0.05 µm/s of thermal creep
    (about 3 µm a minute, as a stage that has not warmed up) plus a random walk,
    seen at 10 frames per second. The keys other than ``frame_interval_ms`` are
    those of :class:`stagelock.sources.SimulationSettings`.
    """

    shape_px: tuple[Annotated[int, Field(ge=32)], Annotated[int, Field(ge=32)]] = (
        512,
        512,
    )
    pixel_size_um: PositiveFloat = 0.65
    rotation_deg: float = 0.0
    flip_x: bool = False
    flip_y: bool = False
    exposure_ms: PositiveFloat = 10.0
    frame_interval_ms: Annotated[float, Field(ge=0)] = 100.0
    """Time between frames (0 = as fast as the simulated camera runs)."""
    peak_photons: PositiveFloat = 500.0
    creep_um_per_s: tuple[float, float] = (0.05, -0.03)
    random_walk_um_per_sqrt_s: Annotated[float, Field(ge=0)] = 0.02
    bump_every_s: Annotated[float, Field(ge=0)] = 0.0
    bump_um: float = 2.0
    stage_speed_um_per_s: PositiveFloat = 200.0
    stage_settle_ms: Annotated[float, Field(ge=0)] = 20.0
    stage_step_um: Annotated[float, Field(ge=0)] = 0.01
    backlash_um: Annotated[float, Field(ge=0)] = 0.0
    travel_range_um: tuple[float, float, float, float] | None = None
    """Stage limits ``[xmin, xmax, ymin, ymax]``; none = unlimited."""
    seed: int = 0

    def microscope_settings(self) -> dict[str, Any]:
        """Return the keys of :class:`~stagelock.sources.SimulationSettings`.

        Returns
        -------
        dict
            Everything but the acquisition's ``frame_interval_ms``; ``None``
            values left out.
        """
        return self.model_dump(exclude={"frame_interval_ms"}, exclude_none=True)


class RegistrationConfig(_Section):
    """``[registration]``: how shifts are measured (see :class:`Registrar`)."""

    max_shift_px: PositiveFloat = 50.0
    n_regions: Annotated[int, Field(ge=1, le=64)] = 9
    region_size_px: Annotated[int, Field(ge=8)] | None = None
    roi: (
        tuple[
            Annotated[int, Field(ge=0)],
            Annotated[int, Field(ge=0)],
            Annotated[int, Field(ge=8)],
            Annotated[int, Field(ge=8)],
        ]
        | None
    ) = None
    """Rectangle ``[x, y, w, h]`` of the reference to cut templates from."""
    reference: Literal["first", "mean", "keyframe"] = "first"
    """First good frame, mean of the first ``n_mean`` frames, or key frames."""
    n_mean: Annotated[int, Field(ge=1, le=1000)] = 5
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.25
    alarm_after_bad_frames: Annotated[int, Field(ge=1)] = 10
    """Consecutive frames without a trustworthy shift that raise an alarm."""


class PublishConfig(_Section):
    """``[publish]``: the ZeroMQ PUB socket."""

    endpoint: Endpoint = DEFAULT_PUBLISH_ENDPOINT
    hwm: Annotated[int, Field(ge=1)] = 1000
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


class LogConfig(_Section):
    """``[log]``: the daemon's log lines."""

    every_n_frames: Annotated[int, Field(ge=0)] = 100
    """One summary line per N measured frames (0 = none)."""


class Config(_Section):
    """The whole ``stagelock run`` configuration.

    ``[stage]`` is :class:`~stagelock.control.StageSettings` (closed-loop
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
    frames: Annotated[int, Field(ge=1)] | None = None
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
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return validate_config(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
