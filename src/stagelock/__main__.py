"""``python -m stagelock``."""

from .cli import entry

entry()
