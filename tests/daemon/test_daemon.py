"""End-to-end: the daemon as a subprocess on a watched folder, real ZeroMQ."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tifffile
import zmq

from helpers import DaemonProcess, cli, free_endpoint, recv, walking_drift

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def recv_topic(
    sock: zmq.Socket[Any], topic: str, timeout_s: float = 10.0, **match: Any
) -> dict[str, Any]:
    """The next message on ``topic`` whose fields equal ``match``."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {topic} message matching {match} in {timeout_s} s")
        got_topic, msg = recv(sock, remaining)
        if got_topic == topic and all(msg.get(k) == v for k, v in match.items()):
            return msg


SHAPE = (256, 256)
PIXEL_SIZE_UM = 0.5


class Daemon(DaemonProcess):
    """The daemon watching a folder, recording CSV, up and subscribed."""

    def __init__(
        self, tmp_path: Path, ctx: zmq.Context[Any], *extra: str, config: str = ""
    ) -> None:
        self.watch = tmp_path / "watch"
        self.watch.mkdir(exist_ok=True)
        self.record = tmp_path / "record.csv"
        super().__init__(
            tmp_path,
            ctx,
            "daemon",
            "[publish]\nheartbeat_s = 0.2\n[log]\nevery_n_frames = 5\n"
            "[source.folder]\npoll_interval_s = 0.02\ngive_up_after_s = 0.5\n"
            "[registration]\nmax_shift_px = 20\n" + config,
            "--watch",
            str(self.watch),
            "--record",
            str(self.record),
            "--pixel-size",
            str(PIXEL_SIZE_UM),
            *extra,
        )
        self.wait_up(timeout_s=20.0)

    def wait(self, timeout_s: float = 10.0) -> int:
        return super().wait(timeout_s)


@pytest.fixture
def daemon_factory(tmp_path: Path, ctx: zmq.Context[Any]) -> Iterator[Any]:
    made: list[Daemon] = []

    def make(*extra: str, config: str = "") -> Daemon:
        d = Daemon(tmp_path, ctx, *extra, config=config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def write_tiff(path: Path, image: np.ndarray) -> None:
    # write under another name and rename: the way careful writers publish a file
    tmp = path.with_suffix(".part")
    tifffile.imwrite(tmp, image)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_shifts_published_and_recorded(daemon_factory: Any) -> None:
    shifts, frames = walking_drift(10, seed=1)
    d = daemon_factory()
    received = []
    for i, frame in enumerate(frames):
        write_tiff(d.watch / f"img_{i:05d}.tif", frame)
        received.append(recv_topic(d.sub, "stagelock.shift", frame=i))
    for msg, (dx, dy) in zip(received, shifts, strict=True):
        assert msg["schema"] == "stagelock.shift/2"
        assert msg["status"] == "ok"
        assert abs(msg["dx_px"] - dx) < 0.05, (msg, dx)
        assert abs(msg["dy_px"] - dy) < 0.05, (msg, dy)
        assert msg["dx_um"] == pytest.approx(msg["dx_px"] * PIXEL_SIZE_UM)
        assert msg["skipped"] == 0 and msg["n_regions"] >= 1
        assert msg["latency_ms"] >= 0 and msg["source"] == str(d.watch)
    status = d.ctl("status")
    assert status["ok"] and status["frames_measured"] == 10
    assert status["reference_frame"] == 0 and status["state"] == "measuring"
    assert d.ctl("stop") == {"ok": True, "state": "stopping"}
    assert d.wait() == 0
    rows = read_csv(d.record)
    assert list(rows[0]) == [
        "frame",
        "time",
        "dx_px",
        "dy_px",
        "dx_um",
        "dy_um",
        "confidence",
        "status",
        "skipped",
        "source",
    ]
    assert [int(r["frame"]) for r in rows] == list(range(10))
    for row, msg in zip(rows, received, strict=True):
        assert float(row["dx_px"]) == pytest.approx(msg["dx_px"], abs=1e-9)
        assert float(row["dy_um"]) == pytest.approx(msg["dy_um"], abs=1e-9)


def test_control_commands(daemon_factory: Any, ctx: zmq.Context[Any]) -> None:
    shifts, frames = walking_drift(6, seed=2)
    d = daemon_factory()
    for i in range(2):
        write_tiff(d.watch / f"img_{i:05d}.tif", frames[i])
        recv_topic(d.sub, "stagelock.shift", frame=i)

    assert d.ctl("pause") == {"ok": True, "state": "paused"}
    write_tiff(d.watch / "img_00002.tif", frames[2])
    deadline = time.monotonic() + 10
    while d.ctl("status")["frames_received"] < 3:
        assert time.monotonic() < deadline, "frame 2 never arrived"
        time.sleep(0.02)
    status = d.ctl("status")
    assert status["state"] == "paused" and status["frames_measured"] == 2

    assert d.ctl("resume")["ok"]
    write_tiff(d.watch / "img_00003.tif", frames[3])
    msg = recv_topic(d.sub, "stagelock.shift", frame=3)
    assert abs(msg["dx_px"] - shifts[3, 0]) < 0.05

    # frame 4 becomes the reference: its shift is 0, frame 5 is relative to it
    assert d.ctl("rereference") == {"ok": True, "rereference": "requested"}
    write_tiff(d.watch / "img_00004.tif", frames[4])
    msg = recv_topic(d.sub, "stagelock.shift", frame=4)
    assert abs(msg["dx_px"]) < 1e-3 and abs(msg["dy_px"]) < 1e-3
    write_tiff(d.watch / "img_00005.tif", frames[5])
    msg = recv_topic(d.sub, "stagelock.shift", frame=5)
    assert abs(msg["dx_px"] - (shifts[5, 0] - shifts[4, 0])) < 0.05
    assert abs(msg["dy_px"] - (shifts[5, 1] - shifts[4, 1])) < 0.05
    assert d.ctl("status")["reference_frame"] == 4

    bad = d.ctl("pasue")
    assert bad["ok"] is False and bad["code"] == "unknown_command"
    assert bad["error"].startswith("unknown command 'pasue'")
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(d.control)
    for raw, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_request")):
        req.send(raw)
        assert req.poll(5000), "the REP socket did not answer"
        reply = json.loads(req.recv())
        assert reply["ok"] is False and reply["code"] == code
    req.close(linger=0)
    assert d.ctl("status")["ok"]  # the REP socket is not wedged

    out = subprocess.run(
        [*cli(), "ctl", "status", "--endpoint", d.control],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "frames       5 measured" in out.stdout and "reference    frame 4" in out.stdout
    )
    out = subprocess.run(
        [*cli(), "ctl", "stop", "--endpoint", d.control, "--json"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert json.loads(out.stdout) == {"ok": True, "state": "stopping"}
    assert d.wait() == 0
    log = d.log()
    assert "reference taken: frame 0" in log and "reference taken: frame 4" in log
    assert "unknown command 'pasue'" in log and "invalid JSON" in log


def test_corrupt_and_half_written_files(daemon_factory: Any) -> None:
    shifts, frames = walking_drift(4, seed=3)
    d = daemon_factory()
    write_tiff(d.watch / "img_00000.tif", frames[0])
    recv_topic(d.sub, "stagelock.shift", frame=0)
    # not a TIFF at all: skipped and counted
    (d.watch / "img_00001.tif").write_bytes(b"this is not a tiff file" * 100)
    # a TIFF written in two halves with a pause: read once complete, never half
    tifffile.imwrite(d.watch.parent / "whole.tif", frames[1])
    data = (d.watch.parent / "whole.tif").read_bytes()
    half = d.watch / "img_00002.tif"
    with half.open("wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        deadline = time.monotonic() + 0.3  # several poll intervals of the daemon
        while time.monotonic() < deadline:
            time.sleep(0.02)
        fh.write(data[len(data) // 2 :])
    msg = recv_topic(d.sub, "stagelock.shift", frame=1)
    assert abs(msg["dx_px"] - shifts[1, 0]) < 0.05
    assert abs(msg["dy_px"] - shifts[1, 1]) < 0.05
    # a truncated TIFF that never completes: given up after give_up_after_s
    (d.watch / "img_00003.tif").write_bytes(data[: len(data) // 3])
    write_tiff(d.watch / "img_00004.tif", frames[2])
    msg = recv_topic(d.sub, "stagelock.shift", frame=2)
    assert abs(msg["dx_px"] - shifts[2, 0]) < 0.05
    d.ctl("stop")
    assert d.wait() == 0
    log = d.log()
    assert "skipping unreadable file img_00001.tif (not a TIFF" in log
    assert "skipping unreadable file img_00003.tif" in log
    assert "img_00002.tif" not in log
    assert [int(r["frame"]) for r in read_csv(d.record)] == [0, 1, 2]


def test_sigterm_during_burst_loses_nothing(daemon_factory: Any) -> None:
    n = 60
    shifts, frames = walking_drift(n, seed=4)
    d = daemon_factory()
    # the reference first: its preparation (~0.5 s on a loaded machine) would
    # otherwise outlast the whole burst, which the latest-wins hand-over then
    # rightly collapses into one frame
    write_tiff(d.watch / "img_00000.tif", frames[0])
    received = [recv_topic(d.sub, "stagelock.shift")]

    def burst() -> None:  # files as fast as the disk takes them
        for i, frame in enumerate(frames[1:], start=1):
            write_tiff(d.watch / f"img_{i:05d}.tif", frame)

    writer = threading.Thread(target=burst)
    writer.start()
    try:
        try:
            received += [recv_topic(d.sub, "stagelock.shift") for _ in range(2)]
        except TimeoutError:
            raise AssertionError(f"fewer than 3 shifts:\n{d.log()}") from None
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(timeout_s=30) == 0
    finally:
        writer.join()
    while True:  # whatever was published before the exit
        try:
            topic, msg = recv(d.sub, 0.2)
        except TimeoutError:
            break
        if topic == "stagelock.shift":
            received.append(msg)
    rows = read_csv(d.record)  # every line parses: none was cut
    recorded = [int(r["frame"]) for r in rows]
    # the first frame measured is the reference (earlier ones may be skipped)
    assert len(rows) >= 3 and recorded[0] == int(rows[0]["skipped"])
    ref = recorded[0]
    assert {m["frame"] for m in received} <= set(recorded)
    for prev, row in itertools.pairwise(rows):
        # a gap in frame numbers is exactly the skipped count: nothing vanished
        assert int(row["frame"]) - int(prev["frame"]) - 1 == int(row["skipped"])
    for row in rows:
        i = int(row["frame"])
        assert row["status"] == "ok"
        assert abs(float(row["dx_px"]) - (shifts[i, 0] - shifts[ref, 0])) < 0.05
        assert abs(float(row["dy_px"]) - (shifts[i, 1] - shifts[ref, 1])) < 0.05
    assert "stopping: signal SIGTERM" in d.log()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[publish]\nendpont = 'tcp://127.0.0.1:1'\n",
            "publish.endpont: Extra inputs are not permitted",
        ),
        ("pixel_size_um = -1\n", "pixel_size_um: Input should be greater than 0"),
        ("[registration]\nreference = 'median'\n", "registration.reference: Input"),
    ],
    ids=["unknown-key", "bad-value", "bad-choice"],
)
def test_config_errors_stop_startup(tmp_path: Path, toml: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = subprocess.run(
        [*cli(), "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(cfg) in lines[0]


def test_ctl_without_daemon_says_so(ctx: zmq.Context[Any]) -> None:
    endpoint = free_endpoint()
    t0 = time.monotonic()
    out = subprocess.run(
        [*cli(), "ctl", "status", "--endpoint", endpoint, "--timeout-s", "0.3"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert f"no stagelock daemon answered at {endpoint} within 0.3 s" in out.stderr
    assert time.monotonic() - t0 < 20


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
