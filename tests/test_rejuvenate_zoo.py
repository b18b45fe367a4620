"""Slow sweep: function preservation of every torchvision classification model, each scheme × rescale in turn.

``EXPECTED_FAILURES`` is applied as a strict xfail mark (with the exception it expects): a
listed model that starts to pass, or fails in another way, fails loudly.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from support import HEAVY, SCHEMES, assert_preserved, kill_channels, zoo_input_size

import nrfx

MODELS = torchvision.models.list_models(module=torchvision.models)
# name -> (exception the check raises, why); applied as a strict xfail mark (target: empty). A HEAVY
# model runs in a child process: its failure reaches the test as an AssertionError.
EXPECTED_FAILURES: dict[str, tuple[type[BaseException], str]] = {}
# over ~100M parameters or slow at their smallest input: one variant (ca + rescale, the one that
# rewrites most; cr + rescale for the 224² transformers) instead of all six, in a fresh process
def check_model(name: str) -> None:
    """Kill 30 % of every free space, rejuvenate, compare outputs (float64, rtol 1e-7)."""
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    size = zoo_input_size(name)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    kill_channels(model, analysis, 0.3, 0)
    if name in HEAVY:
        schemes = [("cr", True)] if size > 64 else [("ca", True)]
    else:  # one variant per model, in turn: every scheme × rescale runs over the sweep (all six: test_rejuvenate)
        schemes = [SCHEMES[MODELS.index(name) % len(SCHEMES)]]
    assert_preserved(model, x, analysis, schemes, exact_snapshot=name not in HEAVY)


def zoo_params(expected: dict[str, tuple[type[BaseException], str]] | None = None) -> list:
    """One pytest param per model; a model in ``expected`` (default EXPECTED_FAILURES) gets a strict xfail mark."""
    expected = EXPECTED_FAILURES if expected is None else expected
    params = []
    for name in MODELS:
        marks = []
        if name in expected:
            error, why = expected[name]
            marks = [pytest.mark.xfail(raises=error, reason=why, strict=True)]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_expected_failures_are_strict_xfail_marks():
    """A listed model is marked before it runs (strict, with its exception), not xfailed from inside the test."""
    name = MODELS[0]
    params = {p.id: p for p in zoo_params({name: (RuntimeError, "why")})}
    assert params.keys() == set(MODELS)
    (mark,) = params[name].marks
    assert mark.name == "xfail"
    assert mark.kwargs == {"raises": RuntimeError, "reason": "why", "strict": True}
    assert all(not p.marks for n, p in params.items() if n != name)


@pytest.mark.slow
@pytest.mark.xdist_group("memory-heavy")  # several GB per model: never two of these at once
@pytest.mark.parametrize("name", zoo_params())
def test_zoo_function_preserved(name):
    if name not in HEAVY:
        check_model(name)
        return
    # up to ~16 GB at peak: a fresh process, so that the memory goes back to the system afterwards
    child = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=1200)
    assert child.returncode == 0, f"{name} (exit {child.returncode}):\n{child.stdout[-4000:]}\n{child.stderr[-4000:]}"


if __name__ == "__main__":
    check_model(sys.argv[1])
