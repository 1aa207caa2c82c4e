"""Live view of one or several stagelock daemons, from their ZeroMQ messages.

Three layers, so that the interesting parts are testable without a terminal:

- :class:`MonitorState` — pure state. ``update(topic, message, now)`` folds one
  message into per-source rows (latest shift, fps, drift history, corrections,
  alarms). It never raises on bad input: malformed messages are counted and
  skipped, unknown fields are ignored, missing fields stay ``None``.
- :func:`render` — pure function ``(state, now) -> rich renderable``.
- :func:`run_monitor` — the thin loop: a SUB socket connected to every endpoint,
  polled at ~4 Hz, feeding the state and a :class:`rich.live.Live` (or printing
  one JSON object per line with ``json_output=True``).

A SUB socket *connects*, so ZeroMQ reconnects on its own when a daemon restarts
(``RECONNECT_IVL`` is lowered so that this takes a fraction of a second). The
slow-joiner caveat of PUB/SUB applies: messages published before the
subscription has propagated to the publisher are lost, so the first message
seen may not be the first one sent.

Size: over 600 lines because the three layers (state, render, loop) share one
row model and are tested together; each layer is a separate section.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from stagelock.protocol import (
    ALARM_TOPIC,
    CORRECTION_TOPIC,
    DEFAULT_PUBLISH_ENDPOINT,
    SHIFT_TOPIC,
    STATUS_TOPIC,
    TOPIC_PREFIX,
    DaemonState,
)

if TYPE_CHECKING:
    import threading

    from rich.console import Console, RenderableType

    from stagelock.security import ClientKeys

__all__ = [
    "DEFAULT_ENDPOINT",
    "MonitorRow",
    "MonitorState",
    "parse_endpoint",
    "render",
    "run_monitor",
    "sparkline",
]

DEFAULT_ENDPOINT = DEFAULT_PUBLISH_ENDPOINT
"""Where ``stagelock run`` publishes by default."""

"""Subscription prefix: covers shift, status, correction, alarm and log topics."""

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
HISTORY_LEN = 60
"""How many drift magnitudes each source keeps for its sparkline."""

FPS_WINDOW_S = 5.0
"""Shift messages received within this window give the displayed frame rate."""

MISSING = "—"

COMPACT_BELOW = 110
"""Terminal width under which :func:`render` drops the frame and µm columns."""
_WIDE_ONLY = frozenset({"frame", "dx µm", "dy µm"})

MAX_BATCH = 2000
"""Messages handled per poll round at most, before the view is redrawn."""

# statuses that still carry a usable shift, shown in yellow; the rest in red
_WARN_STATUSES = frozenset({"low_confidence", "blank"})
_OK_STATUSES = frozenset({"ok"})
# daemon states: "measuring" is the daemon's word, "running" the wire spec's
_NORMAL_STATES = frozenset({DaemonState.MEASURING.value})
_BAD_STATES = frozenset({DaemonState.SOURCE_LOST.value, DaemonState.STOPPED.value})

_ENDPOINT_RE = re.compile(
    r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-*]+):(?P<port>\d{1,5})$"
)


def parse_endpoint(endpoint: str) -> str:
    """Check a ZeroMQ endpoint to connect to and return it unchanged.

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT`` (as published by ``stagelock run``), or an
        ``ipc://PATH`` / ``inproc://NAME`` endpoint.

    Returns
    -------
    str
        The endpoint.

    Raises
    ------
    ValueError
        With a one-line message naming the endpoint and the expected form.
    """
    if endpoint.startswith(("ipc://", "inproc://")) and len(endpoint.split("://")[1]):
        return endpoint
    match = _ENDPOINT_RE.match(endpoint)
    if match is None or match["host"] == "*":
        raise ValueError(
            f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT, "
            f"e.g. {DEFAULT_ENDPOINT}"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"bad endpoint {endpoint!r}: port {port} is not in 1..65535")
    return endpoint


def _number(value: Any) -> float | None:
    """Return a JSON number as float (NaN allowed); None when absent or not a number."""
    # bool is an int subclass; a True shift is a malformed field, not 1 px
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(slots=True)
class MonitorRow:
    """What the monitor knows about one daemon (one ``source`` name).

    Fields are ``None`` until a message has carried them. Times called
    ``*_at`` are the monitor's own clock (the ``now`` passed to
    :meth:`MonitorState.update`), not the daemon's. ``alarms`` maps each
    standing alarm's name to its message ("" when only the heartbeat named it).
    """

    source: str
    frame: int | None = None
    dx_px: float | None = None
    dy_px: float | None = None
    dx_um: float | None = None
    dy_um: float | None = None
    confidence: float | None = None
    status: str | None = None
    skipped: int | None = None
    latency_ms: float | None = None
    n_regions: int | None = None
    state: str | None = None
    daemon_fps: float | None = None
    corrections: int | None = None
    corrections_seen: int = 0
    stage_x_um: float | None = None
    stage_y_um: float | None = None
    alarms: dict[str, str] = field(default_factory=dict)
    shifts_received: int = 0
    last_seen_at: float | None = None
    shift_arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=256))
    drift_px: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))
    positions: dict[tuple[int, str], MonitorRow] = field(default_factory=dict)
    """One sub-row per MDA position (messages with a ``position``), by
    (position, name); shown under the daemon's row."""

    def position_row(self, msg: Mapping[str, Any]) -> MonitorRow | None:
        """Return the sub-row of the message's position (None without one)."""
        position = _integer(msg.get("position"))
        if position is None:
            return None
        name = _text(msg.get("position_name")) or ""
        key = (position, name)
        row = self.positions.get(key)
        if row is None:
            label = f"└ p{position}" + (f" {name}" if name else "")
            row = self.positions[key] = MonitorRow(label)
        return row

    def fps(self, now: float) -> float | None:
        """Shift messages per second received over the last few seconds.

        Parameters
        ----------
        now : float
            The monitor's clock, in seconds.

        Returns
        -------
        float or None
            None until two shift messages arrived within ``FPS_WINDOW_S``;
            0.0 once the stream has stopped for longer than that window.
        """
        recent = [t for t in self.shift_arrivals if now - t <= FPS_WINDOW_S]
        if not recent:
            return 0.0 if self.shift_arrivals else None
        if len(recent) < 2 or recent[-1] <= recent[0]:
            return None
        return (len(recent) - 1) / (recent[-1] - recent[0])

    def silent_s(self, now: float) -> float:
        """Seconds since the last message of any topic from this source."""
        return 0.0 if self.last_seen_at is None else max(0.0, now - self.last_seen_at)


@dataclass(slots=True)
class MonitorState:
    """Per-source state folded from the daemons' messages; never raises on input.

    Attributes
    ----------
    sources : dict of str to MonitorRow
        One entry per ``source`` name, in order of first appearance.
    received : int
        Every message handed to :meth:`update`, good or bad.
    malformed : int
        Messages that were not a JSON object with a ``source`` string, or had a
        known topic with an unexpected ``schema`` major.
    ignored : int
        Well-formed messages on topics the monitor does not display (logs).
    origins : dict of str to str
        Last row name seen from each endpoint, to attribute messages that
        lack a ``source``.
    labels : dict of (str, str) to str
        Row name of each (``source``, endpoint) pair. When the same name
        comes from a second endpoint, every such row gets its endpoint in the
        label (``"simulated :5556"``, ``"simulated @scope-2:5556"``).
    """

    sources: dict[str, MonitorRow] = field(default_factory=dict)
    received: int = 0
    malformed: int = 0
    ignored: int = 0
    origins: dict[str, str] = field(default_factory=dict)
    labels: dict[tuple[str, str], str] = field(default_factory=dict)

    def update(
        self,
        topic: bytes | str,
        message: bytes | str | Mapping[str, Any],
        now: float,
        *,
        origin: str | None = None,
    ) -> bool:
        """Fold one message into the state.

        Parameters
        ----------
        topic : bytes or str
            The ZeroMQ topic frame, e.g. ``b"stagelock.shift"``.
        message : bytes, str or mapping
            The UTF-8 JSON payload, or an already decoded object.
        now : float
            The monitor's clock in seconds (``time.monotonic()`` in the loop).
        origin : str, optional
            The endpoint it came from. A message without a ``source`` field is
            attributed to the last source seen from the same origin (or, with
            no origin, to the only source known).

        Returns
        -------
        bool
            True if the message was used, False if it was ignored or malformed.
        """
        self.received += 1
        decoded = _decode(message)
        name = topic.decode("utf-8", "replace") if isinstance(topic, bytes) else topic
        if decoded is None:
            self.malformed += 1
            return False
        handler = _HANDLERS.get(name)
        if handler is None:
            self.ignored += 1
            return False
        schema = decoded.get("schema")
        # a different major version may mean different units: refuse, don't guess
        # (version 2 of shift/correction only added the position fields)
        if isinstance(schema, str) and schema not in (f"{name}/1", f"{name}/2"):
            self.malformed += 1
            return False
        source = self._attribute(_text(decoded.get("source")), origin)
        if source is None:
            self.malformed += 1
            return False
        row = self.sources.get(source)
        if row is None:
            row = self.sources[source] = MonitorRow(source)
        row.last_seen_at = now
        handler(row, decoded, now)
        return True

    def _attribute(self, source: str | None, origin: str | None) -> str | None:
        """Name the row a message belongs to, or None if it cannot be known."""
        if source is not None:
            if origin is None:
                return source
            label = self.labels.get((source, origin))
            if label is None:
                label = self._new_label(source, origin)
            self.origins[origin] = label
            return label
        if origin is not None:
            # e.g. corrections and alarms that do not repeat the source name
            return self.origins.get(origin, origin)
        if len(self.sources) == 1:
            return next(iter(self.sources))
        return None

    def _new_label(self, source: str, origin: str) -> str:
        """Label a new (source, endpoint) pair; on a shared name, label all of them."""
        others = [o for (name, o) in self.labels if name == source]
        if not others:
            self.labels[(source, origin)] = source
            return source
        # two daemons share a name ("simulated"): every row shows its endpoint
        for other in others:
            old, new = self.labels[(source, other)], f"{source} {_short(other)}"
            if old != new:
                row = self.sources.pop(old, None)
                if row is not None:
                    row.source = new
                    self.sources[new] = row
                self.labels[(source, other)] = new
                if self.origins.get(other) == old:
                    self.origins[other] = new
        label = self.labels[(source, origin)] = f"{source} {_short(origin)}"
        return label


def _short(endpoint: str) -> str:
    """``tcp://127.0.0.1:5556`` → ``:5556``; other hosts keep their name."""
    address = endpoint.removeprefix("tcp://")
    for local in ("127.0.0.1:", "localhost:", "[::1]:"):
        if address.startswith(local):
            return address[len(local) - 1 :]
    return f"@{address}"


def _decode(message: bytes | str | Mapping[str, Any]) -> dict[str, Any] | None:
    if isinstance(message, Mapping):
        return dict(message)
    try:
        obj = json.loads(message)
    except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        return None
    return obj if isinstance(obj, dict) else None


def _on_shift(row: MonitorRow, msg: dict[str, Any], now: float) -> None:
    sub = row.position_row(msg)
    if sub is not None:
        sub.last_seen_at = now
        _on_shift(sub, {k: v for k, v in msg.items() if k != "position"}, now)
    row.shifts_received += 1
    row.shift_arrivals.append(now)
    row.frame = _integer(msg.get("frame"))
    row.dx_px, row.dy_px = _number(msg.get("dx_px")), _number(msg.get("dy_px"))
    row.dx_um, row.dy_um = _number(msg.get("dx_um")), _number(msg.get("dy_um"))
    row.confidence = _number(msg.get("confidence"))
    row.status = _text(msg.get("status"))
    row.skipped = _integer(msg.get("skipped"))
    row.latency_ms = _number(msg.get("latency_ms"))
    row.n_regions = _integer(msg.get("n_regions"))
    if row.dx_px is not None and row.dy_px is not None:
        row.drift_px.append(math.hypot(row.dx_px, row.dy_px))
    else:
        # a failed frame leaves a gap in the sparkline rather than a fake zero
        row.drift_px.append(math.nan)


def _on_status(row: MonitorRow, msg: dict[str, Any], now: float) -> None:
    row.state = _text(msg.get("state")) or row.state
    row.daemon_fps = _number(msg.get("fps"))
    corrections = _integer(msg.get("corrections"))
    if corrections is not None:
        row.corrections = corrections
    skipped = _integer(msg.get("frames_skipped"))
    if skipped is not None:
        row.skipped = skipped
    # the heartbeat is authoritative: null clears every alarm, a (comma-separated)
    # name list keeps those, an absent field changes nothing
    if "alarm" in msg:
        names = [a.strip() for a in (_text(msg.get("alarm")) or "").split(",")]
        row.alarms = {a: row.alarms.get(a, "") for a in names if a}


def _on_correction(row: MonitorRow, msg: dict[str, Any], now: float) -> None:
    sub = row.position_row(msg)
    if sub is not None:
        sub.last_seen_at = now
        _on_correction(sub, {k: v for k, v in msg.items() if k != "position"}, now)
    row.corrections_seen += 1
    # between heartbeats, count the corrections seen here on top of the last total
    row.corrections = max(row.corrections or 0, row.corrections_seen)
    row.stage_x_um = _number(msg.get("stage_x_um"))
    row.stage_y_um = _number(msg.get("stage_y_um"))


def _on_alarm(row: MonitorRow, msg: dict[str, Any], now: float) -> None:
    name = _text(msg.get("alarm")) or "alarm"
    if msg.get("active") is False:
        row.alarms.pop(name, None)
    else:
        row.alarms[name] = _text(msg.get("message")) or ""


_HANDLERS = {
    SHIFT_TOPIC: _on_shift,
    STATUS_TOPIC: _on_status,
    CORRECTION_TOPIC: _on_correction,
    ALARM_TOPIC: _on_alarm,
}


def sparkline(
    values: Iterable[float], width: int | None = None, *, min_span: float = 0.1
) -> str:
    """Unicode block sparkline of values, scaled from their min to their max.

    Scaling to the window's own range shows the trend (a slow creep rises from
    ▁ to █); ``min_span`` keeps measurement noise far below a pixel from being
    blown up to full height.

    Parameters
    ----------
    values : iterable of float
        Oldest first. NaN (a failed frame) is drawn as a space.
    width : int, optional
        Number of characters. With more values than ``width``, consecutive
        values are merged by their maximum, so a single spike stays visible.
    min_span : float
        Smallest range mapped onto the eight levels, in the values' unit.

    Returns
    -------
    str
        One character per value (or per merged bucket); empty without values.
    """
    data = list(values)
    if width is not None and len(data) > width > 0:
        buckets = []
        for i in range(width):
            chunk = data[i * len(data) // width : (i + 1) * len(data) // width]
            finite = [v for v in chunk if math.isfinite(v)]
            buckets.append(max(finite) if finite else math.nan)
        data = buckets
    finite = [v for v in data if math.isfinite(v)]
    low = min(finite, default=0.0)
    span = max(max(finite, default=0.0) - low, min_span)
    chars = []
    for value in data:
        if not math.isfinite(value):
            chars.append(" ")
        elif span <= 0:
            chars.append(SPARK_BLOCKS[0])
        else:
            level = round((value - low) / span * (len(SPARK_BLOCKS) - 1))
            chars.append(SPARK_BLOCKS[min(max(level, 0), len(SPARK_BLOCKS) - 1)])
    return "".join(chars)


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _status_cell(row: MonitorRow, now: float, silent_after_s: float) -> tuple[str, str]:
    """Text and rich style of a source's status cell: the worst thing wins."""
    silent = row.silent_s(now)
    if silent >= silent_after_s:
        return f"silent for {silent:.0f} s", "bold red"
    if row.alarms:
        # the messages go under the table: long ones would squeeze the columns
        return f"ALARM {', '.join(row.alarms)}", "bold red"
    parts = []
    style = "green"
    if row.state and row.state not in _NORMAL_STATES:
        parts.append(row.state)
        style = "red" if row.state in _BAD_STATES else "yellow"
    if row.status:
        parts.append(row.status)
        if row.status in _WARN_STATUSES:
            style = "yellow"
        elif row.status not in _OK_STATUSES:
            style = "red"
    return (" ".join(parts) or MISSING), style


def render(
    state: MonitorState,
    now: float,
    *,
    silent_after_s: float = 3.0,
    endpoints: Sequence[str] = (),
    spark_width: int = 16,
    width: int | None = None,
) -> RenderableType:
    """Build the monitor's view of ``state`` at time ``now``.

    Parameters
    ----------
    state : MonitorState
        The folded messages.
    now : float
        The same clock as the ``now`` given to :meth:`MonitorState.update`.
    silent_after_s : float
        A source with no message for this long is shown as "silent for N s".
    endpoints : sequence of str
        Shown in the caption.
    spark_width : int
        Characters of the drift sparkline (the last 60 values merged into it).
    width : int, optional
        Terminal width. Below ``COMPACT_BELOW`` columns the frame and µm
        columns are left out and the sparkline halved, so that the numbers that
        matter are never cut.

    Returns
    -------
    rich.console.RenderableType
        A table with one row per source and a caption line, followed by one
        line per active alarm with its message.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    caption = (
        f"messages: {state.received}"
        + (f", {state.malformed} malformed" if state.malformed else "")
        + (f" · {', '.join(endpoints)}" if endpoints else "")
    )
    table = Table(
        title="stagelock monitor",
        caption=caption,
        box=box.SIMPLE_HEAD,
        expand=False,
        pad_edge=False,
        # the box's column divider is already a space: pad on one side only
        padding=(0, 1, 0, 0),
        header_style="bold",
    )
    compact = width is not None and width < COMPACT_BELOW
    if compact:
        spark_width = max(4, spark_width // 2)
    # only the name may shrink (ellipsis); numbers never get cut
    table.add_column("source", overflow="ellipsis", min_width=6)
    numeric = [
        "frame",
        "dx px",
        "dy px",
        "dx µm",
        "dy µm",
        "conf",
        "fps",
        "skip",
        "corr",
    ]
    for name in numeric:
        if not (compact and name in _WIDE_ONLY):
            table.add_column(name, justify="right", no_wrap=True)
    table.add_column(f"drift, last {HISTORY_LEN}", no_wrap=True)
    table.add_column("status", no_wrap=True)
    if not state.sources:
        table.add_row(Text("waiting for messages…", style="dim"))
    rows = [
        (row, sub)
        for row in state.sources.values()
        for sub in (row, *(row.positions[k] for k in sorted(row.positions)))
    ]
    for parent, row in rows:
        text, style = _status_cell(row, now, silent_after_s)
        if row is not parent:
            # a position's row: its own shift and status; alarms stay on the daemon
            text, style = (
                row.status or "waiting",
                ("yellow" if row.status in _WARN_STATUSES else "green"),
            )
        conf_style = "yellow" if row.status in _WARN_STATUSES else ""
        cells: dict[str, str | Text] = {
            "frame": _fmt(row.frame, "d"),
            "dx px": _fmt(row.dx_px, "+.2f"),
            "dy px": _fmt(row.dy_px, "+.2f"),
            "dx µm": _fmt(row.dx_um, "+.3f"),
            "dy µm": _fmt(row.dy_um, "+.3f"),
            "conf": Text(_fmt(row.confidence, ".2f"), style=conf_style),
            "fps": _fmt(row.fps(now), ".1f"),
            "skip": _fmt(row.skipped, "d"),
            "corr": _fmt(row.corrections, "d"),
        }
        table.add_row(
            Text(row.source, style="bold" if row is parent else ""),
            *(v for k, v in cells.items() if not (compact and k in _WIDE_ONLY)),
            Text(sparkline(row.drift_px, spark_width), style="cyan"),
            Text(text, style=style),
        )
    notes = [
        Text(f"{row.source}: ALARM {name}: {message}", style="bold red")
        for row in state.sources.values()
        for name, message in row.alarms.items()
        if message
    ]
    return Group(table, *notes) if notes else table


def _connect(
    endpoints: Sequence[str], keys: ClientKeys | None = None
) -> tuple[Any, dict[Any, str]]:
    """One SUB socket per endpoint, so each message's origin is known."""
    import zmq

    context = zmq.Context()
    sockets = {}
    for endpoint in endpoints:
        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        # a restarted daemon is found again within ~0.2 s, not the default back-off
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX.encode("ascii"))
        if keys is not None:
            keys.apply(sock)  # CURVE client of a daemon started with --keys
        sock.connect(endpoint)
        sockets[sock] = endpoint
    return context, sockets


def run_monitor(
    endpoints: Sequence[str],
    *,
    keys: ClientKeys | None = None,
    json_output: bool = False,
    duration_s: float | None = None,
    silent_after_s: float = 3.0,
    refresh_hz: float = 4.0,
    console: Console | None = None,
    stream: IO[str] | None = None,
    state: MonitorState | None = None,
    stop: threading.Event | None = None,
) -> MonitorState:
    """Subscribe to the daemons at ``endpoints`` and show them until stopped.

    Parameters
    ----------
    endpoints : sequence of str
        ZeroMQ endpoints to connect to (checked with :func:`parse_endpoint`).
    keys : ClientKeys, optional
        CURVE keys (:func:`stagelock.security.load_client_keys`) for daemons
        started with ``--keys``.
    json_output : bool
        Print each message as one JSON object per line (with a ``topic`` field
        added) to ``stream`` instead of the live table.
    duration_s : float, optional
        Stop after this many seconds; by default run until Ctrl-C.
    silent_after_s : float
        Flag a source as silent after this long without a message.
    refresh_hz : float
        Redraw rate of the live table.
    console : rich.console.Console, optional
        Where the live table goes (default: a console on stdout).
    stream : text stream, optional
        Where JSON lines go (default: ``sys.stdout``).
    state : MonitorState, optional
        State to fold messages into (lets an embedding program or a test watch
        it while the loop runs); a new one by default.
    stop : threading.Event, optional
        Set it from another thread to end the loop within one refresh period.

    Returns
    -------
    MonitorState
        The final state (also when stopped by Ctrl-C).

    Raises
    ------
    ValueError
        If an endpoint is malformed.
    """
    import zmq

    checked = [parse_endpoint(e) for e in endpoints] or [DEFAULT_ENDPOINT]
    out = sys.stdout if stream is None else stream
    state = MonitorState() if state is None else state
    context, sockets = _connect(checked, keys)
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    start = time.monotonic()
    deadline = None if duration_s is None else start + duration_s
    period_s = 1.0 / refresh_hz
    live = None

    def view(now: float) -> RenderableType:
        width = live.console.width if live is not None else None
        return render(
            state, now, silent_after_s=silent_after_s, endpoints=checked, width=width
        )

    try:
        if not json_output:
            from rich.live import Live

            live = Live(console=console, auto_refresh=False, transient=False)
            live.start()
            live.update(view(start), refresh=True)
        next_draw = start
        while True:
            now = time.monotonic()
            if (deadline is not None and now >= deadline) or (
                stop is not None and stop.is_set()
            ):
                break
            wait_s = min(next_draw, deadline or next_draw) - now
            for sock, _ in poller.poll(max(0, round(wait_s * 1000))):
                # drain what is queued so a burst never lags the display, but
                # bounded, so a flood cannot starve the redraw or the deadline
                for _ in range(MAX_BATCH):
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    _handle(
                        state,
                        parts,
                        time.monotonic(),
                        sockets[sock],
                        out if json_output else None,
                    )
            now = time.monotonic()
            if now >= next_draw:
                if live is not None:
                    live.update(view(now), refresh=True)
                next_draw = now + period_s
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.update(view(time.monotonic()), refresh=True)
            live.stop()
        for sock in sockets:
            sock.close(linger=0)
        context.term()
    return state


def _handle(
    state: MonitorState,
    parts: list[bytes],
    now: float,
    origin: str,
    out: IO[str] | None,
) -> None:
    if len(parts) != 2:
        state.received += 1
        state.malformed += 1
        return
    topic, payload = parts
    state.update(topic, payload, now, origin=origin)
    if out is None:
        return
    decoded = _decode(payload)
    if decoded is None:
        return
    # every decodable message is printed, logs included: scripts filter on topic
    line: dict[str, Any] = {"topic": topic.decode("utf-8", "replace")}
    line.update((k, v) for k, v in decoded.items() if k != "topic")
    out.write(json.dumps(line) + "\n")
    out.flush()
