"""systemd: STOPPING=1 is the daemon's last notification (no STATUS= after it)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from stagelock.config import validate_config
from stagelock.daemon import Daemon, SystemdNotifier
from stagelock.sources import Frame

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


class Quiet:
    """A source that never delivers: the daemon idles and heartbeats."""

    name = "quiet"
    frames_at_start = False
    core = None

    def start(self, on_frame: Callable[[Frame], None]) -> None:
        pass

    def stop(self) -> None:
        pass


def test_nothing_after_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
        config = validate_config({"duration_s": 1.5, "publish": {"heartbeat_s": 0.2}})
        Daemon(config, Quiet(), notifier=notifier, control=False).run()
        got = []
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
    assert any(m.startswith("READY=1") for m in got)
    assert sum(m.startswith("STATUS=") for m in got) >= 3  # heartbeats ran
    assert got[-1] == "STOPPING=1"
    assert got.count("STOPPING=1") == 1
    # the worker's last heartbeat happens after STOPPING=1: it must not notify
    assert notifier.status("late") is False
