"""Budgets, seeds and settings out of range end in a clean NrfxError, never a hang, a crash or a silent pass."""

from __future__ import annotations

import math
import re
import time
import warnings

import pytest
import torch
from torch import nn

import nrfx
from nrfx.errors import BudgetError, PlanError
from nrfx.train.driver import DriverError


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[1].weight[:5] = 0
    return model, torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("budget", [nrfx.Budget(macs=10**30), nrfx.Budget(params=10**40), nrfx.Budget(params=1e99)])
def test_absurd_budgets_raise_at_once_naming_the_largest_meaningful_one(budget):
    model, x = _net()
    start = time.perf_counter()
    with pytest.raises(BudgetError, match="beyond any meaningful width"):
        nrfx.rejuvenate(model, None, budget, example_inputs=x)
    assert time.perf_counter() - start < 30  # no loop proportional to the budget


@pytest.mark.parametrize("make", [
    lambda: nrfx.Budget.coerce(nrfx.Budget(params=math.nan)),
    lambda: nrfx.Budget.coerce(nrfx.Budget(macs=math.inf)),
    lambda: nrfx.Budget.coerce(nrfx.Budget(params=-5)),
    lambda: nrfx.Budget.coerce(nrfx.Budget(params=2.5)),
    lambda: nrfx.Budget.coerce(nrfx.Budget(params=True)),
    lambda: nrfx.Budget.fraction(math.inf),
    lambda: nrfx.Budget.fraction(math.nan),
    lambda: nrfx.Budget.fraction(0.0),
    lambda: nrfx.Budget.fraction(1e9),
    lambda: nrfx.Budget.fraction(1.0, "joules"),
    lambda: nrfx.Budget.coerce(-3),
])
def test_non_finite_and_out_of_range_budgets_are_budget_errors(make):
    with pytest.raises(BudgetError):
        make()


def test_a_budget_below_the_aligned_minimum_names_the_unaligned_one():
    """Under align=8 the minimum holds one 8-channel step per aligned space; the error names align=1's minimum,
    and a budget between the two fits under align=1."""
    model, x = _net()
    with pytest.raises(BudgetError) as aligned:
        nrfx.rejuvenate(model, None, nrfx.Budget(params=1), example_inputs=x)
    with pytest.raises(BudgetError) as unaligned:
        nrfx.rejuvenate(model, None, nrfx.Budget(params=1), example_inputs=x, align=1)
    numbers = lambda text: [int(n.replace(",", "")) for n in re.findall(r"at least ([\d,]+)", text)]  # noqa: E731
    minimum_8, minimum_1 = numbers(str(aligned.value))
    assert "align=1" in str(aligned.value) and "align=1" not in str(unaligned.value)
    assert numbers(str(unaligned.value)) == [minimum_1] and minimum_1 < minimum_8
    new = nrfx.rejuvenate(model, None, nrfx.Budget(params=minimum_1), example_inputs=x, align=1)
    assert sum(p.numel() for p in new.parameters()) <= minimum_1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_budget_at_u_that_alignment_cannot_hold_warns_and_names_the_budget_that_can(seed):
    """At U(θ) under align=8 the survivors (rounded up to 8) no longer fit: live channels go, and nrfx says so,
    naming the budget that keeps them; align=1 keeps them at U(θ), silently, and so does the budget it names."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.Conv2d(24, 40, 3, padding=1), nn.BatchNorm2d(40), nn.ReLU(),
                          nn.Conv2d(40, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (model[1], model[4], model[7]):  # per norm, a count no multiple of 8 survives
            dead = torch.randperm(norm.num_features, generator=gen)[: norm.num_features // 2 - 3]
            norm.weight[dead] = 0
            norm.bias[dead] = 0
    x = torch.randn(3, 3, 8, 8, dtype=torch.double)
    analysis = nrfx.analyze(model, x)
    live = analysis.utilization(analysis.masks_from(model)).live_macs
    with pytest.warns(nrfx.NrfxWarning, match=r"align=8 rounds the survivors up.*pass align=1") as caught:
        lossy = nrfx.rejuvenate(model, None, nrfx.Budget(macs=live), example_inputs=x, analysis=analysis)
    assert any(n.startswith("compression: ") for n in lossy.nrfx_plan.notes)
    assert sum("rounds the survivors up" in str(w.message) for w in caught) == 1  # once (a keep round made one each)
    enough = int(re.search(r"ask for at least ([\d,]+)", str(caught[0].message)).group(1).replace(",", ""))
    for align, budget in ((1, live), (8, enough)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", nrfx.NrfxWarning)
            new = nrfx.rejuvenate(model, None, nrfx.Budget(macs=budget), example_inputs=x, analysis=analysis,
                                  align=align)
        assert not any(n.startswith("compression") for n in new.nrfx_plan.notes)
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)
    with pytest.raises(AssertionError), torch.no_grad():
        torch.testing.assert_close(lossy(x), model(x), rtol=1e-9, atol=1e-9)


def test_flops_is_a_deprecated_alias_of_macs():
    model, x = _net()
    with pytest.deprecated_call(match="'macs'"):
        old = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "flops"), example_inputs=x, align=1).nrfx_plan
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x, align=1).nrfx_plan
    assert old.budget_kind == new.budget_kind == "macs" and old.new_widths == new.new_widths
    with pytest.deprecated_call(match=r"Budget\(macs=...\)"):
        budget = nrfx.Budget(flops=1000)
    assert budget == nrfx.Budget(macs=1000) and budget.kind == "macs"
    with pytest.raises(BudgetError, match="old name"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        nrfx.Budget(macs=1, flops=1)
    a = nrfx.analyze(model, x)
    u = a.utilization()
    pairs = [(budget, "flops", "macs"), (a, "flops", "macs"), (a, "live_flops", "live_macs"),
             (a, "effective_flops", "effective_macs"), (u, "flops", "macs"), (u, "live_flops", "live_macs"),
             (u, "r_flops", "r_macs")]
    for obj, old_name, new_name in pairs:
        with pytest.deprecated_call(match=f"{type(obj).__name__}.{new_name}"):
            assert getattr(obj, old_name) == getattr(obj, new_name)
    widths = [s.width for s in a.spaces]
    with pytest.deprecated_call(match="macs_at"):
        assert a.flops_at(widths) == a.macs_at(widths) == a.macs
    assert nrfx.Plan.from_dict({**new.to_dict(), "budget_kind": "flops"}).budget_kind == "macs"  # older plan files


@pytest.mark.parametrize(("option", "value"), [("gamma0", math.inf), ("gamma0", math.nan), ("seed", 2**70),
                                                ("seed", -1), ("seed", 1.5), ("align", 0), ("align", True)])
def test_plan_options_out_of_range_are_plan_errors(option, value):
    model, x = _net()
    with pytest.raises(PlanError, match=option):
        nrfx.rejuvenate(model, None, None, example_inputs=x, **{option: value})


@pytest.mark.parametrize(("option", "value"), [("interval", True), ("max_rounds", True), ("lam", True),
                                                ("lam", math.nan), ("align", 3.0)])
def test_driver_settings_out_of_range_are_driver_errors(option, value):
    model, x = _net()
    with pytest.raises(DriverError):
        nrfx.NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.1), example_inputs=x, **{option: value})


def test_a_model_with_nothing_free_rejuvenates_to_itself():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x)
    assert new.nrfx_plan.new_widths == new.nrfx_plan.widths
    torch.testing.assert_close(new(x), model(x))


@pytest.mark.parametrize("budget", ["params=inf", "flops=nan", "macs=1e99"])
def test_cli_bad_budgets_exit_2_with_one_line(budget, tmp_path, capsys):
    from nrfx.cli import main

    code = main(["rejuvenate", "resnet18", "--input-size", "3", "32", "32", "--budget", budget,
                 "--out", str(tmp_path / "r.pt")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0].lower(), err


def test_cli_budget_as_a_multiple_of_the_models_cost(tmp_path, capsys):
    """--budget macs=1.2x is Budget.fraction(1.2, "macs"); a count that is not whole names that form."""
    from nrfx.cli import main, parse_budget

    assert parse_budget("macs=1.2x") == nrfx.Budget.fraction(1.2, "macs")
    assert parse_budget("params=2.5e6") == nrfx.Budget(params=2_500_000)
    code = main(["rejuvenate", "resnet18", "--input-size", "3", "32", "32", "--budget", "params=0.9",
                 "--out", str(tmp_path / "r.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "params=0.9x" in err[0], err
    code = main(["rejuvenate", "resnet18", "--input-size", "3", "32", "32", "--budget", "macs=1.2x", "--align", "1",
                 "--out", str(tmp_path / "r.pt")])
    assert code == 0
    out = capsys.readouterr().out
    budget, cost = (int(s.replace(",", "")) for s in re.search(r"budget macs ([\d,]+): cost ([\d,]+)", out).groups())
    assert budget == int(1.2 * cost)
