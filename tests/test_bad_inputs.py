"""Bad inputs raise a documented nrfx exception that says what to do, and leave the model untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import nrfx
from nrfx.errors import MaskError, NrfxError, ShapeError, TraceError


def _snapshot(model: nn.Module):
    """Every tensor's bytes, dtype and identity, and every module's training flag."""
    state = {k: (v.dtype, v.detach().clone().contiguous().view(-1).view(torch.uint8)) for k, v in
             model.state_dict(keep_vars=True).items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return state, ids, flags, grads


def _assert_untouched(model: nn.Module, snapshot) -> None:
    state, ids, flags, grads = snapshot
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, v in now.items():
        dtype, data = state[k]
        assert v.dtype == dtype and torch.equal(v.detach().contiguous().view(-1).view(torch.uint8), data), k
        assert id(v) == ids[k], k
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


def _mixed_mode_resnet() -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.layer2.eval()  # training flags differ between modules: they must all stay as they are
    return model


@pytest.fixture(scope="module")
def model_and_analysis():
    model = _mixed_mode_resnet()
    return model, nrfx.analyze(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("masks, match", [
    ({"layer9.bn": torch.ones(64, dtype=torch.bool)}, "unknown module 'layer9.bn'.*named_modules"),
    ({"layer1.0.bn": torch.ones(64, dtype=torch.bool)}, "did you mean"),
    ({"bn1": torch.ones(32, dtype=torch.bool)}, r"shape \(32,\), expected \(64,\).*one entry per output channel"),
    ({"bn1": torch.ones(64, 1, dtype=torch.bool)}, r"expected \(64,\)"),
    ({"bn1": torch.ones(64)}, "must be a torch.bool tensor.*got torch.float32"),
    ({"bn1": [True] * 64}, "must be a torch.bool tensor.*got list"),
    ([torch.ones(64, dtype=torch.bool)], r"dict \{module_name: BoolTensor\}"),
])
def test_bad_masks_raise_mask_error(model_and_analysis, masks, match):
    model, analysis = model_and_analysis
    before = _snapshot(model)
    with pytest.raises(MaskError, match=match):
        analysis.utilization(masks)
    with pytest.raises(MaskError):
        analysis.report(masks)
    _assert_untouched(model, before)


def test_mask_on_a_layer_without_channels_warns_and_is_ignored(model_and_analysis):
    _, analysis = model_and_analysis
    with pytest.warns(nrfx.NrfxWarning, match="mask for 'layer1' is ignored"):
        util = analysis.utilization({"layer1": torch.ones(3, dtype=torch.bool)})
    assert util.live_params == analysis.params


def test_masks_that_mark_strong_channels_dead_warn_and_the_paper_masks_do_not():
    """A mask with True for dead (``gamma.abs() < 1e-3``, inverted) marks the live channels dead: rejuvenate would
    remove them and change the function, so the check warns, naming the norm; masks read by the paper's rule, or
    marking only small scales dead, pass quietly."""
    model = _mixed_mode_resnet()
    analysis = nrfx.analyze(model, torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        model.bn1.weight[:8] = 0
    inverted = {"bn1": model.bn1.weight.abs() < 1e-3}
    with pytest.warns(nrfx.NrfxWarning, match=r"mask for 'bn1' marks 56 of 56 dead channels whose scale is far"):
        analysis.utilization(inverted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analysis.utilization(analysis.masks_from(model))
        analysis.utilization({"bn1": model.bn1.weight.abs() >= 0.4 * model.bn1.weight.abs().max()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gamma_raises_mask_error(bad):
    model = _mixed_mode_resnet()
    with torch.no_grad():
        model.layer1[0].bn2.weight[5] = bad
    before = _snapshot(model)
    with pytest.raises(MaskError, match=r"'layer1\.0\.bn2' has non-finite scales.*restore a checkpoint"):
        nrfx.norm_masks(model)
    with pytest.raises(MaskError, match="non-finite"):
        nrfx.analyze(model, torch.randn(2, 3, 64, 64))
    _assert_untouched(model, before)


def test_norm_masks_threshold_must_be_a_fraction():
    with pytest.raises(MaskError, match=r"threshold must be in \[0, 1\)"):
        nrfx.norm_masks(_mixed_mode_resnet(), threshold=2.0)


@pytest.mark.parametrize("inputs, match", [
    (torch.randn(3, 64, 64), r"(?s)node '\w+'.*Pass example_inputs shaped as the model's forward expects"),
    (torch.randn(2, 1, 3, 64, 64), "node 'conv1'"),
    (torch.randn(2, 4, 64, 64), "node 'conv1'"),
    ([1, 3, 64, 64], r"example inputs hold no tensor \(got \[1, 3, 64, 64\]: a shape is not an input\)"),
    ("image", "example_inputs must be a tensor or a tuple of positional arguments"),
])
def test_wrong_example_inputs_raise_shape_error(inputs, match):
    model = _mixed_mode_resnet()
    before = _snapshot(model)
    with pytest.raises(ShapeError, match=match) as info:
        nrfx.analyze(model, inputs)
    message = str(info.value)
    assert "While executing" not in message  # no FX interpreter dump, just the node and the way out
    if "node '" in message:
        assert "resnet.py" in message and "(x)" in message  # the model's own source line
    _assert_untouched(model, before)


class _DataDependentRoot(nn.Module):
    """Control flow on tensor values in the root forward: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.mean() > 0:
            return y.relu()
        return y


def test_untraceable_root_raises_trace_error_with_the_way_out():
    model = _DataDependentRoot()
    before = _snapshot(model)
    with pytest.raises(TraceError) as info:
        nrfx.analyze(model, torch.randn(1, 3, 8, 8), capture="fx")  # "auto" goes on to export, then islands
    message = str(info.value)
    assert "_DataDependentRoot" in message
    assert "test_bad_inputs.py" in message and "if y.mean() > 0" in message  # the offending source line
    assert "leaf_modules" in message and "concrete_args" in message
    _assert_untouched(model, before)


class _Gate(nn.Module):
    """A submodule with data-dependent control flow."""

    def forward(self, x):
        if x.mean() > 0:
            return x * 2
        return x


class _WithUntraceableBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gate = _Gate()
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        return self.c(self.b(self.gate(self.bn(self.a(x)))))


def test_untraceable_submodule_becomes_a_frozen_automatic_leaf():
    model = _WithUntraceableBlock()
    before = _snapshot(model)
    with pytest.warns(nrfx.NrfxWarning, match="automatic leaf") as caught:
        analysis = nrfx.analyze(model, torch.randn(1, 3, 8, 8))
    assert not [w for w in caught if issubclass(w.category, nrfx.UnknownOpWarning)]  # a leaf is no unknown op
    assert not analysis.unknown_ops
    assert list(analysis.auto_leaves) == ["gate"]
    assert "untraceable code" in analysis.auto_leaves["gate"]
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert analysis.macs == 8 * 3 * 9 * 36 + 4 * 8 * 36 + 6 * 4 * 36
    records = analysis.records
    frozen = {s.index for s in analysis.frozen_spaces}
    assert set(analysis.space_ids(records["a"].output)) <= frozen  # the leaf's input space
    assert records["b"].input is None  # the leaf's output is opaque: no channel space to follow
    assert not set(analysis.space_ids(records["b"].output)) & frozen  # b -> c is still free
    report = analysis.report()
    rows = {r.name: r for r in report.rows}
    assert rows["gate"].kind == "leaf"
    assert rows["gate"].frozen.startswith("automatic leaf: untraceable code")
    assert rows["a"].frozen.startswith("out: automatic leaf")  # its input (the image) is free
    assert rows["b"].frozen is None and rows["c"].frozen.startswith("out: reaches the model output")
    assert "automatic leaf gate: untraceable code" in report.summary()
    assert report.to_dict()["auto_leaves"]["gate"].startswith("untraceable code")
    _assert_untouched(model, before)


def test_every_bad_input_error_is_an_nrfx_error():
    for error in (MaskError, ShapeError, TraceError, nrfx.BudgetError, nrfx.PlanError, nrfx.RewriteError):
        assert issubclass(error, NrfxError)


def test_a_lazy_module_not_yet_initialised_is_refused_with_the_fix():
    """A LazyConv2d before its first forward has no shape: analyze and rejuvenate say to run the model once (they
    crashed with torch's 'uninitialized parameter' ValueError); after one forward they work."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LazyConv2d(4, 1))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(nrfx.errors.InputError, match=r"'2.weight' belongs to a lazy module.*model\(x\)"):
        nrfx.analyze(model, x)
    with pytest.raises(nrfx.errors.InputError, match="lazy module"):
        nrfx.rejuvenate(model, None, None, example_inputs=x)
    model(x)
    assert nrfx.analyze(model, x).params == sum(p.numel() for p in model.parameters())
