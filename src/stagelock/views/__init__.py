"""Looking at drift: the live monitor, record files, plots."""

from ._monitor import (
    DEFAULT_ENDPOINT,
    MonitorRow,
    MonitorState,
    parse_endpoint,
    render,
    run_monitor,
    sparkline,
)
from ._plot import INSTALL_HINT, MissingExtraError, plot_record
from ._record import DriftRecord, RecordedCorrection, RecordError, load_record

__all__ = [
    "DEFAULT_ENDPOINT",
    "INSTALL_HINT",
    "DriftRecord",
    "MissingExtraError",
    "MonitorRow",
    "MonitorState",
    "RecordError",
    "RecordedCorrection",
    "load_record",
    "parse_endpoint",
    "plot_record",
    "render",
    "run_monitor",
    "sparkline",
]
