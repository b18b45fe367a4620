"""Front-door inputs nrfx cannot work on end in an InputError (or MaskError) that says what to pass instead."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import nrfx


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(("model", "match"), [
    (lambda: (lambda t: t), "torch.nn.Module"),
    (lambda: torch.jit.script(_net()), "TorchScript"),
])
@pytest.mark.parametrize("call", ["analyze", "rejuvenate"])
def test_not_an_eager_module(model, match, call):
    with pytest.raises(nrfx.InputError, match=match):
        if call == "analyze":
            nrfx.analyze(model(), X)
        else:
            nrfx.rejuvenate(model(), None, None, example_inputs=X)


@pytest.mark.parametrize(("example", "match"), [
    (X[:0], "empty batch"),
    ((X, X), "takes 1 positional"),
    (X.double(), "float64 but the model's parameters are torch.float32"),
])
def test_inputs_the_forward_does_not_take(example, match):
    with pytest.raises(nrfx.InputError, match=match):
        nrfx.analyze(_net(), example)
    with pytest.raises(nrfx.InputError, match=match):
        nrfx.rejuvenate(_net(), None, None, example_inputs=example)


def test_meta_model_analyses_but_does_not_rejuvenate():
    model = _net().to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nrfx.analyze(model, X.to("meta")).params == sum(p.numel() for p in _net().parameters())
    with pytest.raises(nrfx.InputError, match="meta device"):
        nrfx.rejuvenate(model, None, None, example_inputs=X.to("meta"))


def test_mask_keys_are_module_names():
    with pytest.raises(nrfx.MaskError, match="module names"):
        nrfx.rejuvenate(_net(), {1: torch.ones(16, dtype=torch.bool)}, None, example_inputs=X)


def test_forward_hooks_do_not_fire_during_rejuvenate():
    model, calls = _net(), []
    with torch.no_grad():
        model[1].weight[:6] = 0
        model[1].bias[:6] = 0.5  # dead channels with a constant: the fold is measured on a forward
    for m in model.modules():
        m.register_forward_hook(lambda *args: calls.append(1))
        m.register_forward_pre_hook(lambda *args: calls.append(1))
    new = nrfx.rejuvenate(model, None, None, example_inputs=X, align=1)
    assert new.nrfx_plan.folds and not calls


def test_hooks_silenced_keeps_torch_parametrisation_hooks_and_restores_the_users():
    from nrfx.capture.guards import hooks_silenced

    model = _net()
    model[0] = nn.utils.weight_norm(model[0])  # torch's own pre-hook recomputes the weight: part of the forward
    calls = []
    model[5].register_forward_hook(lambda *args: calls.append("user"))
    with hooks_silenced(model):
        assert len(model[0]._forward_pre_hooks) == 1 and not model[5]._forward_hooks
        model[5].register_forward_hook(lambda *args: calls.append("inside"))
        with torch.no_grad():
            model[0].weight_g.mul_(2)
            out = model(X)
    assert calls == ["inside"] and len(model[5]._forward_hooks) == 1  # the user's hook is back, ours is gone
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)  # the weight was recomputed inside the block too
    assert calls == ["inside", "user"]


def test_forward_hooks_do_not_fire_during_export_capture():
    model, calls = _net(), []
    for m in model.modules():
        m.register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, X, capture="export")
    assert analysis.capture == "export" and not calls
    assert all(len(m._forward_hooks) == 1 for m in model.modules())  # the user's hooks are back


@pytest.mark.parametrize("wrap", [
    lambda conv: nn.utils.weight_norm(conv),
    lambda conv: nn.utils.spectral_norm(conv),
    lambda conv: nn.utils.parametrizations.weight_norm(conv),
])
def test_computed_weights_are_refused_not_resized_silently(wrap):
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model[0] = wrap(model[0])
        with torch.no_grad():
            model[1].weight[:6] = 0
        with pytest.raises(nrfx.InputError, match="computes its weight"):
            nrfx.rejuvenate(model, None, None, example_inputs=X, align=1)
        nrfx.analyze(model, X)  # analysing is fine: shapes and costs do not depend on how the weight is made


def test_a_pruning_mask_is_refused_naming_prune_remove_and_rejuvenates_once_made_permanent():
    model = _net().eval()
    with torch.no_grad():
        model[1].weight[:6] = 0
    prune.l1_unstructured(model[0], "weight", 0.3)
    prune.ln_structured(model[0], "weight", amount=0.25, n=2, dim=0)  # a PruningContainer of two methods
    prune.random_unstructured(model[0], "bias", 0.5)
    with pytest.raises(nrfx.InputError, match=r"prune.remove\(module, 'weight'\), torch.nn.utils.prune.remove"
                                              r"\(module, 'bias'\)") as error:
        nrfx.rejuvenate(model, None, None, example_inputs=X, align=1)
    assert "module '0'" in str(error.value) and "bias = bias_orig * bias_mask" in str(error.value)
    expected = model(X)
    for name in ("weight", "bias"):
        prune.remove(model[0], name)
    result = nrfx.rejuvenate(model, None, None, example_inputs=X, align=1).eval()
    torch.testing.assert_close(result(X), expected)


def test_the_driver_refuses_computed_weights_at_construction():
    model = _net()
    model[0] = nn.utils.parametrizations.weight_norm(model[0])
    with pytest.raises(nrfx.InputError, match="computes its weight"):
        nrfx.NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.1), example_inputs=X)
