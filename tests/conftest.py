"""Shared test setup: every test hands the memory it freed back to the system; ``one_thread`` for training tests."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import pytest
import torch

_LIBC = ctypes.util.find_library("c")
_MALLOC_TRIM = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None


@pytest.fixture(autouse=True)
def _release_memory(request):
    """After each test, glibc's malloc_trim(0) (after a collection for the "memory-heavy" group).

    Tests build models of up to several GB one after another in the same xdist worker; without
    the trim glibc keeps the freed heap, a worker's RSS climbs to ~10 GB and two workers plus a
    heavy check in a child process exceed a 24 GB machine (measured: 5.7 GB -> 0.8 GB after one
    trim following four big torchvision models).
    """
    yield
    marker = request.node.get_closest_marker("xdist_group")
    if marker is not None and "memory-heavy" in (*marker.args, *marker.kwargs.values()):
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
