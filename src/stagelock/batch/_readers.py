"""Stacks on disk as :class:`StackSource`: TIFF, OME-Zarr, Micro-Manager folders, bioio.

Every source is a small frozen, picklable description (path, shape, dtype): it is
built once on the driver and shipped to the workers, which open the file
themselves and read only the time points of their chunk, one plane (or one
storage chunk) at a time.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from stagelock.stacks import StackReader

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "BioImageSource",
    "MMSequenceSource",
    "StackSource",
    "TiffSource",
    "ZarrSource",
    "expand_inputs",
    "open_source",
    "output_stem",
]

# suffixes stripped to name the outputs, longest first
_STEM_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr")
_TIFF_SUFFIXES = (".tif", ".tiff")
_BIOIO_SUFFIXES = (".nd2", ".czi", ".lif")
# Micro-Manager 2 / 1.4 image-sequence file names
_MM_NAME = re.compile(
    r"img_channel(?P<c>\d+)_position(?P<p>\d+)_time(?P<t>\d+)_z(?P<z>\d+)\.tiff?$",
    re.IGNORECASE,
)
_MM_OLD_NAME = re.compile(
    r"img_(?P<t>\d{9})_(?P<c>.+?)_(?P<z>\d{3})\.tiff?$", re.IGNORECASE
)
# storage chunks larger than this along T are read plane by plane instead
_MAX_BLOCK_FRAMES = 64


@runtime_checkable
class StackSource(Protocol):
    """A saved stack, read by time ranges; picklable, opens its file lazily.

    Time points are ``0 .. n_frames - 1``; each holds ``n_channels`` planes of
    ``plane_shape``.
    """

    @property
    def path(self) -> Path:
        """The input as given (file or directory)."""
        ...

    @property
    def n_frames(self) -> int:
        """Number of time points."""
        ...

    @property
    def n_channels(self) -> int:
        """Number of channels (1 when the stack has no channel axis)."""
        ...

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(height, width)`` of a plane."""
        ...

    @property
    def dtype(self) -> np.dtype[Any]:
        """Pixel type."""
        ...

    def frames(self, channel: int, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the 2-D planes of ``channel`` for time points ``start .. stop-1``."""
        ...

    def blocks(self, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield a ``(n_channels, H, W)`` array per time point ``start .. stop-1``."""
        ...


def output_stem(path: Path) -> str:
    """Name of the outputs of ``path``: its file name without the stack suffix.

    >>> output_stem(Path("/data/cell 1.ome.tif")), output_stem(Path("b.zarr"))
    ('cell 1', 'b')
    """
    name = path.name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (
        path.suffix.lower() == ".zarr"
        or (path / "zarr.json").exists()
        or (path / ".zattrs").exists()
        or (path / ".zgroup").exists()
        or (path / ".zarray").exists()
    )


def _is_mm_sequence(path: Path) -> bool:
    return path.is_dir() and any(
        _MM_NAME.match(p.name) or _MM_OLD_NAME.match(p.name) for p in path.iterdir()
    )


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Turn files, globs and directories into the list of stacks to register.

    A glob expands to its sorted matches; a directory that is itself a stack
    (OME-Zarr, Micro-Manager image sequence) stays one input, any other directory
    expands to the stacks directly inside it. Paths that do not exist are kept
    (they are reported as unreadable, not silently dropped); duplicates are
    removed, order is kept.
    """
    out: list[Path] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            out.extend(Path(m) for m in matches) if matches else out.append(Path(text))
            continue
        path = Path(text)
        if path.is_dir() and not _is_zarr(path) and not _is_mm_sequence(path):
            out.extend(
                child
                for child in sorted(path.iterdir())
                if not child.name.startswith(".")
                and (
                    child.suffix.lower() in _TIFF_SUFFIXES + _BIOIO_SUFFIXES
                    or _is_zarr(child)
                    or _is_mm_sequence(child)
                )
            )
            continue
        out.append(path)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def open_source(path: Path) -> StackSource:
    """Inspect ``path`` and return its source; ValueError (one line) if unusable."""
    if not path.exists():
        raise ValueError(f"no such file or directory: {path}")
    if _is_zarr(path):
        return ZarrSource.open(path)
    if path.is_dir():
        if _is_mm_sequence(path):
            return MMSequenceSource.open(path)
        raise ValueError(
            f"{path} is a directory holding no stack (OME-Zarr or Micro-Manager "
            "image sequence)"
        )
    if path.suffix.lower() in _BIOIO_SUFFIXES:
        return BioImageSource.open(path)
    return TiffSource.open(path)


def _check_plane(plane: npt.NDArray[Any], path: Path, where: str) -> None:
    if plane.ndim != 2:
        raise ValueError(f"{path}: {where} is not a 2-D plane (shape {plane.shape})")


# -- TIFF / OME-TIFF ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TiffSource:
    """A TIFF/OME-TIFF series, read page by page (see :class:`StackReader`)."""

    reader: StackReader

    @classmethod
    def open(cls, path: Path) -> TiffSource:
        """Inspect a TIFF file (ValueError if it is not a usable stack)."""
        return cls(StackReader.open(path))

    @property
    def path(self) -> Path:
        """The TIFF file."""
        return self.reader.path

    @property
    def n_frames(self) -> int:
        """Number of time points."""
        return self.reader.n_frames

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return self.reader.n_channels

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.reader.plane_shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """Pixel type."""
        return self.reader.dtype

    def _read(self, series: Any, index: int) -> npt.NDArray[Any]:
        try:
            page = series.pages[index]
            if page is None:
                raise ValueError("missing page")
            plane = np.asarray(page.asarray())
        except Exception as exc:  # tifffile raises many types on damaged data
            raise ValueError(
                f"{self.path}: plane {index} is unreadable ({exc})"
            ) from None
        return plane.reshape(plane.shape[-2:])

    def frames(self, channel: int, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the planes of ``channel`` for ``start .. stop-1``."""
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            for t in range(start, stop):
                yield self._read(series, self.reader.page_index(t, channel))

    def blocks(self, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield ``(C, H, W)`` per time point for ``start .. stop-1``."""
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            for t in range(start, stop):
                yield np.stack(
                    [
                        self._read(series, self.reader.page_index(t, c))
                        for c in range(self.n_channels)
                    ]
                )


# -- OME-Zarr -------------------------------------------------------------------------


def _multiscales(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Return ``multiscales`` of OME-Zarr 0.5 (under ``ome``) or 0.4 (top level)."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list):
        found: list[dict[str, Any]] = ome["multiscales"]
        return found
    value = attrs.get("multiscales")
    return value if isinstance(value, list) else None


@dataclass(frozen=True, slots=True)
class ZarrSource:
    """The full-resolution level of an OME-Zarr 0.4/0.5 image (zarr v2 or v3).

    The level is ``multiscales[0].datasets[0].path`` and the axes come from
    ``multiscales[0].axes``; ``t`` is time, ``c`` channel, ``y``/``x`` the plane,
    any other axis must have size 1. A bare zarr array (no OME metadata) is read
    as ``[T][C]YX`` by its number of dimensions.
    """

    path: Path
    array_path: str
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_frames: int

    @classmethod
    def open(cls, path: Path) -> ZarrSource:
        """Read the metadata of an OME-Zarr image (ValueError if unusable)."""
        import zarr

        try:
            node = zarr.open(str(path), mode="r")
        except Exception as exc:  # zarr raises many types on damaged metadata
            raise ValueError(f"cannot read {path} as zarr: {exc}") from None
        array_path = ""
        if isinstance(node, zarr.Array):
            names = {2: "yx", 3: "tyx", 4: "tcyx"}.get(node.ndim)
            if names is None:
                raise ValueError(f"{path}: a {node.ndim}-D zarr array is no stack")
            axes, array = names, node
        else:
            multiscales = _multiscales(dict(node.attrs))
            if not multiscales:
                raise ValueError(f"{path} is a zarr group without OME multiscales")
            first = multiscales[0]
            try:
                array_path = str(first["datasets"][0]["path"])
                axes = "".join(
                    (a["name"] if isinstance(a, dict) else str(a))[0].lower()
                    for a in first["axes"]
                )
                array = zarr.open_array(str(path / array_path), mode="r")
            except Exception as exc:
                raise ValueError(
                    f"{path}: unusable multiscales metadata ({exc})"
                ) from None
        shape = tuple(int(n) for n in array.shape)
        if len(axes) != len(shape) or not axes.endswith("yx"):
            raise ValueError(
                f"{path} has axes {axes!r} for shape {shape}: expected ... y x"
            )
        for name, size in zip(axes[:-2], shape[:-2], strict=True):
            if name not in "tc" and size != 1:
                raise ValueError(
                    f"{path} has a {name!r} axis of size {size}: register one plane "
                    "per time point (e.g. a projection)"
                )
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "uif":
            raise ValueError(f"{path} has unsupported pixel type {dtype}")
        t_chunk = int(array.chunks[axes.index("t")]) if "t" in axes else 1
        return cls(path, array_path, axes, shape, dtype, t_chunk)

    def _size(self, name: str) -> int:
        return self.shape[self.axes.index(name)] if name in self.axes else 1

    @property
    def n_frames(self) -> int:
        """Number of time points (size of ``t``)."""
        return self._size("t")

    @property
    def n_channels(self) -> int:
        """Number of channels (size of ``c``)."""
        return self._size("c")

    @property
    def plane_shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.shape[-2], self.shape[-1]

    def _array(self) -> Any:
        import zarr

        return zarr.open_array(str(self.path / self.array_path), mode="r")

    def _tcyx(self, array: Any, start: int, stop: int) -> npt.NDArray[Any]:
        """Read time points ``start..stop-1`` as a ``(t, c, y, x)`` array."""
        index: list[Any] = []
        for name in self.axes:
            if name == "t":
                index.append(slice(start, stop))
            elif name in "cyx":
                index.append(slice(None))
            else:
                index.append(0)
        try:
            block = np.asarray(array[tuple(index)])
        except Exception as exc:  # a missing or corrupt chunk
            raise ValueError(
                f"{self.path}: time points {start}..{stop - 1} are unreadable ({exc})"
            ) from None
        kept = [n for n in self.axes if n in "tcyx"]
        for name in "tc":
            if name not in kept:
                block = block[np.newaxis]
                kept.insert(0, name)
        return np.transpose(block, [kept.index(n) for n in "tcyx"])

    def blocks(self, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield ``(C, H, W)`` per time point, one storage chunk in memory."""
        array = self._array()
        step = max(1, min(self.chunk_frames, _MAX_BLOCK_FRAMES))
        t = start
        while t < stop:
            # read whole storage chunks so each is decompressed once
            end = min(stop, (t // step + 1) * step)
            block = self._tcyx(array, t, end)
            yield from block
            t = end

    def frames(self, channel: int, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the planes of ``channel`` for ``start .. stop-1``."""
        for block in self.blocks(start, stop):
            yield block[channel]


# -- Micro-Manager image sequence ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class MMSequenceSource:
    """A Micro-Manager image-sequence folder: one TIFF per (time, channel) plane.

    ``img_channel000_position000_time000000000_z000.tif`` (Micro-Manager 2) and
    ``img_000000000_DAPI_000.tif`` (1.4) names; one position and one z plane.
    Channels are ordered by index (2) or by name (1.4).
    """

    path: Path
    files: tuple[tuple[Path, ...], ...]  # [time][channel]
    plane_shape: tuple[int, int]
    dtype: np.dtype[Any]

    @classmethod
    def open(cls, path: Path) -> MMSequenceSource:
        """Index the folder's planes (ValueError if incomplete or unusable)."""
        import tifffile

        table: dict[tuple[int, str], Path] = {}
        positions, zs = set(), set()
        for f in path.iterdir():
            m = _MM_NAME.match(f.name)
            if m:
                positions.add(int(m["p"]))
                key = (int(m["t"]), f"{int(m['c']):09d}")
            else:
                m = _MM_OLD_NAME.match(f.name)
                if not m:
                    continue
                key = (int(m["t"]), m["c"])
            zs.add(int(m["z"]))
            table[key] = f
        if len(positions) > 1 or len(zs) > 1:
            raise ValueError(
                f"{path} holds {len(positions)} positions and {len(zs)} z planes: "
                "register one position and one z plane per folder"
            )
        times = sorted({t for t, _ in table})
        channels = sorted({c for _, c in table})
        missing = [(t, c) for t in times for c in channels if (t, c) not in table]
        if missing:
            t, c = missing[0]
            raise ValueError(
                f"{path}: {len(missing)} plane(s) missing (first: time {t}, "
                f"channel {c})"
            )
        files = tuple(tuple(table[(t, c)] for c in channels) for t in times)
        try:
            with tifffile.TiffFile(files[0][0]) as tif:
                page = tif.pages[0]
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
        except Exception as exc:
            raise ValueError(f"cannot read {files[0][0]} as TIFF: {exc}") from None
        if len(shape) != 2:
            raise ValueError(f"{files[0][0]} is not a grey-level plane ({shape})")
        return cls(path, files, (int(shape[0]), int(shape[1])), dtype)

    @property
    def n_frames(self) -> int:
        """Number of time points."""
        return len(self.files)

    @property
    def n_channels(self) -> int:
        """Number of channels."""
        return len(self.files[0])

    def _read(self, file: Path) -> npt.NDArray[Any]:
        import tifffile

        try:
            plane = np.asarray(tifffile.imread(file))
        except Exception as exc:
            raise ValueError(f"{file} is unreadable ({exc})") from None
        if plane.shape != self.plane_shape:
            raise ValueError(
                f"{file} has shape {plane.shape}, the folder {self.plane_shape}"
            )
        return plane

    def frames(self, channel: int, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the planes of ``channel`` for ``start .. stop-1``."""
        for t in range(start, stop):
            yield self._read(self.files[t][channel])

    def blocks(self, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield ``(C, H, W)`` per time point for ``start .. stop-1``."""
        for t in range(start, stop):
            yield np.stack([self._read(f) for f in self.files[t]])


# -- ND2 / CZI / LIF through bioio (optional) ---------------------------------------


@dataclass(frozen=True, slots=True)
class BioImageSource:
    """ND2/CZI/LIF and other formats read through bioio (``pip install bioio``).

    Scene 0; Z must have size 1. Planes are read lazily (``get_image_dask_data``).
    """

    path: Path
    n_frames: int
    n_channels: int
    plane_shape: tuple[int, int]
    dtype: np.dtype[Any]

    @classmethod
    def open(cls, path: Path) -> BioImageSource:
        """Inspect the file through bioio (ValueError if missing or unusable)."""
        image = _bioimage(path)
        dims = image.dims
        if int(dims.Z) != 1:
            raise ValueError(f"{path} has {dims.Z} z planes: one per time point only")
        return cls(
            path,
            int(dims.T),
            int(dims.C),
            (int(dims.Y), int(dims.X)),
            np.dtype(image.dtype),
        )

    def frames(self, channel: int, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield the planes of ``channel`` for ``start .. stop-1``."""
        image = _bioimage(self.path)
        for t in range(start, stop):
            data = image.get_image_dask_data("YX", T=t, C=channel, Z=0)
            yield np.asarray(data.compute())

    def blocks(self, start: int, stop: int) -> Iterator[npt.NDArray[Any]]:
        """Yield ``(C, H, W)`` per time point for ``start .. stop-1``."""
        image = _bioimage(self.path)
        for t in range(start, stop):
            yield np.asarray(image.get_image_dask_data("CYX", T=t, Z=0).compute())


def _bioimage(path: Path) -> Any:
    try:
        from bioio import BioImage  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError(
            f"{path.suffix} files need bioio and its plugin: "
            "pip install bioio bioio-nd2 bioio-czi bioio-lif"
        ) from None
    try:
        return BioImage(path)
    except Exception as exc:
        raise ValueError(f"cannot read {path} through bioio: {exc}") from None


def check_channel(source: StackSource, channel: int) -> None:
    """ValueError unless ``channel`` exists in ``source``."""
    if not 0 <= channel < source.n_channels:
        raise ValueError(
            f"channel {channel} is out of range: {source.path.name} has "
            f"{source.n_channels} channel(s)"
        )


def stems_clash(paths: Sequence[Path]) -> str | None:
    """Describe two inputs that would write the same outputs, or None."""
    owner: dict[str, Path] = {}
    for p in paths:
        stem = output_stem(p)
        if stem in owner:
            return f"{owner[stem]} and {p} would both write {stem}.shifts.csv"
        owner[stem] = p
    return None
