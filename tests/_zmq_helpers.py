"""Helpers shared by the tests that talk to a daemon over real ZeroMQ sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from stagelock.daemon import request

if TYPE_CHECKING:
    from pathlib import Path


def cli() -> list[str]:
    """``python -m stagelock`` in this interpreter."""
    return [sys.executable, "-m", "stagelock"]


def free_endpoint(ctx: zmq.Context[Any]) -> str:
    """A loopback TCP endpoint with a port free at the time of the call."""
    sock = ctx.socket(zmq.PUB)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
    finally:
        sock.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def recv(sock: zmq.Socket[Any], timeout_s: float = 10.0) -> tuple[str, dict[str, Any]]:
    """One ``[topic, json]`` message, or fail instead of hanging."""
    if not sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLIN):
        raise TimeoutError(f"no message within {timeout_s:.1f} s")
    topic, body = sock.recv_multipart()
    return topic.decode(), json.loads(body)


class DaemonProcess:
    """A ``stagelock run`` subprocess, its log file, and a SUB socket on its topics.

    ``args`` follow ``stagelock run``; the publish and control endpoints are free
    loopback ports chosen here. ``config``, when given, is written to
    ``<name>.toml`` and passed with ``--config``.
    """

    def __init__(
        self,
        tmp_path: Path,
        ctx: zmq.Context[Any],
        name: str,
        config: str | None,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ctx = ctx
        self.publish = free_endpoint(ctx)
        self.control = free_endpoint(ctx)
        command = [*cli(), "run", "--publish", self.publish, "--control", self.control]
        if config is not None:
            cfg = tmp_path / f"{name}.toml"
            cfg.write_text(config)
            command += ["--config", str(cfg)]
        self.log_path = tmp_path / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.sub: zmq.Socket[Any] = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.")
        self.sub.connect(self.publish)

    def wait_up(self, timeout_s: float = 40.0) -> None:
        """Until the first heartbeat: subscribed (no slow joiner) and running."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.log()}")
            try:
                topic, _ = recv(self.sub, 0.2)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no heartbeat:\n{self.log()}") from None
                continue
            if topic == "stagelock.status":
                return

    def ctl(self, command: str, **params: Any) -> dict[str, Any]:
        return request(self.control, command, timeout_s=5.0, context=self.ctx, **params)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
        self.sub.close(linger=0)
