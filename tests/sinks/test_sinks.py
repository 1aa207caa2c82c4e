from __future__ import annotations

import csv
import json
import math
import os
from typing import TYPE_CHECKING, Any

import pytest
import zmq

from stagelock.sinks import SHIFT_COLUMNS, Recorder, ShiftSink, ZmqPublisher

if TYPE_CHECKING:
    from pathlib import Path

MESSAGE = {
    "schema": "stagelock.shift/2",
    "frame": 3,
    "time": 1700000000.25,
    "dx_px": 1.5,
    "dy_px": math.nan,
    "dx_um": 0.75,
    "dy_um": None,
    "confidence": 0.9,
    "status": "low_confidence",
    "skipped": 2,
    "source": "cam",
    "latency_ms": 4.0,
    "n_regions": 7,
}


def shift(frame: int) -> dict[str, Any]:
    return {**MESSAGE, "frame": frame}


def test_publisher_sends_topic_and_nan_free_json(ctx: zmq.Context[Any]) -> None:
    pub = ZmqPublisher("tcp://127.0.0.1:*", hwm=10, context=ctx)
    assert isinstance(pub, ShiftSink) and pub.endpoint.startswith("tcp://127.0.0.1:")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"stagelock.shift")
    sub.connect(pub.endpoint)
    # slow joiner: publish until the subscription has propagated
    for _ in range(200):
        pub.publish("stagelock.shift", MESSAGE)
        pub.publish("stagelock.other", {"x": 1})  # filtered out by the prefix
        if sub.poll(20, zmq.POLLIN):
            break
    topic, body = sub.recv_multipart()
    assert topic == b"stagelock.shift"
    assert b"NaN" not in body
    assert json.loads(body) == {**MESSAGE, "dy_px": None}
    pub.close()
    pub.close()  # idempotent
    pub.publish("stagelock.shift", MESSAGE)  # after close: dropped, no error
    sub.close(linger=0)


def test_publisher_bind_error_is_raised(ctx: zmq.Context[Any]) -> None:
    first = ZmqPublisher("tcp://127.0.0.1:*", context=ctx)
    with pytest.raises(zmq.ZMQError):
        ZmqPublisher(first.endpoint, context=ctx)
    first.close()


def test_csv_recorder_appends_and_writes_the_header_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rec.csv"
    rec = Recorder(path)
    rec.publish("stagelock.shift", MESSAGE)
    rec.publish("stagelock.status", {"state": "x"})  # not recorded
    rec.close()
    rec = Recorder(path)  # a restart
    rec.publish("stagelock.shift", {**MESSAGE, "frame": 4})
    rec.close()
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == SHIFT_COLUMNS
    assert [r[0] for r in rows[1:]] == ["3", "4"]
    assert rows[1][3] == "" and rows[1][2] == "1.5" and rows[1][8] == "2"


def test_csv_recorder_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="already exists with columns a,b"):
        Recorder(path)
    assert path.read_text() == "a,b\n1,2\n"  # untouched


def test_jsonl_recorder_takes_extra_topics(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    rec = Recorder(path, topics=("stagelock.shift", "stagelock.correction"), fsync=True)
    rec.publish("stagelock.shift", MESSAGE)
    rec.publish("stagelock.correction", {"dx_um": 0.1})
    rec.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["topic"] == "stagelock.shift" and lines[0]["dy_px"] is None
    assert lines[1] == {"topic": "stagelock.correction", "dx_um": 0.1}


def test_recorder_rejects_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must end in \.csv or \.jsonl"):
        Recorder(tmp_path / "rec.txt")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_recorder_pauses_on_a_full_disk_and_records_again_once_it_has_room(
    tmp_path: Path,
) -> None:
    # /dev/full fails every write with ENOSPC, like a full disk; the record
    # path is a link to it until "the disk is freed" (the link moves)
    record = tmp_path / "r.jsonl"
    real = tmp_path / "real.jsonl"
    record.symlink_to("/dev/full")
    rec = Recorder(record, retry_s=0.0)
    with pytest.raises(OSError, match="No space left"):
        rec.publish("stagelock.shift", shift(0))
    rec.publish("stagelock.shift", shift(1))  # still full: dropped, not raised
    assert rec.error is not None and rec.lines_dropped == 2
    record.unlink()
    record.symlink_to(real)
    rec.publish("stagelock.shift", shift(2))
    rec.publish("stagelock.shift", shift(3))
    rec.close()
    assert rec.error is None and rec.lines_written == 2
    frames = [json.loads(line)["frame"] for line in real.read_text().splitlines()]
    assert frames == [2, 3]
