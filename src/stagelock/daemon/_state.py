"""The state directory: what a restarted daemon needs to carry on where it stopped.

Layout of ``--state-dir DIR`` (``state_dir`` in the config)::

    DIR/state.json                   schema, source, references, stage origin
    DIR/reference-<key>-<n>.npy      one reference image per position key
    DIR/calibration.toml             camera→stage calibration measured at start-up
    DIR/lock                         flock: one daemon per state directory

``state.json`` (``"schema": "stagelock.state/1"``)::

    {"schema": "stagelock.state/1",
     "source": {"name": "/data/run1", "kind": "folder"},
     "shape": [2048, 2048],
     "references": {"default": {"file": "reference-default-3.npy",
                                "frame": 0, "taken_at": 1764600000.0,
                                "what": "frame 0", "registrar": {...},
                                "stage_position_um": [x, y] or null}},
     "stage": {"origin_um": [x, y] or null},
     "calibration": "calibration.toml" or null}

``references`` is keyed by position (today only ``"default"``); each entry holds
the :class:`~stagelock.Registrar` keyword arguments it was built with, so the
restarted daemon rebuilds an identical one, and the stage position at which it
was taken (what the loop's drift bookkeeping is relative to). ``stage.origin_um``
is the centre of the travel limit: kept across rereferences and restarts, moved
only by ``ctl reset-origin``.

Every file is written atomically: a temporary file in ``DIR``, ``fsync``,
``os.replace``, then ``fsync`` of the directory; an image is written under a new
name before ``state.json`` points at it, so a crash at any moment leaves the
previous state or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from stagelock.protocol import json_safe

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from stagelock.registration import Registrar
    from stagelock.stage import Calibration

__all__ = [
    "DEFAULT_POSITION",
    "STATE_SCHEMA",
    "SavedReference",
    "SavedState",
    "StateDir",
    "StateError",
    "atomic_write",
]

logger = logging.getLogger("stagelock.daemon")

STATE_SCHEMA = "stagelock.state/1"
"""The ``schema`` field of ``state.json``."""
DEFAULT_POSITION = "default"
"""The position key of the single reference a plain (non-MDA) daemon keeps."""

_STATE_FILE = "state.json"
_CALIBRATION_FILE = "calibration.toml"
_LOCK_FILE = "lock"
_FRAMES_FILE = "next_frame"
"""The number the next frame gets: numbering goes on across a restart."""
_FRAMES_WIDTH = 20


class StateError(ValueError):
    """The state directory cannot be used; one line saying why and what to do."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` so a crash leaves the old file or the new one, whole.

    Parameters
    ----------
    path : Path
        The file to (re)place.
    write : callable
        ``write(fh)`` writes the content to the temporary file (open binary).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


@dataclass(frozen=True, slots=True)
class SavedReference:
    """One reference read back from the state directory.

    Attributes
    ----------
    key : str
        Position key (``"default"``).
    image : ndarray
        The image the :class:`~stagelock.Registrar` was built from.
    registrar : mapping
        The Registrar's keyword arguments.
    frame : int
        Index of the frame it was taken at (in the numbering of the run that
        took it).
    taken_at : float
        Unix time it was taken.
    what : str
        How it was taken (``"frame 0"``, ``"mean of 5 frames"``).
    stage_position_um : (x, y) or None
        Stage position when it was taken (None without a stage loop).
    """

    key: str
    image: npt.NDArray[Any]
    registrar: Mapping[str, Any]
    frame: int
    taken_at: float
    what: str
    stage_position_um: tuple[float, float] | None = None

    def build_registrar(self) -> Registrar:
        """Rebuild the Registrar exactly as it was built when the reference was taken.

        Raises
        ------
        ValueError
            If the image is unusable or the settings invalid.
        """
        from stagelock.registration import Registrar

        kwargs = dict(self.registrar)
        if kwargs.get("roi") is not None:
            kwargs["roi"] = tuple(int(v) for v in kwargs["roi"])
        return Registrar(self.image, **kwargs)


@dataclass(frozen=True, slots=True)
class SavedState:
    """Everything read back from ``state.json`` and the files it names."""

    source_name: str
    source_kind: str
    shape: tuple[int, int] | None
    references: Mapping[str, SavedReference] = field(default_factory=dict)
    origin_um: tuple[float, float] | None = None
    calibration: Calibration | None = None
    next_frame: int = 0
    """The number after the last frame handled: a resumed run goes on from it."""


def _pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    x, y = value
    return (float(x), float(y))


class StateDir:
    """Read and atomically update one daemon's state directory.

    Parameters
    ----------
    path : str or Path
        The directory (created with mode 0700 if missing).
    source_name, source_kind : str
        The source this daemon reads; a saved state of another source is refused.

    Raises
    ------
    StateError
        When the directory cannot be created or another daemon holds its lock.

    Notes
    -----
    Thread-safe: the worker (references, stage positions) and the main thread
    (calibration) may save concurrently; each save rewrites ``state.json`` under
    a lock. The directory's ``lock`` file is ``flock``-ed for the daemon's life,
    so two daemons never share a state (a killed daemon's lock goes with it).
    """

    def __init__(self, path: str | Path, *, source_name: str, source_kind: str) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state_dir {self.path}: {exc.strerror}") from None
        self.source_name = source_name
        self.source_kind = source_kind
        self._lock = threading.Lock()
        self._lock_fh = (self.path / _LOCK_FILE).open("a+")
        try:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            raise StateError(
                f"state_dir {self.path} is in use by another stagelock daemon; "
                "give each daemon its own --state-dir"
            ) from None
        self._doc: dict[str, Any] = self._empty()
        self._counter = 0
        self._frames_fd: int | None = None

    def _empty(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "source": {"name": self.source_name, "kind": self.source_kind},
            "shape": None,
            "references": {},
            "stage": {"origin_um": None},
            "calibration": None,
        }

    # -- reading ----------------------------------------------------------------

    def load(self, *, fresh: bool = False) -> SavedState | None:
        """Read the saved state, check it fits this daemon's source, adopt it.

        Parameters
        ----------
        fresh : bool
            Discard whatever is saved (``--fresh``): start over on purpose.

        Returns
        -------
        SavedState or None
            None when nothing is saved (or ``fresh``).

        Raises
        ------
        StateError
            When the state is unreadable or belongs to another source; the
            message names ``--fresh``.
        """
        file = self.path / _STATE_FILE
        if fresh:
            if file.exists():
                logger.info("--fresh: discarding the state saved in %s", self.path)
                self._write_doc()  # the empty state, replacing the old one
                self._remove_stale()
            with contextlib.suppress(OSError):
                (self.path / _FRAMES_FILE).unlink()
            return None
        if not file.exists():
            return None
        where = f"state_dir {self.path}"
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StateError(
                f"{where}: {_STATE_FILE} unreadable ({exc}); start with --fresh "
                "to discard it"
            ) from None
        if not isinstance(doc, dict) or doc.get("schema") != STATE_SCHEMA:
            raise StateError(
                f"{where}: {_STATE_FILE} is not a {STATE_SCHEMA} state; start with "
                "--fresh to discard it"
            )
        source = doc.get("source") or {}
        if (source.get("name"), source.get("kind")) != (
            self.source_name,
            self.source_kind,
        ):
            raise StateError(
                f"{where} holds the state of source {source.get('name')!r} "
                f"({source.get('kind')}), not of {self.source_name!r} "
                f"({self.source_kind}); start with --fresh to discard it, or use "
                "another --state-dir"
            )
        try:
            state = self._parse(doc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{where}: saved state unusable ({exc}); start with --fresh to "
                "discard it"
            ) from None
        self._doc = doc
        return state

    def _parse(self, doc: Mapping[str, Any]) -> SavedState:
        shape = doc.get("shape")
        refs: dict[str, SavedReference] = {}
        for key, entry in (doc.get("references") or {}).items():
            image = np.load(self.path / entry["file"], allow_pickle=False)
            refs[key] = SavedReference(
                key=key,
                image=image,
                registrar=dict(entry["registrar"]),
                frame=int(entry["frame"]),
                taken_at=float(entry["taken_at"]),
                what=str(entry.get("what", "")),
                stage_position_um=_pair(entry.get("stage_position_um")),
            )
        calibration = None
        if doc.get("calibration"):
            from stagelock.stage import Calibration

            calibration = Calibration.from_file(self.path / doc["calibration"])
        return SavedState(
            source_name=self.source_name,
            source_kind=self.source_kind,
            shape=None if shape is None else (int(shape[0]), int(shape[1])),
            references=refs,
            origin_um=_pair((doc.get("stage") or {}).get("origin_um")),
            calibration=calibration,
            next_frame=self._read_next_frame(),
        )

    def _read_next_frame(self) -> int:
        try:
            text = (self.path / _FRAMES_FILE).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return 0
        try:
            return max(int(text.strip() or 0), 0)
        except ValueError:
            logger.warning(
                "state_dir %s: %s unreadable; frame numbers start at 0",
                self.path,
                _FRAMES_FILE,
            )
            return 0

    def note_frame(self, index: int) -> None:
        """Remember that frame ``index`` was handled (the next one is ``index + 1``).

        One fixed-width ``pwrite`` in place, a few µs: cheap enough for every
        frame, and in the page cache the moment it returns, so a SIGKILL right
        after loses nothing (a power cut may lose the last few).

        Raises
        ------
        OSError
            When the file cannot be written.
        """
        if self._frames_fd is None:
            self._frames_fd = os.open(
                self.path / _FRAMES_FILE, os.O_WRONLY | os.O_CREAT, 0o600
            )
        os.pwrite(self._frames_fd, f"{index + 1:0{_FRAMES_WIDTH}d}\n".encode(), 0)

    # -- writing ----------------------------------------------------------------

    def save_reference(
        self,
        key: str,
        image: npt.NDArray[Any],
        *,
        registrar: Mapping[str, Any],
        frame: int,
        what: str,
    ) -> None:
        """Save a new reference for ``key`` (its stage position comes later).

        Parameters
        ----------
        key : str
            Position key.
        image : ndarray
            The image the Registrar was built from.
        registrar : mapping
            The Registrar's keyword arguments (JSON-serialisable).
        frame : int
            The frame index it was taken at.
        what : str
            How it was taken.
        """
        with self._lock:
            self._counter += 1
            name = f"reference-{key}-{os.getpid()}-{self._counter}.npy"
            array = np.ascontiguousarray(image)
            atomic_write(
                self.path / name,
                lambda fh: np.save(fh, array, allow_pickle=False),
            )
            self._doc["shape"] = [int(array.shape[0]), int(array.shape[1])]
            self._doc["references"][key] = {
                "file": name,
                "frame": int(frame),
                "taken_at": time.time(),
                "what": what,
                "registrar": json_safe(dict(registrar)),
                "stage_position_um": None,
            }
            self._write_doc()
            self._remove_stale()

    def save_stage(
        self,
        origin_um: tuple[float, float] | None,
        positions_um: Mapping[str, tuple[float, float] | None],
    ) -> None:
        """Save the travel-limit origin and each reference's stage position.

        Writes only when something changed (called after every correction).
        """
        with self._lock:
            changed = False
            origin = None if origin_um is None else [float(v) for v in origin_um]
            if self._doc["stage"].get("origin_um") != origin:
                self._doc["stage"]["origin_um"] = origin
                changed = True
            for key, pos in positions_um.items():
                entry = self._doc["references"].get(key)
                value = None if pos is None else [float(v) for v in pos]
                if entry is not None and entry.get("stage_position_um") != value:
                    entry["stage_position_um"] = value
                    changed = True
            if changed:
                self._write_doc()

    def save_calibration(self, calibration: Calibration) -> None:
        """Save the calibration measured at start-up (reused on restart)."""
        with self._lock:
            target = self.path / _CALIBRATION_FILE
            # Calibration.to_file writes a path: write it beside, then make it atomic
            tmp = self.path / f".{_CALIBRATION_FILE}.{os.getpid()}.tmp"
            calibration.to_file(tmp)
            text = tmp.read_bytes()
            tmp.unlink()
            atomic_write(target, lambda fh: fh.write(text))
            self._doc["calibration"] = _CALIBRATION_FILE
            self._write_doc()

    def _write_doc(self) -> None:
        data = (json.dumps(self._doc, indent=2, allow_nan=False) + "\n").encode()
        atomic_write(self.path / _STATE_FILE, lambda fh: fh.write(data))

    def _remove_stale(self) -> None:
        # reference images no longer named by state.json (replaced ones)
        keep = {e["file"] for e in self._doc["references"].values()}
        for old in self.path.glob("reference-*.npy"):
            if old.name not in keep:
                with contextlib.suppress(OSError):
                    old.unlink()
        if self._doc.get("calibration") is None:
            with contextlib.suppress(OSError):
                (self.path / _CALIBRATION_FILE).unlink()

    def close(self) -> None:
        """Release the directory's lock; idempotent."""
        if self._frames_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._frames_fd)
            self._frames_fd = None
        if not self._lock_fh.closed:
            self._lock_fh.close()
