"""Capture front ends: torch.export gives the same analysis as fx, a trainable result, and islands.

Properties: on models both front ends capture, ``capture="export"`` and ``capture="fx"`` agree on
every space width, frozen flag, parameter and MAC count (one op vocabulary); an export-captured
rejuvenation takes the model's own nested and keyword inputs, returns its output structure,
follows ``.train()``/``.eval()``, runs at any batch size, keeps the function and replays from its
plan; a model that neither front end captures is analysed as islands and rejuvenated in a copy of
the same class.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings

import pytest
import torch
import torchvision
from support import kill_per_norm
from torch import nn
from torch.nn import functional as F

import nrfx
from nrfx.analysis.islands import IslandAnalysis

warnings.filterwarnings("ignore", category=nrfx.NrfxWarning)


@dataclasses.dataclass
class _Out:
    """A dataclass output, as Hugging Face models return."""

    logits: torch.Tensor
    features: torch.Tensor


torch.utils._pytree.register_dataclass(_Out)


class _NestedNet(nn.Module):
    """Takes {'image': x, 'extra': [y]} and a keyword scale; returns a dataclass; a python branch on a size."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(2, 8, 1), nn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(12, 5)

    def forward(self, batch: dict, *, scale: torch.Tensor) -> _Out:
        x = self.stem(batch["image"]) + self.side(batch["extra"][0])
        if x.shape[-1] > 4:  # fx cannot trace a branch on a size of the input
            x = x * scale
        f = self.body(x)
        return _Out(self.head(f.mean((2, 3))), f)


def _nested_inputs(batch: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(batch)
    image = torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype)
    extra = torch.randn(batch, 2, 8, 8, generator=g, dtype=dtype)
    return ({"image": image, "extra": [extra]},), {"scale": torch.tensor(1.5, dtype=dtype)}


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


def test_nested_keyword_inputs_are_captured_by_export_and_rejuvenated():
    model = _randomised(_NestedNet())
    args, kwargs = _nested_inputs()
    analysis = nrfx.analyze(model, args, example_kwargs=kwargs)
    assert analysis.capture == "export"
    assert analysis.params == sum(p.numel() for p in model.parameters())
    raised = {n.target for n in analysis.gm.graph.nodes if n.op == "call_module"}
    assert {"stem.0", "stem.1", "side.1", "body.1", "body.3", "head"} <= raised  # the user's own modules
    assert kill_per_norm(model, analysis, seed=1) > 0
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0), example_inputs=args, example_kwargs=kwargs)
    for batch in (3, 5):
        a, k = _nested_inputs(batch)
        out, ref = new(*a, **k), model(*a, **k)
        assert isinstance(out, _Out)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-9, atol=1e-10)


def test_export_result_is_trainable_and_follows_train_eval():
    model = _randomised(_NestedNet())
    args, kwargs = _nested_inputs()
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=args, example_kwargs=kwargs)
    new.train()
    assert new.get_submodule("body.3").training  # dropout switches with the module
    out = new(*args, **kwargs)
    out.logits.sum().backward()
    grads = [p.grad for p in new.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    running = new.get_submodule("stem.1").running_mean.clone()
    new(*args, **kwargs)
    assert not torch.equal(running, new.get_submodule("stem.1").running_mean)  # BatchNorm in training mode
    new.eval()
    torch.testing.assert_close(new(*args, **kwargs).logits, new(*args, **kwargs).logits)


def test_export_plan_replays_from_state_dict():
    model = _randomised(_NestedNet())
    args, kwargs = _nested_inputs()
    kill_per_norm(model, nrfx.analyze(model, args, example_kwargs=kwargs), seed=2)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.1), example_inputs=args, example_kwargs=kwargs,
                          scheme="cr", seed=3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01)  # trained a little after the rejuvenation
    replay = nrfx.apply_plan(model, new.nrfx_plan.to_dict(), args, example_kwargs=kwargs)
    replay.load_state_dict(new.state_dict())
    torch.testing.assert_close(replay(*args, **kwargs).logits, new(*args, **kwargs).logits)
    with pytest.raises(nrfx.PlanError, match="example_inputs"):
        nrfx.apply_plan(model, new.nrfx_plan)


def test_export_leaves_the_model_untouched():
    model = _randomised(_NestedNet()).train()
    model.body[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    args, kwargs = _nested_inputs()
    nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.1), example_inputs=args, example_kwargs=kwargs)
    assert [m.training for m in model.modules()] == modes
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5"])
def test_export_and_fx_agree(name):
    """One op vocabulary: the same spaces, frozen flags, params and MACs from either front end."""
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    fx, ex = nrfx.analyze(model, x, capture="fx"), nrfx.analyze(model, x, capture="export")
    assert (fx.capture, ex.capture) == ("fx", "export")
    assert [s.width for s in ex.spaces] == [s.width for s in fx.spaces]
    assert [s.is_frozen for s in ex.spaces] == [s.is_frozen for s in fx.spaces]
    assert (ex.params, ex.macs) == (fx.params, fx.macs)
    assert ex.coverage() == fx.coverage()


def test_export_rejuvenation_of_torchvision_model_keeps_the_function():
    model = torchvision.models.resnet18(weights=None)
    model = _randomised(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    kill_per_norm(model, nrfx.analyze(model, x, capture="export"), seed=4)
    for scheme in ("nr", "ca"):
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0), example_inputs=x, capture="export",
                              scheme=scheme)
        torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)
        y = torch.randn(5, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(new(y), model(y), rtol=1e-9, atol=1e-9)


class _TokensToMap(nn.Module):
    """int() of a size: fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, tokens):
        side = int(tokens.shape[1] ** 0.5)
        y = self.embed(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return self.head(torch.relu(self.bn(self.conv(y))))


def test_auto_takes_fx_when_it_works_and_export_when_the_root_fails():
    assert nrfx.analyze(torchvision.models.resnet18(weights=None), torch.randn(2, 3, 32, 32)).capture == "fx"
    analysis = nrfx.analyze(_TokensToMap(), torch.randn(2, 16, 3))
    assert analysis.capture == "export"
    assert any("fx could not trace the root" in note for note in analysis.capture_notes)
    with pytest.raises(nrfx.TraceError, match="cannot trace"):
        nrfx.analyze(_TokensToMap(), torch.randn(2, 16, 3), capture="fx")


def test_capture_option_is_checked():
    with pytest.raises(nrfx.TraceError, match="capture must be one of"):
        nrfx.analyze(_TokensToMap(), torch.randn(2, 16, 3), capture="jit")


class _Filtering(nn.Module):
    """A data-dependent root (a Python branch on tensor values) around two capturable parts."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.scorer = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, images: list[torch.Tensor]):
        features = self.backbone(torch.stack(images)).mean((2, 3))
        scores = self.scorer(features).squeeze(1)
        if scores.max() > 0:  # neither fx nor torch.export captures a branch on values
            return {"scores": scores, "best": features[scores.argmax()]}
        return {"scores": scores, "best": features[0]}


def test_islands_when_nothing_captures_the_whole_model():
    model = _randomised(_Filtering())
    images = [torch.randn(3, 8, 8, dtype=torch.float64) for _ in range(4)]
    analysis = nrfx.analyze(model, (images,))
    assert isinstance(analysis, IslandAnalysis)
    assert set(analysis.islands) == {"backbone", "scorer"}
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert analysis.outside_params == 0
    per_island = analysis.coverage_by_island()
    assert analysis.coverage().channels == sum(c.channels for c in per_island.values())
    text = str(analysis.report())
    assert "capture islands" in text and "island backbone" in text
    for path, island in analysis.islands.items():
        kill_per_norm(model.get_submodule(path), island, seed=5)
    masks = analysis.masks_from(model)
    assert all(k.split(".")[0] in {"backbone", "scorer"} for k in masks)
    new = nrfx.rejuvenate(model, masks, nrfx.Budget.fraction(1.1), example_inputs=(images,), analysis=analysis,
                          align=1)  # 8-channel steps would not fit in 10 %
    assert type(new) is _Filtering and set(new.nrfx_plans) == {"backbone", "scorer"}
    out, ref = new(images), model(images)
    torch.testing.assert_close(out["scores"], ref["scores"], rtol=1e-9, atol=1e-10)
    ratio = sum(p.numel() for p in new.parameters()) / analysis.params
    assert 1.0 < ratio <= 1.1


class _FilteringWithHead(_Filtering):
    """_Filtering with a third island, ``head``, whose every channel is frozen (its input and output leave it)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 64)

    def forward(self, images: list[torch.Tensor]):
        out = super().forward(images)
        return {**out, "head": self.head(out["best"])}


def test_an_island_with_no_free_channel_keeps_its_cost_and_the_rest_meets_the_budget():
    """The islands share one fraction of their cost, except those with nothing to resize: before, a frozen
    ``head`` made every budget below c(A) impossible (it cannot shrink), now it is paid first."""
    model = _randomised(_FilteringWithHead())
    images = [torch.randn(3, 8, 8, dtype=torch.float64) for _ in range(4)]
    analysis = nrfx.analyze(model, (images,))
    assert set(analysis.islands) == {"backbone", "scorer", "head"}
    assert all(s.is_frozen for s in analysis.islands["head"].spaces)
    for path in ("backbone", "scorer"):
        kill_per_norm(model.get_submodule(path), analysis.islands[path], seed=5)
    for fraction in (0.7, 0.9):
        budget = int(fraction * analysis.params)
        new = nrfx.rejuvenate(model, None, nrfx.Budget(params=budget), example_inputs=(images,), analysis=analysis,
                              align=1)
        assert budget * 0.9 <= sum(p.numel() for p in new.parameters()) <= budget
        assert new.head.weight.shape == model.head.weight.shape
    with pytest.raises(nrfx.BudgetError, match="leaves nothing for the islands that can be rejuvenated"):
        nrfx.rejuvenate(model, None, nrfx.Budget.fraction(0.3), example_inputs=(images,), analysis=analysis, align=1)
    with pytest.raises(nrfx.BudgetError, match=r"island '.*' .* for the whole model") as too_small:
        nrfx.rejuvenate(model, None, nrfx.Budget.fraction(0.45), example_inputs=(images,), analysis=analysis, align=1)
    minimum = too_small.value.minimum
    assert minimum > 0.45 * analysis.params and f"at least {minimum:,} params" in str(too_small.value)
    new = nrfx.rejuvenate(model, None, nrfx.Budget(params=minimum), example_inputs=(images,), analysis=analysis,
                          align=1)  # what the error asked for is enough
    assert sum(p.numel() for p in new.parameters()) <= minimum


@pytest.mark.parametrize("inplace", [False, True])
def test_the_islands_smallest_budget_is_named_once_and_is_enough(inplace):
    """Every too-small budget names the same whole-model minimum, one that gives *every* island its own: before,
    the error named what the first failing island needed, and asking for it failed at the next island (Faster
    R-CNN: 466,376 → 651,548 → 1,060,662), and a budget below the fixed part named no minimum at all."""
    model = _randomised(_FilteringWithHead())
    images = [torch.randn(3, 8, 8, dtype=torch.float64) for _ in range(4)]
    analysis = nrfx.analyze(model, (images,))
    for path in ("backbone", "scorer"):
        kill_per_norm(model.get_submodule(path), analysis.islands[path], seed=5)
    named = set()
    for fraction in (0.05, 0.3, 0.4, 0.45):
        with pytest.raises(nrfx.BudgetError, match="for the whole model") as too_small, \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nrfx.rejuvenate(copy.deepcopy(model) if inplace else model, None, nrfx.Budget.fraction(fraction),
                            example_inputs=(images,), analysis=None if inplace else analysis, align=1,
                            inplace=inplace)
        named.add(too_small.value.minimum)
        assert not [w for w in caught if "fold:" in str(w.message)]  # the probes for the minimum warn nothing
    (minimum,) = named
    target = copy.deepcopy(model) if inplace else model
    new = nrfx.rejuvenate(target, None, nrfx.Budget(params=minimum), example_inputs=(images,),
                          analysis=None if inplace else analysis, align=1, inplace=inplace)
    assert sum(p.numel() for p in new.parameters()) <= minimum


@pytest.mark.slow
def test_islands_on_torchvision_detection():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).double().eval()
    images = [torch.rand(3, 128, 128, dtype=torch.float64) for _ in range(2)]
    analysis = nrfx.analyze(model, (images,))
    assert isinstance(analysis, IslandAnalysis)
    assert {"backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"} <= set(analysis.islands)
    assert analysis.params == sum(p.numel() for p in model.parameters())
    kill_per_norm(model.backbone, analysis.islands["backbone"], seed=6)
    masks = analysis.masks_from(model)
    assert analysis.utilization(masks).live_params < analysis.params
    batch = torch.stack(images)
    for budget in (nrfx.Budget.fraction(1.0), nrfx.Budget.fraction(1.1)):  # dead channels; then widening too
        new = nrfx.rejuvenate(model, masks, budget, example_inputs=(images,), analysis=analysis)
        assert type(new) is type(model) and set(new.nrfx_plans) == set(analysis.islands)
        with torch.no_grad():
            features, expected = new.backbone(batch), model.backbone(batch)
            for level in expected:
                torch.testing.assert_close(features[level], expected[level], rtol=1e-9, atol=1e-9)
            levels = list(expected.values())
            torch.testing.assert_close(new.rpn.head(levels), model.rpn.head(levels), rtol=1e-9, atol=1e-9)
            pooled = torch.randn(5, 256, 7, 7, dtype=torch.float64)
            torch.testing.assert_close(new.roi_heads.box_head(pooled), model.roi_heads.box_head(pooled))
            new(images)  # the detector still takes a list of images


def test_driver_trains_an_export_captured_model_through_rejuvenations():
    torch.manual_seed(0)
    model, x = _TokensToMap(), torch.randn(4, 16, 3)
    nr = nrfx.NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.05), example_inputs=x, interval=1,
                                 target=0.9, lam=1e-3, capture="export")
    assert nr.analysis.capture == "export"
    for _ in range(3):
        loss = nr.model(x).square().mean()
        nr.optimizer.zero_grad()
        loss.backward()
        nr.optimizer.step()
        with torch.no_grad():
            nr.module.get_submodule("bn").weight[:4] = 0  # a quarter of the channels die
        nr.step()
    assert nr.rounds >= 1
    assert nr.model(torch.randn(7, 16, 3)).shape == (7, 4, 4, 4)
    with pytest.raises(nrfx.DriverError, match="islands"):
        nrfx.NeuralRejuvenation(_Filtering(), lambda p: torch.optim.SGD(p, lr=0.1),
                                example_inputs=([torch.randn(3, 8, 8) for _ in range(2)],))


def test_cli_capture_option_and_report_line(capsys):
    from nrfx.cli import main

    assert main(["report", "resnet18", "--input-size", "3", "32", "32", "--batch", "2", "--capture", "export"]) == 0
    text = capsys.readouterr().out
    assert "captured by export" in text and "leaf-module calls raised" in text
    report = nrfx.analyze(_TokensToMap(), torch.randn(2, 16, 3)).report()
    assert report.to_dict()["capture"] == "export" and "captured by export" in report.summary()


def test_islands_warn_once_when_little_is_monitored():
    model = _Filtering()
    model.scorer = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 1))  # free but unsignalled
    with pytest.warns(nrfx.NrfxWarning, match=r"only \d+% of the channels of _Filtering's islands \(backbone"):
        nrfx.analyze(model, ([torch.randn(3, 8, 8) for _ in range(2)],))


class _Dict(collections.OrderedDict):
    """A dict subclass output, as torchvision's segmentation models and Hugging Face return."""


class _DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        numbered = _Dict([("0", y), ("pool", y.amax((2, 3)))])  # not keyword names: returned as a plain dict
        return _Dict(out=y, pooled=y.mean((2, 3))), _Out(logits=y.sum((2, 3)), features=y), numbered


def test_fx_keeps_dict_subclass_and_dataclass_outputs():
    model, x = _randomised(_DictNet()), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x, capture="fx")
    assert not analysis.unknown_ops
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, analysis=analysis)
    first, second, numbered = new(x)
    assert list(numbered) == ["0", "pool"]
    assert type(first) is _Dict and list(first) == ["out", "pooled"] and isinstance(second, _Out)
    torch.testing.assert_close(second.logits, model(x)[1].logits)


def test_a_stale_fx_wrap_registration_does_not_break_tracing():
    """pytorch#130701: generated code can register ``wrap("torch.fx._symbolic_trace._assert_is_none")`` in globals
    that lack that name; torch's next trace then fails with a KeyError. nrfx drops such entries before tracing."""
    table = torch.fx._symbolic_trace._wrapped_fns_to_patch
    frame: dict = {}
    table[(id(frame), "torch.fx._symbolic_trace._assert_is_none")] = frame
    try:
        with pytest.raises(KeyError):
            torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
        analysis = nrfx.analyze(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(2, 3, 4, 4),
                                capture="fx")
        assert analysis.capture == "fx" and (id(frame), "torch.fx._symbolic_trace._assert_is_none") not in table
    finally:
        table.pop((id(frame), "torch.fx._symbolic_trace._assert_is_none"), None)


class _HookedEncoder(nn.Module):
    """Two conv-BN-ReLU blocks returning ``(last, ())``: the hidden states are filled in by forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                                  nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
                                    for c in (3, 16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        for block in self.blocks:
            x = block(x)
        return x, ()


class _HiddenStatesByHooks(nn.Module):
    """Hugging Face's output capturing in miniature: hooks on the blocks collect their outputs and a hook on the
    encoder puts them into its output, which the head reads."""

    def __init__(self, collect: bool = True) -> None:
        super().__init__()
        self.encoder, self.head = _HookedEncoder(), nn.Conv2d(32, 4, 1)
        collected: list[torch.Tensor] = []
        if not collect:  # the encoder's own hook alone makes its output
            self.encoder.register_forward_hook(lambda _m, _a, out: (out[0], (out[0], 2 * out[0])))
            return
        for block in self.encoder.blocks:
            block.register_forward_hook(lambda _m, _a, out: collected.append(out))
        self.encoder.register_forward_hook(lambda _m, _a, out: (out[0], tuple(collected[-2:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, hidden = self.encoder(x)
        return self.head(torch.cat(hidden, 1))


@pytest.mark.parametrize("collect", [True, False], ids=["hooks-on-its-blocks", "its-own-hook"])
def test_an_island_whose_output_forward_hooks_build_is_not_taken_and_hooks_follow_the_islands(collect):
    """A module whose output forward hooks fill (SegFormer's encoder once a forward asked for hidden states: hooks on
    its blocks collect, one on it assembles) is captured without them: as an island its graph returned ``()``
    where the model got two tensors, and the rejuvenated model failed at the head.  A module with hooks inside that
    its graph traces through, or whose graph returns other leaves than the module did, is no island (its children
    are), and a rewritten island keeps the hooks of the module it replaces."""
    model = _randomised(_HiddenStatesByHooks(collect))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x, capture="islands")
    assert set(analysis.islands) == {"encoder.blocks.0", "encoder.blocks.1", "head"}
    with torch.no_grad():  # dead channels inside both blocks (their outputs leave the islands: frozen)
        for block in model.encoder.blocks:
            block[1].weight[::3] = 0
            block[1].bias[::3] = 0
    for scheme in ("nr", "ca"):
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis, scheme=scheme, align=1)
        assert any(p.cost_live < p.cost_before for p in new.nrfx_plans.values())
        with torch.no_grad():
            for batch in (2, 3):
                xb = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
                torch.testing.assert_close(new(xb), model(xb), rtol=1e-9, atol=1e-12)


class _Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class _ScriptedChild(nn.Module):
    """A TorchScript submodule (``torch.jit.script``-ed activation) between two conv-BN stages."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = torch.jit.script(_Swish())
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.b1(self.c1(x)))
        return self.head(torch.relu(self.b2(self.c2(y))).mean((2, 3)))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_torchscript_submodule_is_a_leaf_whose_channels_freeze(scheme, inplace):
    """A ScriptModule child: nothing traces into it and it has no Python hooks or buffer dicts to guard, so the
    capture calls it as an unknown leaf (its channels frozen) and the rest is rejuvenated exactly (was: a crash on
    its C++ buffer dict)."""
    torch.manual_seed(0)
    model, x = _ScriptedChild().eval(), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model.b1.weight[:6] = 0
        model.b2.weight[:5] = 0
        model.b1.bias.uniform_(-1, 1)
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "fx" and analysis.unknown_ops == {"TorchScript module _Swish": ("act",)}
    assert [bool(space.frozen) for space in analysis.spaces] == [True, False, True]  # c1's space feeds `act`
    assert "TorchScript module _Swish" in analysis.spaces[0].frozen[0]
    islands = nrfx.analyze(model, x, capture="islands")  # the call recorder hooks every Python module, not `act`
    assert isinstance(islands, IslandAnalysis) and "act" not in islands.islands
    expected = model(x)
    subject = copy.deepcopy(model) if inplace else model
    result = nrfx.rejuvenate(subject, None, None, example_inputs=x, scheme=scheme, constants="keep", align=1,
                             inplace=inplace).eval()
    torch.testing.assert_close(result(x), expected)
    assert result.nrfx_plan.grow == [0, 5, 0] and isinstance(result.act, torch.jit.ScriptModule)


class _MostlyOpaque(nn.Module):
    """A small conv stem, then a torch.nn module no rule reads (an fx leaf) holding most of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Bilinear(8, 8, 32)

    def forward(self, x):
        y = self.stem(x).mean((2, 3))
        return self.mix(y, y)


def test_auto_counts_leaves_no_rule_reads_as_opaque():
    """Leaves without a rule (timm's no-trace modules, torch.nn modules nrfx has no rule for) weigh in the choice
    of export as automatic leaves do; the user's own leaf_modules do not (asked for)."""
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(_MostlyOpaque().eval(), x)
        assert analysis.capture == "export"
        assert any("modules without a rule hold" in note for note in analysis.capture_notes)
        assert nrfx.analyze(_MostlyOpaque().eval(), x, leaf_modules=[nn.Bilinear]).capture == "fx"


def test_a_timm_no_trace_block_sends_auto_to_export_where_it_reaches_more():
    """timm's MobileViT blocks are registered no-trace (fx leaves without a rule, most of the parameters): export
    traces them and frees channels fx never saw."""
    timm = pytest.importorskip("timm")
    model, x = timm.create_model("mobilevit_xxs", pretrained=False).eval(), torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto, fx = nrfx.analyze(model, x), nrfx.analyze(model, x, capture="fx")
    assert auto.capture == "export" and fx.capture == "fx" and fx.unknown_ops and not auto.unknown_ops

    def free(a):
        return sum(s.width for s in a.spaces if not s.is_frozen)

    assert free(auto) > 2 * free(fx)


class KeywordCalls(nn.Module):
    """Layers called with their input by keyword (``self.bn(input=x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(input=torch.relu(self.bn(input=self.conv(input=x))).mean((2, 3)))


class FunctionalKeywordCalls(nn.Module):
    """Functional layers, builtins and methods called with their tensors by keyword (``F.conv2d(input=x, weight=w)``,
    ``torch.cat(tensors=...)``, ``y.add(other=z)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
        self.bn, self.inner, self.inner_bn = nn.BatchNorm2d(8), nn.Parameter(torch.randn(8, 8, 3, 3)), nn.BatchNorm2d(8)
        self.head, self.head_bias = nn.Parameter(torch.randn(2, 16)), nn.Parameter(torch.randn(2))

    def forward(self, x):
        y = torch.relu(self.bn(F.conv2d(input=x, weight=self.weight, bias=self.bias, padding=1)))
        z = self.inner_bn(F.conv2d(y, weight=self.inner, padding=1))
        y = torch.cat(tensors=[torch.add(input=y, other=z), y.mul(other=z)], dim=1)
        return F.linear(input=torch.flatten(input=y.mean((2, 3)), start_dim=1), weight=self.head, bias=self.head_bias)


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
@pytest.mark.parametrize("model_class", [KeywordCalls, FunctionalKeywordCalls], ids=["modules", "functions"])
def test_layers_called_with_keyword_inputs_analyse_and_rejuvenate(model_class, scheme):
    """The rules read a layer's input positionally; keyword calls are made positional at capture (they crashed)."""
    torch.manual_seed(0)
    model = model_class().double().eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight[[1, 4]] = 0
            bn.bias[[1, 4]] = 0
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "fx" and not analysis.unknown_ops  # keyword calls sent fx to export or crashed
    (space,) = set(analysis.space_ids(analysis.records["bn"].output))
    assert not analysis.spaces[space].is_frozen
    assert analysis.utilization(analysis.masks_from(model)).live_params < analysis.params
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3, "params"), example_inputs=x, scheme=scheme, align=1)
    assert new.nrfx_plan.grow[space] > 0
    other = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(other), model(other), rtol=1e-9, atol=1e-12)
