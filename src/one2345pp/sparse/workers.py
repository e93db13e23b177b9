"""Worker threads for the CPU loops of the pure-PyTorch backend.

torch's intra-op threads meet at a barrier at the end of every operation. The gather-GEMM loops issue two short
operations per chunk of rows, and on a busy machine (other processes, data-loader workers) every barrier waits for a
descheduled thread: measured on the 2-core development machine under load, one 3x3x3 convolution at 128^3 took
2-3 s instead of 0.03 s. Here each of ``torch.get_num_threads()`` Python threads runs single-threaded torch
operations and takes the next piece of work when it is free (torch releases the GIL inside its operations), so a
stalled thread delays only its own piece. Kernel maps (a handful of large operations) are built on one such thread.

The caller's thread count is left as it was. Workers are recreated after a fork or a change of the thread count.
Set :data:`CPU_WORKERS` to False to use torch's intra-op threads instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

CPU_WORKERS = True


class CpuWorkers:
    """A pool of ``torch.get_num_threads()`` threads, each running torch with one intra-op thread."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.size, self.pid = 0, 0
        self.local = threading.local()
        self.lock = threading.Lock()

    def _pool(self, threads: int) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None or self.size != threads or self.pid != os.getpid():
                self.pool = ThreadPoolExecutor(threads, thread_name_prefix="one2345pp-sparse")
                self.size, self.pid = threads, os.getpid()
            return self.pool

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(item) for item in items]`` on the workers, without autograd, in the order of ``items``."""
        threads = torch.get_num_threads()
        started: list[bool] = []

        def run(item: T) -> R:
            if not getattr(self.local, "single_threaded", False):
                # sets this thread's OpenMP / MKL team and the process-wide default (restored below)
                torch.set_num_threads(1)
                self.local.single_threaded = True
                started.append(True)
            with torch.no_grad():
                return fn(item)

        results = list(self._pool(threads).map(run, items))
        if started:
            torch.set_num_threads(threads)
        return results

    def call(self, fn: Callable[[], R]) -> R:
        """``fn()`` on one worker (single-threaded torch)."""
        return self.map(lambda _: fn(), [None])[0]


WORKERS = CpuWorkers()


def _enabled(device: torch.device) -> bool:
    return CPU_WORKERS and device.type == "cpu" and torch.get_num_threads() > 1


def use_workers(device: torch.device, pieces: int) -> bool:
    """Whether work cut into ``pieces`` pieces on ``device`` goes to the workers: CPU tensors and more than one torch
    thread. One piece goes too: small operations suffer the most from stalled barriers."""
    return pieces > 0 and _enabled(device)


def single_threaded(device: torch.device, fn: Callable[[], R]) -> R:
    """``fn()`` on one worker for CPU work when torch uses several threads, else directly."""
    return WORKERS.call(fn) if _enabled(device) else fn()
