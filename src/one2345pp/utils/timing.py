"""One way to time the parts of a run: ``with timed(timings, "fine"): ...`` records the block's wall-clock seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager


@contextmanager
def timed(timings: MutableMapping[str, float], key: str) -> Iterator[None]:
    """Set ``timings[key]`` to the seconds (``time.perf_counter``) the block took; a block that raises records
    nothing (its time measures no finished work)."""
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start
