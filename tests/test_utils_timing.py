"""The one timing helper: the block's seconds under its key, in the order the blocks finish, nothing on failure."""

from __future__ import annotations

import time

import pytest

from one2345pp.utils.timing import timed


def test_timed_records_each_block_in_finishing_order():
    timings: dict[str, float] = {}
    with timed(timings, "total"):
        with timed(timings, "a"):
            time.sleep(0.01)
        with timed(timings, "b"):
            pass
    assert list(timings) == ["a", "b", "total"]
    assert timings["a"] >= 0.01 and timings["total"] >= timings["a"] + timings["b"]


def test_a_failed_block_records_nothing():
    timings: dict[str, float] = {}
    with pytest.raises(RuntimeError), timed(timings, "a"):
        raise RuntimeError("boom")
    assert timings == {}
