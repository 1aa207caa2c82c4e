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
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zmq

try:  # tests/ is not a package; both import styles keep working
    from ._zmq_helpers import cli, free_endpoint, recv
except ImportError:
    from _zmq_helpers import cli, free_endpoint, recv

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
    publish, control = free_endpoint(ctx), free_endpoint(ctx)
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
    publish, control = free_endpoint(ctx), free_endpoint(ctx)
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
        "--publish", free_endpoint(ctx), "--control", free_endpoint(ctx),
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
