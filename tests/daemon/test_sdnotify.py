from __future__ import annotations

import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING

import pytest

from stagelock.daemon import SystemdNotifier

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5.0)
    yield sock
    sock.close()


def test_messages_reach_a_real_datagram_socket(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    notifier = SystemdNotifier(env)
    assert notifier.enabled and notifier.watchdog_interval_s == pytest.approx(2.0)
    assert notifier.ready("receiving frames")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=receiving frames"
    assert notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("12 frames\nmeasured")
    assert notify_socket.recv(4096) == b"STATUS=12 frames measured"
    assert notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_namespace_address() -> None:
    name = f"stagelock-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5.0)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert notifier.ready() is False and notifier.stopping() is False


def test_watchdog_meant_for_another_pid_is_ignored(tmp_path: Path) -> None:
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(env).watchdog_interval_s is None


def test_vanished_socket_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert "sd_notify" in caplog.text
    notifier.close()


def test_unread_notify_socket_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
    results: list[bool] = []

    def flood() -> None:  # nobody reads: the queue fills after a few hundred
        results.extend(notifier.status(f"frame {i}") for i in range(2000))

    sender = threading.Thread(target=flood, daemon=True)
    try:
        sender.start()
        # a blocking send would hang here for good; a dropped one returns at once
        sender.join(timeout=60.0)
        assert not sender.is_alive(), "a send to a full notify socket blocked"
        assert results[0] is True and results[-1] is False
        assert 0 < results.count(True) < 2000
    finally:
        notifier.close()
        server.close()
