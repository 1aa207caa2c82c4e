"""The promises stagelock keeps on bad input (issue 11), one test per finding.

Read this file as the list of promises:

- **no input destroyed**: no output flag can overwrite the input or another output,
  the example never overwrites a file, a record that hits a full disk keeps its
  earlier lines whole and a restart never glues a row onto a torn one;
- **no traceback for a user error**: one line on stderr naming what is wrong,
  exit 2, before any work is done;
- **no silent drop**: a frame that cannot be measured is published and alarmed,
  not only logged; a broken socket request gets an error reply and the socket
  keeps serving.

Everything is real: files in tmp dirs, ``python -m stagelock`` processes, ZeroMQ
sockets on 127.0.0.1 with random ports.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zmq

from helpers import cli, free_endpoint, recv
from stagelock.cli import main
from stagelock.daemon import request
from stagelock.sim import CameraNoise, drifting_stack, random_drift
from stagelock.views import load_record


def run_cli(
    *args: str | Path,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """``python -m stagelock ARGS`` to completion, output captured."""
    return subprocess.run(
        [*cli(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def run_main(
    capsys: pytest.CaptureFixture[str], *args: str | Path
) -> subprocess.CompletedProcess[str]:
    """The same command in this process (cheaper than a new interpreter)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def small_stack(path: Path, n: int = 8, dtype: Any = np.uint16) -> np.ndarray:
    truth = random_drift(n, creep_px_per_frame=(0.3, -0.2), walk_px=0.1, seed=3)
    stack = drifting_stack(truth, shape=(96, 96), noise=CameraNoise(peak_photons=800))
    stack = stack.astype(dtype)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    return stack


SIM_50FPS = """
[source]
kind = "simulated"
[simulation]
shape_px = [128, 128]
frame_interval_ms = 20
[log]
every_n_frames = 0
"""


# -- no input destroyed ----------------------------------------------------------------


def test_01_register_shifts_never_overwrites_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.tif"
    small_stack(victim)
    before = victim.read_bytes()
    proc = run_cli("register", victim, "--shifts", victim, "--no-progress")
    assert_user_error(proc, "--shifts", "input file")
    assert victim.read_bytes() == before
    link = tmp_path / "link.tif"
    link.symlink_to(victim)
    hard = tmp_path / "hard.tif"
    os.link(victim, hard)
    (tmp_path / "sub").mkdir()
    for shifts in (link, hard, tmp_path / "sub" / ".." / "victim.tif"):
        proc = run_main(capsys, "register", victim, "--shifts", shifts, "--no-progress")
        assert_user_error(proc, "--shifts", "input file")
        assert victim.read_bytes() == before
    # -o and --shifts naming one file: one would silently replace the other
    same = tmp_path / "same.tif"
    proc = run_main(
        capsys, "register", victim, "-o", same, "--shifts", same, "--no-progress"
    )
    assert_user_error(proc, "same file")
    assert not same.exists()
    assert victim.read_bytes() == before


def test_02_register_example_never_overwrites_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    precious = tmp_path / "precious.tif"
    precious.write_bytes(b"my only copy")
    proc = run_cli("register", precious, "--example", "--no-progress")
    assert_user_error(proc, "already exists", str(precious))
    assert precious.read_bytes() == b"my only copy"
    # the truth CSV beside it is protected too
    other = tmp_path / "other.tif"
    truth = tmp_path / "other.truth.csv"
    truth.write_text("mine")
    proc = run_main(capsys, "register", other, "--example", "--no-progress")
    assert_user_error(proc, "already exists")
    assert truth.read_text() == "mine" and not other.exists()


def test_03_environment_overrides_reach_run_and_ctl(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    publish, control = free_endpoint(), free_endpoint()
    record = tmp_path / "env.csv"
    env = {
        "STAGELOCK_PUBLISH": publish,
        "STAGELOCK_CONTROL": control,
        "STAGELOCK_RECORD": str(record),
    }
    watch = tmp_path / "watch"
    watch.mkdir()
    log = (tmp_path / "env.log").open("wb")
    proc = subprocess.Popen(
        [*cli(), "run", "--watch", str(watch)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.status")
    sub.connect(publish)
    try:
        topic, _ = recv(sub, 60.0)  # published where the environment said
        assert topic == "stagelock.status"
        # ctl reads the same variable, so it finds the daemon
        status = run_cli("ctl", "status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        reply = json.loads(status.stdout)
        assert reply["record_path"] == str(record)
        assert reply["publish_endpoint"] == publish
        assert reply["control_endpoint"] == control
        assert request(control, "stop", timeout_s=10, context=ctx)["ok"]
        assert proc.wait(20) == 0
    finally:
        sub.close(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
    assert record.read_text().startswith("frame,time,dx_px")


def _limit_file_size(n_bytes: int) -> None:
    # the child's files stop growing at n_bytes (EFBIG, like ENOSPC on a full
    # disk); Python ignores SIGXFSZ, so the write fails instead of killing it
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_04_record_on_a_full_disk_alarms_and_keeps_lines_whole(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    record = tmp_path / "full.csv"
    cfg = tmp_path / "sim.toml"
    cfg.write_text(SIM_50FPS)
    publish, control = free_endpoint(), free_endpoint()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.alarm")
    sub.connect(publish)
    proc = subprocess.Popen(
        [
            *cli(),
            "run",
            "--config",
            str(cfg),
            "--record",
            str(record),
            "--publish",
            publish,
            "--control",
            control,
            "--frames",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTEST_RUNNING": "1"},  # no pymmcore-plus log file
        preexec_fn=lambda: _limit_file_size(3000),
    )
    try:
        _, err = proc.communicate(timeout=90)
        alarms = []
        while sub.poll(0):
            alarms.append(json.loads(sub.recv_multipart()[1]))
    finally:
        sub.close(linger=0)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    failing = [line for line in err.splitlines() if "cannot write" in line]
    assert len(failing) == 1, err
    assert "record_failed" in err
    assert any(a["alarm"] == "record_failed" and a["active"] for a in alarms), alarms
    size = record.stat().st_size
    assert size == 3000  # filled to the limit: the last line is torn
    assert not record.read_bytes().endswith(b"\n")
    # a restart ends the torn line before appending: no glued 15-field row
    proc2 = run_cli(
        "run", "--config", cfg, "--record", record, "--frames", "5",
        "--publish", free_endpoint(), "--control", free_endpoint(),
    )  # fmt: skip
    assert proc2.returncode == 0, proc2.stderr
    assert "incomplete" in proc2.stderr
    lines = record.read_text().splitlines()
    n_fields = [len(line.split(",")) for line in lines]
    assert n_fields.count(10) == len(lines) - 1  # every row whole but the torn one
    rec = load_record(record)
    assert rec.unreadable_lines == 1
    assert rec.n_shifts == len(lines) - 2  # header and torn line left out
    plot = run_cli("plot", record, "-o", tmp_path / "p.png")
    assert plot.returncode == 0, plot.stderr
    assert "1 damaged line" in plot.stderr


# -- no crash: every bad request or value is an answer, not a dead thread ----------


def test_05_control_socket_survives_hostile_requests(ctx: zmq.Context[Any]) -> None:
    from stagelock.daemon import ControlServer

    server = ControlServer("tcp://127.0.0.1:0", {"status": lambda req: {"up": True}})
    server.start()
    hostile = [
        [b'{"command": "status", "n": ' + b"9" * 5000 + b"}"],  # ValueError
        [b"[" * 100_000 + b"]" * 100_000],  # RecursionError
        [b'{"command": "status"}', b"second frame"],  # multipart
        [b"\xff\xfe not utf-8"],
    ]
    try:
        for parts in hostile:
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(server.endpoint)
            req.send_multipart(parts)
            assert req.poll(10_000), f"no reply to {parts[0][:30]!r}"
            reply = json.loads(req.recv())
            req.close(linger=0)
            assert reply["ok"] is False
            assert reply["code"] in ("invalid_json", "invalid_request")
            assert len(reply["error"]) < 300
            # the socket still serves
            assert request(server.endpoint, "status", context=ctx)["up"] is True
        assert server.alive
    finally:
        server.close()
    assert not server.alive  # what the daemon's watchdog reports as control_lost


def test_06_cli_with_a_compiled_core_never_aborts_at_exit(tmp_path: Path) -> None:
    # "FATAL: exception not rethrown" (exit 134) hit 3 of 6 runs before
    procs = [
        subprocess.Popen(
            [*cli(), "demo", "--frames", "20", "--interval-s", "0.02"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (proc.returncode, err[-500:])
        assert "residual: RMS" in out


def test_07_infinite_max_shift_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = tmp_path / "s.tif"
    small_stack(stack)
    proc = run_main(capsys, "register", stack, "--max-shift-px", "inf")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--max-shift-px: must be a finite number > 0" in proc.stderr
    cfg = tmp_path / "inf.toml"
    cfg.write_text("[registration]\nmax_shift_px = inf\n")
    proc = run_cli("run", "--config", cfg)
    assert_user_error(proc, "registration.max_shift_px", "finite number")


def test_08_register_checks_its_outputs_before_working(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = tmp_path / "s.tif"
    small_stack(stack)
    proc = run_cli("register", stack, "-o", "/no/such/dir/a.tif", "--no-progress")
    assert_user_error(proc, "-o /no/such/dir/a.tif", "does not exist")
    # refused before the registration ran: no shifts CSV either
    assert not stack.with_suffix(".shifts.csv").exists()
    (tmp_path / "adir").mkdir()
    proc = run_main(capsys, "register", stack, "-o", tmp_path / "adir")
    assert_user_error(proc, "is a directory")
    proc = run_main(capsys, "register", stack, "--shifts", "/no/such/dir/s.csv")
    assert_user_error(proc, "--shifts /no/such/dir/s.csv", "does not exist")
    assert not stack.with_suffix(".shifts.csv").exists()


def test_09_binary_garbage_as_config_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    proc = run_cli("run", "--config", garbage)
    assert_user_error(proc, str(garbage), "not UTF-8")


def test_10_a_closed_pipe_ends_quietly(ctx: zmq.Context[Any]) -> None:
    # a publisher for monitor --json, a REP for ctl status, both real sockets
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    read_fd, write_fd = os.pipe()
    monitor = subprocess.Popen(
        [
            *cli(),
            "monitor",
            "--json",
            "--duration",
            "60",
            "--endpoint",
            f"tcp://127.0.0.1:{port}",
        ],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(write_fd)
    reader = os.fdopen(read_fd)
    try:
        status = {"schema": "stagelock.status/1", "source": "t", "state": "measuring"}
        while monitor.poll() is None:
            pub.send_multipart([b"stagelock.status", json.dumps(status).encode()])
            if reader.readable() and _line_ready(read_fd):
                break
            time.sleep(0.1)
        reader.readline()  # like `head -1`: one line, then the pipe is closed
        reader.close()
        for _ in range(600):
            if monitor.poll() is not None:
                break
            pub.send_multipart([b"stagelock.status", json.dumps(status).encode()])
            time.sleep(0.1)
        _, err = monitor.communicate(timeout=30)
    finally:
        pub.close(linger=0)
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait(5)
    assert monitor.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err

    from stagelock.daemon import ControlServer

    server = ControlServer("tcp://127.0.0.1:0", {"status": lambda req: {"state": "x"}})
    server.start()
    try:
        read_fd, write_fd = os.pipe()
        os.close(read_fd)  # `| head` that already left
        proc = subprocess.run(
            [*cli(), "ctl", "status", "--endpoint", server.endpoint],
            stdout=write_fd,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
        os.close(write_fd)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def _line_ready(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


# -- right results: bad pixels and odd data do not change the numbers ----------------


def _drift_stack(n: int = 10, shape: tuple[int, int] = (96, 96)) -> tuple[Any, Any]:
    truth = random_drift(n, creep_px_per_frame=(0.4, -0.3), walk_px=0.1, seed=5)
    stack = drifting_stack(truth, shape=shape, noise=CameraNoise(peak_photons=800))
    return truth, stack


def test_11_one_nan_or_inf_pixel_does_not_blank_a_float_frame(tmp_path: Path) -> None:
    from stagelock.stacks import register_file

    truth, stack = _drift_stack()
    clean = stack.astype(np.float32)
    stack = clean.copy()
    stack[:, 10, 20] = np.nan
    stack[1::2, 50, 60] = np.inf
    path, clean_path = tmp_path / "f32.tif", tmp_path / "clean.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    tifffile.imwrite(clean_path, clean, photometric="minisblack")
    csv_path = tmp_path / "f32.csv"
    shifts = register_file(path, shifts_csv=csv_path, progress=False)
    statuses = [line.rsplit(",", 1)[1] for line in csv_path.read_text().split()[1:]]
    assert statuses == ["ok"] * len(truth)
    assert np.abs(shifts - truth).max() < 0.15  # 96² px of noisy sample
    # the bad pixels change nothing but where one region is cut: the filled
    # pixel lowers its window's texture score, so a neighbouring window may be
    # chosen instead, and the numbers then agree to that one region's noise
    reference = register_file(clean_path, shifts_csv=None, progress=False)
    assert np.abs(shifts - reference).max() < 0.03


def test_11b_a_bad_pixel_is_filled_from_its_neighbours() -> None:
    from stagelock._pixels import finite_pixels

    image = np.full((8, 8), 10.0, dtype=np.float32)
    image[:, 4:] = 1000.0  # a bright half: the frame's median is 505
    image[2, 6] = np.nan
    image[5, 1] = np.inf
    image[0:3, 0:3] = np.nan  # a 3x3 hole: the corner has no finite neighbour
    out = finite_pixels(image)
    assert np.isfinite(out).all() and np.isnan(image[2, 6])  # a copy
    assert out[2, 6] == 1000.0 and out[5, 1] == 10.0
    assert out[0, 0] == np.median(image[np.isfinite(image)])
    assert out[1, 1] == out[0, 0]  # its neighbours are all bad too
    assert out[2, 2] == 10.0
    assert finite_pixels(out) is out  # nothing to fill: no copy


def test_12_aligned_int32_stays_inside_the_input_range(tmp_path: Path) -> None:
    from stagelock.stacks import register_file

    _, stack = _drift_stack(n=6)
    stack = stack.astype(np.int32) - 30000  # all values negative
    path, out = tmp_path / "i32.tif", tmp_path / "aligned.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    register_file(path, output=out, shifts_csv=tmp_path / "s.csv", progress=False)
    aligned = tifffile.imread(out)
    assert aligned.dtype == np.int32
    for frame, orig in zip(aligned, stack, strict=True):
        # no 0-filled edges, no ringing beyond the data
        assert orig.min() <= frame.min() and frame.max() <= orig.max()


def test_12_aligned_float32_edges_take_a_data_value(tmp_path: Path) -> None:
    from stagelock.stacks import register_file

    _, stack = _drift_stack(n=6)
    stack = stack.astype(np.float32) + 1000.0
    path, out = tmp_path / "f32.tif", tmp_path / "aligned.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "TYX"})
    register_file(path, output=out, shifts_csv=tmp_path / "s.csv", progress=False)
    aligned = tifffile.imread(out)
    assert aligned.min() >= stack.min() and aligned.max() <= stack.max()


class InProcessDaemon:
    """A daemon on a watched folder, in this process: real sockets, real files."""

    def __init__(self, tmp_path: Path, ctx: zmq.Context[Any], **overrides: Any) -> None:
        from stagelock.config import Config
        from stagelock.daemon import build_daemon

        self.watch = tmp_path / "watch"
        self.watch.mkdir(exist_ok=True)
        config = Config().with_overrides(
            source__kind="folder",
            source__folder__path=self.watch,
            publish__endpoint="tcp://127.0.0.1:*",
            control__endpoint="tcp://127.0.0.1:*",
            **overrides,
        )
        self.daemon = build_daemon(config)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.")
        self.sub.connect(self.daemon._publish_endpoint)
        self.code: int | None = None
        self.alarms: list[dict[str, Any]] = []
        import threading

        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while recv(self.sub, 30)[0] != "stagelock.status":  # subscribed
            assert time.monotonic() < deadline

    def _run(self) -> None:
        self.code = self.daemon.run()

    def write(self, name: str, image: np.ndarray) -> None:
        tmp = self.watch / f".{name}.part"
        tifffile.imwrite(tmp, image)
        os.replace(tmp, self.watch / name)

    def next(self, topic: str, timeout_s: float = 20.0) -> dict[str, Any]:
        """The next message on ``topic``; alarms passed on the way are kept."""
        deadline = time.monotonic() + timeout_s
        while True:
            if topic == "stagelock.alarm" and self.alarms:
                return self.alarms.pop(0)
            got, msg = recv(self.sub, max(0.1, deadline - time.monotonic()))
            if got == topic and topic != "stagelock.alarm":
                return msg
            if got == "stagelock.alarm":
                self.alarms.append(msg)

    def close(self) -> int | None:
        self.daemon.request_stop("test over")
        self.thread.join(20)
        self.sub.close(linger=0)
        return self.code


def test_15_a_frame_of_another_size_is_published_and_alarmed(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    _, big = _drift_stack(n=3, shape=(128, 128))
    d = InProcessDaemon(tmp_path, ctx)
    try:
        d.write("img_0000.tif", big[0])
        assert d.next("stagelock.shift")["status"] == "ok"
        d.write("img_0001.tif", big[1][:64, :64].copy())
        msg = d.next("stagelock.shift")
        assert msg["status"] == "wrong_size" and msg["dx_px"] is None
        alarm = d.next("stagelock.alarm")
        assert alarm["alarm"] == "frame_size_changed" and alarm["active"]
        assert "64×64" in alarm["message"] and "128×128" in alarm["message"]
        d.write("img_0002.tif", big[2])
        assert d.next("stagelock.shift")["status"] == "ok"
        cleared = d.next("stagelock.alarm")
        assert cleared["alarm"] == "frame_size_changed" and not cleared["active"]
        assert d.daemon.status().frames_failed == 1
    finally:
        d.close()


def _collect(source: Any) -> list[Any]:
    frames: list[Any] = []
    source.start(frames.append)
    return frames


def _wait_for(cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_16_an_empty_tif_does_not_hold_later_frames_back(tmp_path: Path) -> None:
    from stagelock.sources import FolderSource

    _, stack = _drift_stack(n=3)
    # give_up_after_s = 60: the old code held the later frames back that long
    source = FolderSource(tmp_path, give_up_after_s=60.0)
    frames = _collect(source)
    try:
        (tmp_path / "img_0000.tif").write_bytes(b"")
        time.sleep(0.2)
        for i in (1, 2):
            tifffile.imwrite(tmp_path / f"img_000{i}.tif", stack[i])
        _wait_for(lambda: len(frames) == 2, timeout_s=20)
        assert [f.metadata["file"][-12:] for f in frames] == [
            "img_0001.tif",
            "img_0002.tif",
        ]
        assert source.n_corrupt == 1
    finally:
        source.stop()


def _old_files(folder: Path, n: int) -> None:
    img = np.random.default_rng(0).integers(0, 4000, (32, 32), dtype=np.uint16)
    old = time.time() - 3600
    for i in range(n):
        path = folder / f"img_{i:05d}.tif"
        tifffile.imwrite(path, img)
        os.utime(path, (old, old))


def test_17_a_backlog_is_read_at_once_and_idle_costs_nothing(tmp_path: Path) -> None:
    from stagelock.sources import FolderSource

    n = 300
    _old_files(tmp_path, n)
    # one poll per file before: 300 files x 0.5 s
    source = FolderSource(tmp_path, from_start=True, poll_interval_s=0.5)
    source.rescan_s = 3600.0  # no safety sweep during the test
    frames = _collect(source)
    try:
        _wait_for(lambda: len(frames) == n, timeout_s=60)
        assert source.scans < 20
        assert [f.index for f in frames] == list(range(n))
        # idle: scans go on, but no file is looked at (was: every file, every scan)
        polled, scans = source.files_polled, source.scans
        _wait_for(lambda: source.scans >= scans + 5)
        assert source.files_polled == polled
    finally:
        source.stop()


def test_17_a_backlog_is_measured_not_skipped(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    n = 60
    (tmp_path / "watch").mkdir()
    _old_files(tmp_path / "watch", n)
    d = InProcessDaemon(tmp_path, ctx, source__folder__from_start=True)
    try:
        _wait_for(lambda: d.daemon.status().frames_received == n, timeout_s=90)
        _wait_for(lambda: d.daemon.status().frames_measured == n, timeout_s=30)
        assert d.daemon.status().frames_skipped == 0
    finally:
        d.close()


# -- clear errors: at start, one line naming the key ---------------------------------


def test_19_roi_outside_the_frames_stops_the_run_with_exit_2(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    _, stack = _drift_stack(n=1)
    d = InProcessDaemon(
        tmp_path, ctx, registration__roi=(5000, 5000, 100, 100), frames=3
    )
    try:
        d.write("img_0000.tif", stack[0])
        alarm = d.next("stagelock.alarm")
        assert alarm["alarm"] == "config_error"
        assert "registration.roi [5000, 5000, 100, 100]" in alarm["message"]
        assert "96×96" in alarm["message"]
        d.thread.join(20)
    finally:
        code = d.close()
    assert code == 2


def test_20_empty_truncated_stacks_and_negative_roi_say_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(empty, np.zeros((0, 32, 32), np.uint16))
    proc = run_main(capsys, "register", empty, "--no-progress")
    assert_user_error(proc, "holds no frames")
    stack = tmp_path / "cut.tif"
    small_stack(stack)
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) // 2])
    proc = run_cli("register", stack, "--no-progress")
    assert_user_error(proc, "truncated", "of 8 is missing")
    # the frames before the cut were measured and stay in the shifts CSV
    assert len(stack.with_suffix(".shifts.csv").read_text().splitlines()) >= 2
    proc = run_main(capsys, "register", stack, "--roi", "-10,-10,50,50")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--roi X,Y must be >= 0" in proc.stderr


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ('[stage]\nfeedback = "yes"\n', ("stage.feedback", "valid boolean")),
        ("[stage]\ngain = nan\n", ("stage.gain", "finite number")),
        ("[registration]\nn_regions = 4.0\n", ("registration.n_regions", "integer")),
        (
            '[publish]\nendpoint = "tcp://127.0.0.1:6000"\n'
            '[control]\nendpoint = "tcp://127.0.0.1:6000"\n',
            ("publish.endpoint", "control.endpoint", "different ports"),
        ),
        (
            '[publish]\nendpoint = "tcp://*:6001"\n'
            '[control]\nendpoint = "tcp://127.0.0.1:6001"\n',
            ("different ports",),
        ),
    ],
)
def test_21_config_values_are_strict_and_say_why(
    tmp_path: Path, toml: str, needles: tuple[str, ...]
) -> None:
    from stagelock.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for needle in needles:
        assert needle in str(info.value)
    assert "another stagelock" not in str(info.value)


def test_18_an_unreadable_watch_folder_fails_at_start(tmp_path: Path) -> None:
    import tempfile

    from stagelock.config import Config
    from stagelock.daemon import DaemonError
    from stagelock.daemon._build import build_source

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    base.chmod(0o755)
    watch = base / "watch"
    watch.mkdir(mode=0o000)
    config = Config().with_overrides(source__kind="folder", source__folder__path=watch)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: an ordinary user (root reads everything)
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            build_source(config)
            os.write(write_fd, b"started")
        except DaemonError as exc:
            os.write(write_fd, str(exc).encode())
            code = 0
        except BaseException as exc:
            os.write(write_fd, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        message = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    watch.chmod(0o755)
    watch.rmdir()
    base.rmdir()
    assert os.waitstatus_to_exitcode(status) == 0, message
    assert message.startswith("source.folder.path: watch folder")
    assert "cannot be read: Permission denied" in message


def _without_demo_extra(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``mm_test_adapters`` cannot be imported."""
    shadow = tmp_path / "shadow"
    (shadow / "mm_test_adapters").mkdir(parents=True)
    # a namespace-less package that refuses to import: as if not installed
    (shadow / "mm_test_adapters" / "__init__.py").write_text(
        "raise ImportError('not installed')\n"
    )
    return {"PYTHONPATH": str(shadow), "PYTEST_RUNNING": "1"}


def test_22_no_frightening_adapter_error_and_the_demo_extra_named(
    tmp_path: Path,
) -> None:
    env = _without_demo_extra(tmp_path)
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from stagelock.sim import create_simulated_core\n"
        "from stagelock.sources import release_core\n"
        "core = create_simulated_core()\n"
        "print(core.snap().shape)\n"
        "release_core(core)\n"
        # as documented: drop the last reference too, or exit may abort (134)
        "del core\n"
        "import gc; gc.collect()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    assert "(512, 512)" in proc.stdout
    assert "Could not find a compatible" not in proc.stderr, proc.stderr
    assert "mmcore install" not in proc.stderr
    cfg = tmp_path / "mm.toml"
    cfg.write_text('[source]\nkind = "micromanager"\n')
    # free ports: another stagelock on this machine must not decide the error
    run = run_cli(
        "run", "--config", cfg, "--duration", "1",
        "--publish", free_endpoint(), "--control", free_endpoint(),
        env=env,
    )  # fmt: skip
    assert_user_error(run, 'pip install "stagelock[demo]"')


REPO = Path(__file__).resolve().parents[1]


def test_13_detach_counts_every_frame_received() -> None:
    import useq

    from stagelock import attach
    from stagelock.sim import create_simulated_core
    from stagelock.sources import release_core

    core = create_simulated_core({"shape_px": (128, 128), "exposure_ms": 5.0})
    try:
        core.setAutoShutter(False)
        handle = attach(core)
        core.mda.run(useq.MDASequence(time_plan={"interval": 0.2, "loops": 10}))
        handle.detach()
        # the frame still in the slot at detach is measured, not dropped uncounted
        assert handle.received == 10
        assert handle.received == handle.measured + handle.skipped
        assert len(handle.estimates) == handle.measured
    finally:
        release_core(core)


def test_14_calibrate_with_the_micromanager_config_succeeds(tmp_path: Path) -> None:
    out = tmp_path / "calibration.toml"
    proc = run_cli(
        "calibrate",
        "--config",
        REPO / "config" / "micromanager.toml",
        "-o",
        out,
        timeout_s=240,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    # DemoCamera in "Fluorescent Beads" mode: 1 px per µm of stage travel
    pixel = float(text.split("pixel_size_um = ")[1].split()[0])
    assert abs(pixel - 1.0) < 0.05, text


def test_24_examples_and_units_ship_in_the_wheel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("stagelock-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in [*REPO.glob("config/*.toml"), *REPO.glob("systemd/*.service")]:
        assert f"stagelock/data/{shipped.parent.name}/{shipped.name}" in names
    # init-config writes an example that validates, and never overwrites
    from stagelock.config import load_config

    target = tmp_path / "mine.toml"
    got = run_main(capsys, "init-config", target, "--example", "folder")
    assert got.returncode == 0, got.stderr
    assert target.read_text() == (REPO / "config" / "folder.toml").read_text()
    assert load_config(target).source.kind == "folder"
    target.write_text("# edited\n")
    assert_user_error(run_main(capsys, "init-config", target), "already exists")
    assert target.read_text() == "# edited\n"
    # install-unit --print: the unit, ExecStart pointing at this installation
    unit = run_main(capsys, "install-unit", "--print")
    assert unit.returncode == 0 and "[Service]" in unit.stdout
    assert f"ExecStart={Path(sys.executable).parent / 'stagelock'} run" in unit.stdout
