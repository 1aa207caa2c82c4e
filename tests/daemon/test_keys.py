"""CURVE keys: exposed sockets need them; with them, keyless clients get nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zmq

from helpers import DaemonProcess, cli, free_endpoint, recv
from stagelock.config import Config
from stagelock.daemon import NoAnswer, request
from stagelock.security import (
    SecurityError,
    check_exposure,
    generate_keys,
    is_loopback,
    load_client_keys,
    load_server_keys,
)
from stagelock.sim import drifting_stack

if TYPE_CHECKING:
    from stagelock.security import ClientKeys


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5556", True),
        ("tcp://127.0.0.2:5556", True),
        ("tcp://localhost:5556", True),
        ("tcp://[::1]:5556", True),
        ("tcp://lo:5556", True),
        ("ipc:///run/stagelock/pub", True),
        ("tcp://0.0.0.0:5556", False),
        ("tcp://*:5556", False),
        ("tcp://192.168.1.20:5556", False),
        ("tcp://eth0:5556", False),
        ("tcp://[::]:5556", False),
    ],
)
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_exposure_rule() -> None:
    exposed = Config().with_overrides(publish__endpoint="tcp://0.0.0.0:5556")
    with pytest.raises(SecurityError, match=r"--keys.*--insecure"):
        check_exposure(exposed)
    check_exposure(exposed.with_overrides(security__insecure=True))  # warns only
    check_exposure(exposed.with_overrides(security__keys_dir="/k"))
    check_exposure(Config())


def test_generate_keys_layout_and_modes(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    done = subprocess.run(
        [*cli(), "keys", "generate", str(keys)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    server = load_server_keys(keys)
    client = load_client_keys(keys)
    assert client.server_public == server.public
    assert len(server.public) == 40 and len(client.secret) == 40  # Z85 keys
    # a second client: the server pair is kept, both clients are authorised
    more = generate_keys(keys, client="laptop")
    assert more.server_secret is None
    assert sorted(p.name for p in server.authorized_dir.glob("*.key")) == [
        "client.key",
        "laptop.key",
    ]
    with pytest.raises(SecurityError, match="exist already"):
        generate_keys(keys, client="laptop")


def test_exposed_control_without_keys_is_refused(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    watch.mkdir()
    # refused before anything binds: the wildcard address is never opened
    done = subprocess.run(
        [*cli(), "run", "--watch", str(watch), "--control", "tcp://0.0.0.0:5999"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--keys" in lines[0] and "control.endpoint" in lines[0]


def keyed_sub(ctx: zmq.Context[Any], endpoint: str, keys: ClientKeys) -> Any:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"stagelock.")
    keys.apply(sock)
    sock.connect(endpoint)
    return sock


def test_with_keys_only_authorised_clients_get_anything(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    generate_keys(keys)
    generate_keys(stranger)  # valid CURVE keys, but not authorised by the daemon
    client = load_client_keys(keys)
    watch = tmp_path / "watch"
    watch.mkdir()
    daemon = DaemonProcess(
        tmp_path, ctx, "keyed", None, "--watch", str(watch), "--keys", str(keys)
    )
    try:
        # daemon.sub is a plain SUB: replace it as the one that proves it is up
        plain_sub = daemon.sub
        daemon.sub = keyed_sub(ctx, daemon.publish, client)
        daemon.wait_up()
        strange_sub = keyed_sub(ctx, daemon.publish, load_client_keys(stranger))

        # a frame, so there is a shift to (not) see as well as heartbeats
        image = drifting_stack(np.zeros((1, 2)), shape=(128, 128))[0]
        tifffile.imwrite(tmp_path / "f.partial", image)
        os.replace(tmp_path / "f.partial", watch / "frame_0000.tif")
        topics = set()
        deadline = time.monotonic() + 30
        while "stagelock.shift" not in topics and time.monotonic() < deadline:
            topics.add(recv(daemon.sub, 30)[0])
        assert "stagelock.shift" in topics
        for sock in (plain_sub, strange_sub):
            with pytest.raises(TimeoutError):
                recv(sock, 1.0)
        for who in (None, load_client_keys(stranger)):
            with pytest.raises(NoAnswer):
                request(daemon.control, "status", timeout_s=1.5, keys=who)

        env = {**os.environ, "STAGELOCK_KEYS": ""}
        status = subprocess.run(
            [
                *cli(),
                "ctl",
                "status",
                "--json",
                "--keys",
                str(keys),
                "--endpoint",
                daemon.control,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert status.returncode == 0, status.stderr
        reply = json.loads(status.stdout)
        assert reply["ok"] and reply["frames_measured"] == 1

        monitor = subprocess.run(
            [
                *cli(),
                "monitor",
                "--json",
                "--keys",
                str(keys),
                "--endpoint",
                daemon.publish,
                "--duration",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert monitor.returncode == 0, monitor.stderr
        seen = [json.loads(line) for line in monitor.stdout.splitlines()]
        assert any(m["topic"] == "stagelock.status" for m in seen)
        assert all(m["source"] == str(watch) for m in seen if "source" in m)

        plain = subprocess.run(
            [
                *cli(),
                "ctl",
                "status",
                "--endpoint",
                daemon.control,
                "--timeout-s",
                "1.5",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert plain.returncode == 1 and "no stagelock daemon" in plain.stderr

        assert request(daemon.control, "stop", timeout_s=5, keys=client)["ok"]
        assert daemon.wait() == 0
        plain_sub.close(linger=0)
        strange_sub.close(linger=0)
    finally:
        daemon.close()


def test_keys_dir_without_server_secret_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys)
    (keys / "server.key_secret").unlink()
    watch = tmp_path / "watch"
    watch.mkdir()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        pub = free_endpoint()
    finally:
        ctx.term()
    done = subprocess.run(
        [
            *cli(),
            "run",
            "--watch",
            str(watch),
            "--keys",
            str(keys),
            "--publish",
            pub,
            "--control",
            "tcp://127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "server.key_secret" in done.stderr and "keys generate" in done.stderr
