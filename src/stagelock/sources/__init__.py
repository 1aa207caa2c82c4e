"""Frame sources: where frames come from (Micro-Manager, a folder)."""

from ._folder import (
    FolderSource,
    acquisition_index,
    file_position,
    is_temporary_name,
)
from ._mmcore import MMCoreSource, SourceState, open_core, release_core
from ._protocol import Frame, FrameCallback, FrameSource

__all__ = [
    "FolderSource",
    "Frame",
    "FrameCallback",
    "FrameSource",
    "MMCoreSource",
    "SourceState",
    "acquisition_index",
    "file_position",
    "is_temporary_name",
    "open_core",
    "release_core",
]
