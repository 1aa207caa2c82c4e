"""Helpers shared by the tests that talk to a daemon over real ZeroMQ sockets."""

from __future__ import annotations

import json
import sys
from typing import Any

import zmq


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
