"""A LocalCluster of two single-threaded worker processes, shared by the batch tests."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

distributed = pytest.importorskip("distributed")

from stagelock.batch import LOOPBACK_HTTP  # noqa: E402


@pytest.fixture(scope="session")
def client() -> Iterator[Any]:
    """Two worker processes on 127.0.0.1, one thread each, no dashboard."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs=LOOPBACK_HTTP,
        silence_logs=logging.ERROR,
    )
    with distributed.Client(cluster) as c:
        # a loaded machine starts worker processes slowly: wait generously
        c.wait_for_workers(2, timeout=300)
        yield c
    cluster.close()
