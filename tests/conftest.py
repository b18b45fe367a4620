"""Shared test setup: every test hands the memory it freed back to the system; ``one_thread`` for training tests;
``memory_heavy`` runs a test alone among the xdist workers; under ``-n N --dist loadgroup`` the costliest tests go
first and the tests that share an expensive setup go to one worker (see ``pytest_xdist_make_scheduler``)."""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import fcntl
import gc
import os
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from support import BIGGEST

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
    Under ``--dist loadgroup`` the scheduler below already runs these tests in turn on one worker; the lock keeps
    any other ``--dist`` mode safe.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    with (Path(tempfile.gettempdir()) / f"nrfx-memory-heavy-{run}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- scheduling under pytest-xdist ---------------------------------------------------------------------------------
# ``xdist_group`` marks do not group under pytest 9.2 (pytest-xdist #1386: the nodeid suffix they rely on is ignored),
# so the groups below are made by a scheduler of our own, from the nodeids the controller sees.
MEMORY_HEAVY = {f"tests/test_torchvision_zoo.py::test_torchvision_model[{name}]" for name in BIGGEST}


def cost_rank(item: pytest.Item) -> int:
    """Order of hand-out: the memory-heavy models (one unit, ~4–5 min), then slow tests, then the rest."""
    if item.nodeid in MEMORY_HEAVY:
        return 0
    return 1 if item.get_closest_marker("slow") else 2


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread in each xdist worker and in the processes it starts: N workers on N cores, never more
    threads than cores (oversubscribed OpenMP threads spin, and a model that takes 27 s alone took 160 s in CI)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, costliest first (a stable sort: every worker computes the same order, as xdist requires),
    so that the run ends on short tests instead of one worker finishing a long one alone."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=cost_rank)


@cache
def shares_module_fixture(rootdir: str, path: str) -> bool:
    """Whether a test module defines a fixture wider than a test (``scope=`` module, package or session), which
    each worker that runs one of its tests builds once more."""
    file = Path(rootdir) / path
    if file.suffix != ".py" or not file.exists():
        return False
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "fixture"
               and any(k.arg == "scope" and getattr(k.value, "value", "function") != "function" for k in node.keywords)
               for node in ast.walk(ast.parse(file.read_text())))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: nothing to do without it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup``, grouped by rule: the four biggest torchvision models in one unit (never two at once: one
    worker runs them in turn while the other runs everything else), and each module with a module-scoped fixture
    in one unit (its fixture built once, e.g. the 2-minute ``benchmarks.run --quick`` of test_benchmarks)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class CostAwareGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if nodeid in MEMORY_HEAVY:
                return "memory_heavy"
            if shares_module_fixture(str(config.rootpath), path):
                return path
            return super()._split_scope(nodeid)

    config.option.loadscopereorder = False  # keep the workers' costliest-first order, not the largest group first
    return CostAwareGroups(config, log)
