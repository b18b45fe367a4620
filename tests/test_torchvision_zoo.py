"""Slow sweep: every torchvision classifier built for real once, analysed once, and checked from that analysis.

Per model (``weights=None``, float64, eval, batch 2 at the zoo's small input size):

* costs: ``params`` equals ``sum(p.numel())``, no op is left to the unknown-op fallback, and a freshly
  initialised model is fully alive (U(θ) = c(A));
* coverage: the model's row in docs/coverage.md is what this analysis (and ``add_gates``) gives now;
* dead channels per space (30 % of every free space): the rejuvenated model keeps the function, one
  scheme × rescale variant per model in turn, so every variant runs over the sweep (all six: test_rejuvenate);
* dead channels drawn per norm (30 % of each norm, independently): the same, with another variant, on models
  where some free space carries two norms or more.

MACs at the crop size of the DEFAULT weights, exact to torchvision's own figures, are checked for all 80 by
the fast meta sweep (tests/test_zoo.py): they depend on the graph and the input size, never on weight values.
A model in ``HEAVY`` (over ~100M parameters or slow at its smallest input) runs with one variant per space and no
per-norm variant, then a collection: the autouse trim of tests/conftest.py hands the freed heap back to the system
(measured: 4.7 GB at convnext_large's peak, 0.7 GB after).  The four over 300M parameters (``BIGGEST``: 5 GB and
more in float64, twice at the peak) each run in a fresh process, so that all their memory goes back to the system
afterwards; they form one unit of work for the xdist scheduler (tests/conftest.py), which one worker runs in turn,
first, while the other runs the rest, and they hold the ``memory_heavy`` lock, so that no two of them run at once
under any other ``--dist`` mode either.
``EXPECTED_FAILURES`` is applied as a strict xfail mark: a listed model that starts to pass fails loudly.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from benchmarks.coverage_table import DOC, HEADER, coverage_row, parse_table
from support import (
    BIGGEST,
    HEAVY,
    SCHEMES,
    assert_preserved,
    kill_channels,
    kill_per_norm,
    norms_per_space,
    zoo_input_size,
)

import nrfx
from nrfx import UnknownOpWarning

ROOT = Path(__file__).resolve().parent.parent  # holds the benchmarks package, for a BIGGEST model's child process
MODELS = torchvision.models.list_models(module=torchvision.models)
# name -> (exception the check raises, why); applied as a strict xfail mark (target: empty). A BIGGEST
# model runs in a child process: its failure reaches the test as an AssertionError.
EXPECTED_FAILURES: dict[str, tuple[type[BaseException], str]] = {}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with fresh weights in float64 eval mode, and a batch-2 input of its small size."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    size = zoo_input_size(name)
    return model, torch.randn(2, 3, size, size, dtype=torch.float64)


def analyse(model: torch.nn.Module, x: torch.Tensor):
    """The one analysis of the model, and the UnknownOpWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = nrfx.analyze(model, x)
    return analysis, [w for w in caught if issubclass(w.category, UnknownOpWarning)]


def assert_costs(model: torch.nn.Module, analysis, unknown: list) -> None:
    """Params exact, every op known, and a freshly initialised model fully alive."""
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert not analysis.unknown_ops and not unknown, sorted(analysis.unknown_ops)
    utilization = analysis.utilization()
    if all(bool(m.all()) for m in nrfx.norm_masks(model).values()):
        assert (utilization.live_params, utilization.live_macs) == (analysis.params, analysis.macs)
    else:  # a norm initialised with zero scales (none in torchvision today)
        assert utilization.live_params <= analysis.params


def assert_coverage_row(name: str, model: torch.nn.Module, x: torch.Tensor, analysis) -> None:
    """docs/coverage.md's row equals this analysis' coverage, before and after add_gates."""
    printed = parse_table(DOC.read_text())[("torchvision", name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = coverage_row("torchvision", name, model, x, analysis)
    assert dict(zip(HEADER, fresh.cells(), strict=True)) == printed, \
        "docs/coverage.md is stale: run python -m benchmarks.coverage_table --write"


def meta_parameters_of(model: torch.nn.Module) -> None:
    """Every parameter moved to the meta device in place (buffers stay): coverage depends on the graph only."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = torch.nn.Parameter(param.detach().to("meta"), param.requires_grad)


def variants(name: str) -> tuple[tuple[str, bool], tuple[str, bool]]:
    """The scheme × rescale variants this model checks per space and per norm (every variant over the sweep)."""
    if name in HEAVY:  # the one that rewrites most; cr + rescale for the 224² transformers
        return (("cr", True) if zoo_input_size(name) > 64 else ("ca", True)), ("", False)
    index = MODELS.index(name)
    return SCHEMES[index % len(SCHEMES)], SCHEMES[(index + 3) % len(SCHEMES)]


def check_model(name: str) -> None:
    """Build and analyse once; costs, per-space and per-norm dead channels, then the coverage row, from that
    analysis."""
    warnings.simplefilter("ignore")
    model, x = build(name)
    analysis, unknown = analyse(model, x)
    assert_costs(model, analysis, unknown)
    per_space, per_norm = variants(name)
    fresh = [t.clone() for t in model.state_dict().values()] if per_norm[0] else []  # HEAVY: no second copy
    kill_channels(model, analysis, 0.3, 0)
    assert_preserved(model, x, analysis, [per_space], exact_snapshot=name not in HEAVY)
    if per_norm[0]:
        with torch.no_grad():  # the fresh weights back, in place (the analysis holds these tensors' modules)
            for tensor, saved in zip(model.state_dict().values(), fresh, strict=True):
                tensor.copy_(saved)
        del fresh
        if norms_per_space(model, analysis) >= 2:  # else per-norm = per-space, checked above
            assert kill_per_norm(model, analysis, 0.3, 0) > 0
            assert_preserved(model, x, analysis, [per_norm])
    meta_parameters_of(model)  # last, and with parameters on meta: add_gates' copy costs no memory (5 GB and more)
    assert_coverage_row(name, model, x, analysis)


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


def test_the_biggest_models_form_one_unit_of_work():
    """The scheduler's memory-heavy unit (tests/conftest.py) names exactly the biggest models' tests in this module."""
    import conftest

    module = Path(__file__).resolve().relative_to(ROOT).as_posix()
    assert conftest.MEMORY_HEAVY == {f"{module}::{test_torchvision_model.__name__}[{name}]" for name in BIGGEST}
    assert BIGGEST <= set(MODELS) and BIGGEST <= HEAVY


def test_every_variant_runs_over_the_sweep():
    """Per space and per norm, each of the six scheme × rescale variants is some model's."""
    light = [n for n in MODELS if n not in HEAVY]
    assert {variants(n)[0] for n in light} == set(SCHEMES) == {variants(n)[1] for n in light}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_params())
def test_torchvision_model(name, one_thread, request):  # one thread each: the other worker shares 2 cores
    if name not in BIGGEST:
        try:
            check_model(name)
        finally:
            if name in HEAVY:  # its reference cycles (graph, analysis) freed, failed or not: the trim hands them back
                gc.collect()
        return
    request.getfixturevalue("memory_heavy")  # 5 GB and more in float64, twice at the peak: never two at once
    # up to ~16 GB at peak: a fresh process, so that the memory goes back to the system afterwards
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=1200, env=env)
    assert child.returncode == 0, f"{name} (exit {child.returncode}):\n{child.stdout[-4000:]}\n{child.stderr[-4000:]}"


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the test that runs it: the other worker shares the cores
    check_model(sys.argv[1])
