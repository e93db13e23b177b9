"""``one_thread``: import it into a test module (``from helpers.threads import one_thread``) to run that module's
tests on one intra-op thread: their models are tiny, and on a shared 2-core machine a second thread mostly waits."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
