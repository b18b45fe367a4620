"""rejuvenate: function preservation, budgets, schemes, replay, and bad inputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torchvision
from support import SCHEMES, assert_preserved, assert_unchanged, kill_channels, snapshot
from torch import nn

import nrfx
from nrfx.layers.srlayers import SR_LAYERS

FAST_MODELS = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"]


def _prepared(name: str, size: int = 64, seed: int = 0):
    """A float64 eval-mode torchvision model with exact-zero dead channels, its input and analysis."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    kill_channels(model, analysis, 0.4, seed)
    if any(not s.is_frozen for s in analysis.spaces):  # the channels are dead now, whatever the analysis saw
        assert analysis.utilization(analysis.masks_from(model)).r_params < 1, name
    return model, x, analysis


@pytest.mark.parametrize("name", FAST_MODELS)
def test_function_preserved_fast_zoo(name):
    model, x, analysis = _prepared(name, size=32)
    assert_preserved(model, x, analysis)


def _cheapest_step(analysis, kind: str, widths: list[int], align: int) -> int:
    """The cost of the cheapest growth the planner could still make: one alignment step of one free unit."""
    from nrfx.plan.planner import align_steps, planning_units

    units = planning_units(analysis)
    full = [analysis.spaces[u.spaces[0]].width // u.blocks[0] for u in units]
    model_cost, base = analysis.cost_model(kind), analysis.cost_model(kind)(widths)
    costs = []
    for unit, step in zip(units, align_steps(units, full, align), strict=True):
        if not unit.frozen:
            grown = list(widths)
            for s, b in zip(unit.spaces, unit.blocks, strict=True):
                grown[s] += step * b
            costs.append(model_cost(grown) - base)
    return min(costs)


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("kind", ["params", "macs"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 1.3])
def test_budget_met_within_one_step_never_exceeded(kind, fraction, align):
    model, x, analysis = _prepared("resnet18", size=32)
    budget = nrfx.Budget.fraction(fraction, kind)
    new = nrfx.rejuvenate(model, None, budget, example_inputs=x, analysis=analysis, align=align)
    plan = new.nrfx_plan
    assert plan.align == align
    target = int(fraction * (analysis.params if kind == "params" else analysis.macs))
    after = nrfx.analyze(new, x)
    cost = after.params if kind == "params" else after.macs
    assert cost == plan.cost_after <= target
    assert target - cost < _cheapest_step(analysis, kind, plan.new_widths, align)
    if kind == "params":
        assert sum(p.numel() for p in new.parameters()) == cost


def test_no_realloc_reinitialises_in_place():
    model, x, analysis = _prepared("resnet18", size=32)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, realloc=False, analysis=analysis)
    assert new.nrfx_plan.new_widths == [s.width for s in analysis.spaces]
    assert sum(p.numel() for p in new.parameters()) == analysis.params
    torch.testing.assert_close(new(x), model(x), rtol=1e-7, atol=1e-9)


def test_plan_is_json_and_replays_bit_for_bit():
    model, x, _ = _prepared("resnet18", size=32)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(0.8), example_inputs=x, seed=3, scheme="cr")
    data = json.loads(new.nrfx_plan.to_json())
    again = nrfx.apply_plan(model, data, x)
    for (k1, v1), (k2, v2) in zip(new.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_rewritten_module_trains_roundtrips_and_lints():
    model, x, _ = _prepared("resnet18", size=32)
    model = model.float().train()
    x = x.float()
    for scheme in ("nr", "cr", "ca"):
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme)
        assert all(p.dtype == torch.float32 for p in new.parameters())
        assert new.training
        new.graph.lint()
        new(x).sum().backward()
        assert all(p.grad is not None for p in new.parameters() if p.requires_grad)
        clone = copy.deepcopy(new)
        clone.load_state_dict(new.state_dict())
        new.eval()
        clone.eval()
        torch.testing.assert_close(clone(x), new(x))


def test_rejuvenated_children_are_zero_crossed():
    model, x, analysis = _prepared("vgg11_bn", size=32)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis)
    for name, pmap in new.nrfx_param_map.items():
        if not name.endswith("weight") or len(pmap.dims) != 2:
            continue
        weight = new.get_parameter(name)
        out_r, in_r = (d.source < 0 for d in sorted(pmap.dims, key=lambda d: d.dim))
        assert not weight[out_r][:, ~in_r].any(), f"W_S→R of {name} is not zero"
        assert not weight[~out_r][:, in_r].any(), f"W_R→S of {name} is not zero"


@pytest.mark.parametrize("scheme", ["cr", "ca"])
def test_schemes_export_and_compile(scheme):
    model, x, _ = _prepared("resnet18", size=32)
    model, x = model.float(), x.float()
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme)
    exported = torch.export.export(new, (x,))
    torch.testing.assert_close(exported.module()(x), new(x))
    compiled = torch.compile(new, backend="aot_eager")
    torch.testing.assert_close(compiled(x), new(x), rtol=1e-4, atol=1e-5)


def test_cr_blocks_stay_zero_after_training():
    model, x, _ = _prepared("vgg11_bn", size=32)
    new = nrfx.rejuvenate(model.float().train(), None, None, example_inputs=x.float(), scheme="cr")
    opt = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        new(x.float()).square().mean().backward()
        opt.step()
    converted = [m for m in new.modules() if type(m).__name__.startswith("SR")]
    assert converted
    for module in converted:
        w = module.weight
        assert not w[: module.s_out, module.s_in:].any() and not w[module.s_out:, : module.s_in].any()


@pytest.mark.parametrize("scheme", ["nr", "ca"])
def test_matched_gamma0_with_rescale_preserves_function_and_lifts_survivors(scheme):
    model, x, analysis = _prepared("resnet18", size=32)
    with torch.no_grad():
        expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme, rescale=True, gamma0="match",
                          analysis=analysis)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    assert new.nrfx_plan.gamma0 == "match"
    assert nrfx.Plan.from_dict(json.loads(new.nrfx_plan.to_json())).gamma0 == "match"
    old_norms = dict(model.named_modules())
    for name, pmap in new.nrfx_param_map.items():
        module = new.get_submodule(name.rsplit(".", 1)[0])
        if not (name.endswith(".weight") and isinstance(module, nn.BatchNorm2d)):
            continue
        source = pmap.dims[0].source
        old = old_norms[name.rsplit(".", 1)[0]].weight[source[source >= 0]]
        median = old[old != 0].abs().median()
        gamma = module.weight
        assert torch.allclose(gamma[source < 0], median.expand(int((source < 0).sum())))
        skipped = any(note.startswith(f"rescale skipped at {name.rsplit('.', 1)[0]}:") for note in new.nrfx_plan.notes)
        if not skipped:  # a dead channel kept only to fill an alignment step stays at γ = 0
            lifted = gamma[source >= 0][old != 0]
            assert (lifted.abs() >= median * (1 - 1e-12)).all()


@pytest.mark.parametrize("gamma0", [0.0, -1.0, "median", True])
def test_bad_gamma0_is_an_error(gamma0):
    model, x, analysis = _prepared("resnet18", size=32)
    with pytest.raises(nrfx.PlanError, match="gamma0"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, gamma0=gamma0, analysis=analysis)


def test_budget_below_frozen_part_states_minimum():
    model, x, analysis = _prepared("resnet18", size=32)
    before = snapshot(model)
    with pytest.raises(nrfx.BudgetError, match="at least"):
        nrfx.rejuvenate(model, None, 1000, example_inputs=x, analysis=analysis)
    assert_unchanged(model, before)


def test_unknown_scheme_is_an_error():
    model, x, analysis = _prepared("resnet18", size=32)
    with pytest.raises(nrfx.PlanError, match="scheme"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="xx", analysis=analysis)


def test_all_dead_space_keeps_strongest_and_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    masks = {"1": torch.zeros(4, dtype=torch.bool), "4": torch.ones(5, dtype=torch.bool)}
    before = snapshot(model)
    with pytest.warns(nrfx.NrfxWarning, match="strongest"):
        new = nrfx.rejuvenate(model, masks, None, example_inputs=torch.randn(1, 3, 8, 8))
    assert len(new.nrfx_plan.keep[0]) == 1
    assert_unchanged(model, before)


def test_mask_on_frozen_space_is_ignored_with_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    model[3] = nn.Flatten(0)  # flattening the batch too: channel space meets a plain dim → frozen
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    masks = {"2": torch.tensor([True, False, True, True])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u = nrfx.analyze(model, torch.randn(1, 3, 8, 8)).utilization(masks)
    assert any("frozen" in str(w.message) for w in caught)
    assert u.live_params == u.params


def test_cli_rejuvenate_writes_a_replayable_file(tmp_path, capsys):
    from nrfx.cli import main

    out = tmp_path / "r.pt"
    masks = tmp_path / "m.pt"
    dead = torch.ones(64, dtype=torch.bool)
    dead[:20] = False
    torch.save({"layer1.0.bn1": dead}, masks)
    code = main(["rejuvenate", "resnet18", "--input-size", "3", "32", "32", "--budget", "params", "--scheme", "ca",
                 "--gamma0", "match", "--masks", str(masks), "--out", str(out), "--align", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text
    saved = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18(weights=None).eval()
    replay = nrfx.apply_plan(model, saved["plan"], torch.zeros(1, 3, 32, 32))
    assert replay.state_dict().keys() == saved["state_dict"].keys()
    assert saved["plan"]["keep"] and len(saved["plan"]["keep"][1]) == 44 and saved["plan"]["align"] == 1
    size = ["--input-size", "3", "32", "32"]
    assert main(["rejuvenate", "resnet18", *size, "--masks", str(masks), "--out", str(out)]) == 0
    assert len(torch.load(out, weights_only=True)["plan"]["keep"][1]) == 48  # 44 survivors rounded up to 8s
    assert saved["plan"]["gamma0"] == "match"
    with pytest.raises(SystemExit):
        main(["rejuvenate", "resnet18", "--gamma0", "median", "--out", str(out)])


class _ConstantEmitter(nn.Module):
    """Norms whose dead channels (γ = 0, β ≠ 0) emit constants read by 1×1 convs and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.c3(x), 4), 1))


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_constants_of_dead_channels_are_folded(scheme):
    torch.manual_seed(0)
    model = _ConstantEmitter().double().eval()
    with torch.no_grad():
        for norm in (model.b1, model.b2):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2)
            norm.bias.normal_()
        model.b1.weight[:3] = 0
        model.b1.bias[:3] = 1.5  # dead by γ, but relu(β) = 1.5 reaches c2
        model.b2.weight[:2] = 0
        model.b2.bias[:2] = 0.7
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme, align=1)  # 8 would keep the dead
    assert set(new.nrfx_plan.folds) == {"c2", "c3"}
    torch.testing.assert_close(new(x), model(x), rtol=1e-7, atol=1e-12)
    replay = nrfx.apply_plan(model, json.loads(new.nrfx_plan.to_json()), x)
    torch.testing.assert_close(replay(x), model(x), rtol=1e-7, atol=1e-12)


class _TwoInputsDictOut(nn.Module):
    """Two inputs, a shared trunk (module called twice), a concat and a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.stem_b = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, dilation=1), nn.BatchNorm2d(6), nn.ReLU())
        self.trunk = nn.Sequential(nn.Conv2d(6, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.head_cls = nn.Linear(16, 4)
        self.head_map = nn.Conv2d(16, 2, 1)

    def forward(self, a, b):
        x = self.trunk(self.stem_a(a))
        y = self.trunk(self.stem_b(b))
        z = self.dw(torch.cat([x, y], 1))
        z += torch.cat([x, y], 1)
        return {"cls": self.head_cls(z.mean((2, 3))), "map": self.head_map(z)}


@pytest.mark.parametrize(("scheme", "rescale"), SCHEMES)
def test_several_inputs_dict_outputs_and_weight_sharing(scheme, rescale):
    torch.manual_seed(1)
    model = _TwoInputsDictOut().double().eval()
    inputs = (torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64))
    analysis = nrfx.analyze(model, inputs)
    kill_channels(model, analysis, 0.4, 1)
    before = snapshot(model)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2, "macs"), example_inputs=inputs, scheme=scheme,
                          rescale=rescale, analysis=analysis)
    with torch.no_grad():
        expected, got = model(*inputs), new(*inputs)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-7, atol=1e-10)
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    assert_unchanged(model, before)


class WholeSlice(nn.Module):
    """GhostNet's ``cat([x1, x2])[:, :out_chs]``: a literal slice that takes every channel at the traced width."""

    def __init__(self, take) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.primary, self.bn1 = nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6)
        self.cheap, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(12, 5, 1)
        self.take = take

    def forward(self, x):
        x = self.bn0(self.stem(x))
        x1 = self.bn1(self.primary(x))
        y = self.take(torch.cat([x1, self.bn2(self.cheap(x1))], 1))
        return self.head(y + x)


@pytest.mark.parametrize("take", [lambda y: y[:, :12], lambda y: y[:, -12:], lambda y: y[:, 0:12],
                                  lambda y: y[:, :100], lambda y: y[:, :], lambda y: y[:, 0:2**40]],
                         ids=[":12", "-12:", "0:12", ":100", ":", "0:2**40"])
def test_a_slice_of_every_channel_follows_the_new_width(take):
    torch.manual_seed(0)
    model = WholeSlice(take).double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    kill_channels(model, analysis, 0.4, 0)
    for scheme in ("nr", "cr", "ca"):
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(2.5, "params"), example_inputs=x, scheme=scheme,
                              align=1, analysis=analysis)
        assert max(new.nrfx_plan.new_widths) > 12  # the sliced space grew past the literal bound
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)


class _GridBranch(nn.Module):
    """A branch computed from a coordinate grid made on a spelled device (RAFT's flow encoder: torch.export bakes
    ``torch.arange(..., device=cpu)`` into the graph): during shape propagation its tensors are real CPU ones."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.x_conv = nn.Conv2d(16, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(6, device="cpu", dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        flow = torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(grid))))))
        return self.c3(flow), self.x_conv(x)


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_layers_fed_by_tensors_made_on_a_spelled_device_are_rewritten(scheme):
    """An S/R layer whose input comes from ``torch.arange(..., device="cpu")`` runs through the rewrite's shape
    check (ca failed there: its gate met a real CPU tensor and the layer's meta mask) and keeps the function."""
    torch.manual_seed(0)
    model = _GridBranch().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    with torch.no_grad():
        model.bn1.weight[::3] = 0
        model.bn1.bias[::3] = 0
        model.bn2.weight[1::4] = 0
        model.bn2.bias[1::4] = 0
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis, scheme=scheme, align=1)
    assert any(isinstance(m, SR_LAYERS) for m in new.modules()) == (scheme != "nr")
    with torch.no_grad():
        for got, expected in zip(new(x), model(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_hook_on_the_result_fires_once_on_its_first_call():
    """torch's lazy GraphModule compiles at its first call by calling itself again, so the hooks of that call fired
    twice (an island that keeps its module's hooks collected its output twice): the result is compiled when built."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x)
    calls = []
    new.register_forward_hook(lambda *_: calls.append(1))
    new(x)
    assert calls == [1]


class _TwoStages(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(x))


def test_hooks_the_new_graph_module_would_not_run_are_named():
    """A hook on a module the graph traces through (a feature hook on a stage, for distillation) does not run in the
    rewritten GraphModule: rejuvenate warns with its name; one on a module the graph calls runs on the result, and
    a second warning names it (nrfx never runs hooks, so a hook that changes values is not preserved)."""
    model = _TwoStages().eval()
    x = torch.randn(2, 3, 9, 9)
    seen = []
    model.stage1.register_forward_hook(lambda *_: seen.append("stage1"))
    model.stage2[0].register_forward_hook(lambda *_: seen.append("conv"))
    with pytest.warns(nrfx.errors.NrfxWarning, match=r"stage1 of _TwoStages have hooks .* inplace=True") as caught:
        new = nrfx.rejuvenate(model, None, None, example_inputs=x)
    left_behind = [str(w.message) for w in caught if "does not run" in str(w.message)]
    kept = [str(w.message) for w in caught if "runs the forward hooks" in str(w.message)]
    assert not any("stage2.0" in m for m in left_behind) and len(kept) == 1 and "stage2.0" in kept[0]
    seen.clear()
    new(x)
    assert seen == ["conv"]


@pytest.mark.parametrize("inplace", [False, True], ids=["graph", "inplace"])
def test_a_hook_that_changes_values_on_a_rewritten_module_is_named(inplace):
    """nrfx never runs the user's hooks, so a pre-hook that adds to a conv's input (a removed channel then reads 1,
    not 0) changes the rejuvenated model unseen: rejuvenate names every module whose hooks the result runs (the
    modules its graph calls; in place all of them), and a model without hooks gets no such warning."""
    torch.manual_seed(0)
    model = _TwoStages().double().eval()
    with torch.no_grad():
        model.stage1[1].weight[:3] = 0
        model.stage1[1].bias[:3] = 0
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        nrfx.rejuvenate(copy.deepcopy(model), None, None, example_inputs=x, align=1, inplace=inplace)
    assert not [w for w in quiet if "runs the forward hooks" in str(w.message)]
    model.stage2[0].register_forward_pre_hook(lambda _m, args: (args[0] + 1,))
    reference = model(x)
    with pytest.warns(nrfx.errors.NrfxWarning, match=r"runs the forward hooks of stage2\.0 of _TwoStages"):
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, align=1, inplace=inplace)
    with torch.no_grad():
        assert not torch.allclose(new(x), reference)  # what the warning is about


class _TiedConvs(nn.Module):
    """Two 3×3 convs holding one weight (``c3.weight = c2.weight``) between BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3.weight = self.c2.weight
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3)):
            x = torch.relu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("inplace", [False, True], ids=["graph", "inplace"])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_weight_tied_across_two_layers_is_rewritten_once_and_stays_tied(scheme, inplace):
    """The plan resizes a tied weight under its first name; its other holder took the new tensor too only now (it
    kept the old one and the rewritten model failed: 'Invalid channel dimensions').  In cr/ca the two layers stay
    plain (one layer's S/R blocks cannot be another's), noted; in place the optimizer holds the one tensor."""
    torch.manual_seed(0)
    model = _TiedConvs().double().eval()
    with torch.no_grad():
        for norm in (model.b1, model.b2, model.b3):
            norm.weight[:3] = 0
            norm.bias[:3] = 0
    x, other = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(other)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if inplace else None
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, scheme=scheme, align=1,
                          inplace=inplace, optimizer=optimizer)
    assert new.c2.weight is new.c3.weight and new.c2.weight.shape[0] != 16
    with torch.no_grad():
        torch.testing.assert_close(new(other), expected, rtol=1e-10, atol=1e-12)
    if scheme != "nr":
        assert any("tied" in note for note in (new.nrfx_plan if not inplace else new.nrfx_plans[""]).notes)
    if inplace:
        (group,) = optimizer.param_groups
        assert sum(p is new.c2.weight for p in group["params"]) == 1
        assert {id(p) for p in group["params"]} == {id(p) for p in new.parameters()}
