"""Shared test setup: every test hands the memory it freed back to the system; ``one_thread`` for training tests;
``memory_heavy`` runs a test alone among the xdist workers."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import os
import tempfile
from pathlib import Path

import pytest
import torch

_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


@pytest.fixture(autouse=True)
def _release_memory(request):
    """After each test, glibc's malloc_trim(0) (after a collection for a ``memory_heavy`` test).

    Tests build models of up to several GB one after another in the same xdist worker; without
    the trim glibc keeps the freed heap, a worker's RSS climbs to ~10 GB and two workers plus a
    heavy check in a child process exceed a 24 GB machine (measured: 5.7 GB -> 0.8 GB after one
    trim following four big torchvision models).
    """
    yield
    if "memory_heavy" in request.fixturenames:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores oversubscription makes small CNNs 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def memory_heavy():
    """Hold the run's one memory lock: no two such tests (models of 5 GB and more in float64) run at once.

    An exclusive ``flock`` on a file of this run, shared by the xdist workers; the other worker waits for it.
    (``xdist_group`` with ``--dist loadgroup`` does not group under pytest 9.2: pytest-xdist issue #1386.)
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    with (Path(tempfile.gettempdir()) / f"nrfx-memory-heavy-{run}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

