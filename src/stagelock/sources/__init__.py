"""Frame sources: where frames come from (Micro-Manager, a folder, a simulation)."""

from ._protocol import Frame, FrameCallback, FrameSource

__all__ = ["Frame", "FrameCallback", "FrameSource"]
