"""Subclasses of the built-in layers, as model code writes them (a custom init, a weight standardised in place).

Properties: a subclass that computes what its base computes (it overrides construction or printing only) is read
as its base: a leaf under fx, its norms monitored, its convs split by cr/ca (and given back as its own class by
``to_dense``, its own parameters with it), the function kept; a subclass that overrides a method of its base's
computation (``_conv_forward``), computes its weight in a property, or whose instance holds its own ``forward`` is
not read as its base, under fx nor torch.export: its channels freeze and the function is kept.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from support import kill_per_norm
from torch import nn

import nrfx
from nrfx.layers.srlayers import SR_LAYERS, SRConv2d, make_sr, to_dense


class _InitConv(nn.Conv2d):
    """A conv with its own initialisation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        nn.init.kaiming_normal_(self.weight)


class _InitNorm(nn.BatchNorm2d):
    """A BatchNorm2d with another eps: torch's forward, which fx cannot trace into (it checks the input's rank)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-3)

    def extra_repr(self) -> str:
        return f"{self.num_features}, own eps"


class _InitLinear(nn.Linear):
    pass


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation written in ``_conv_forward`` (``forward`` inherited): removing an input channel changes
    every filter's mean and deviation, so this is not a conv whose input channels can be cut."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, weight, bias)


def _net(conv: type, norm: type, linear: type, middle: type | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(conv(3, 16, 3, padding=1), norm(16), nn.ReLU(), (middle or conv)(16, 32, 3, padding=1),
                         norm(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(32, 24), nn.ReLU(),
                         linear(24, 4)).double().eval()


def _rejuvenated(model: nn.Module, x: torch.Tensor, scheme: str, capture: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        return nrfx.rejuvenate(model, None, None, example_inputs=(x,), scheme=scheme, align=1, constants="keep",
                               capture=capture)


def _relative_error(new: nn.Module, model: nn.Module) -> float:
    y = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        return float((new(y) - model(y)).abs().max() / model(y).abs().max())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_subclass_that_keeps_its_bases_computation_is_read_as_its_base(capture):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model, plain = _net(_InitConv, _InitNorm, _InitLinear), _net(nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)  # no automatic leaf
        analysis = nrfx.analyze(model, x, capture=capture)
    reference = nrfx.analyze(plain, x, capture=capture)
    assert analysis.capture == capture and not analysis.auto_leaves and not analysis.unknown_ops
    assert analysis.coverage().monitored == reference.coverage().monitored > 0.5  # before (fx): 0, the norms leaves
    assert (analysis.params, analysis.macs) == (reference.params, reference.macs)
    kill_per_norm(model, analysis, 0.4, seed=1)
    for scheme in ("nr", "cr", "ca"):
        new = _rejuvenated(model, x, scheme, capture)
        assert _relative_error(new, model) < 1e-12, scheme
        split = [m for m in new.modules() if isinstance(m, SR_LAYERS)]
        assert bool(split) == (scheme != "nr"), scheme  # before: cr and ca left the subclassed convs plain


def test_an_sr_layer_made_from_a_subclass_gives_its_class_back():
    torch.manual_seed(0)
    layer = _InitConv(8, 6, 3, padding=1)
    for scheme in ("cr", "ca"):
        split = make_sr(layer, scheme, 5, 4)
        assert isinstance(split, SRConv2d)
        dense = to_dense(split)
        assert type(dense) is _InitConv and not hasattr(dense, "nrfx_dense_class")
        kept = layer.weight.clone()
        if scheme == "cr":  # cr keeps the diagonal blocks only
            kept[:4, 5:] = 0
            kept[4:, :5] = 0
        torch.testing.assert_close(dense.weight, kept)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_subclass_that_changes_its_bases_computation_is_not_read_as_its_base(capture):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    model = _net(nn.Conv2d, nn.BatchNorm2d, nn.Linear, middle=_StandardisedConv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        analysis = nrfx.analyze(model, x, capture=capture)
    assert any("conv2d with a computed weight" in op for op in analysis.unknown_ops)
    kill_per_norm(model, analysis, 0.4, seed=1)
    for scheme in ("nr", "cr", "ca"):
        assert _relative_error(_rejuvenated(model, x, scheme, capture), model) < 1e-12, scheme  # before: 0.12-0.28


def _shifted_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x + 1.0, self.weight, self.bias)  # not what a conv computes: x + 1 reads dead channels


class _InstanceForwardConv(nn.Conv2d):
    """Its forward set on the instance, as wrappers patch ``module.forward``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forward = types.MethodType(_shifted_forward, self)


class _PropertyWeightConv(nn.Conv2d):
    """A hand-written weight norm: ``weight`` a property over a direction and a gain."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.v = nn.Parameter(self._parameters.pop("weight").detach().clone())
        self.g = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    @property
    def weight(self) -> torch.Tensor:
        return self.g * self.v / torch.linalg.vector_norm(self.v, dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("middle", ["instance_forward", "patched_forward", "property_weight"])
def test_a_layer_whose_instance_or_property_changes_the_computation_is_not_read_as_its_base(middle, capture):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    layer = {"instance_forward": _InstanceForwardConv, "patched_forward": nn.Conv2d,
             "property_weight": _PropertyWeightConv}[middle]
    model = _net(nn.Conv2d, nn.BatchNorm2d, nn.Linear, middle=layer)
    if middle == "patched_forward":
        model[3].forward = types.MethodType(_shifted_forward, model[3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        analysis = nrfx.analyze(model, x, capture=capture)
    kill_per_norm(model, analysis, 0.4, seed=1)
    for scheme in ("nr", "cr", "ca"):  # before: 0.26 relative error (forward), a RewriteError (property)
        assert _relative_error(_rejuvenated(model, x, scheme, capture), model) < 1e-12, scheme


class _ScaledLinear(nn.Linear):
    """A linear with a parameter of its own, one per output feature, that the parent reads."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__(features_in, features_out)
        self.scale = nn.Parameter(torch.rand(features_out) + 0.5)


class _ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.n1 = nn.Linear(12, 24), nn.BatchNorm1d(24)
        self.l2, self.n2 = _ScaledLinear(24, 24), nn.BatchNorm1d(24)
        self.l3 = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.n1(self.l1(x)))
        return self.l3(torch.relu(self.n2(self.l2(x) * self.l2.scale)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_subclasss_own_parameter_is_kept_split_or_not_and_grows_with_zeros(capture):
    torch.manual_seed(0)
    model = _ScaledNet().double().eval()
    with torch.no_grad():
        for norm in (model.n1, model.n2):
            norm.weight[::3] = 0
            norm.bias[::3] = 0
    x = torch.randn(4, 12, dtype=torch.float64)
    for scheme in ("nr", "cr", "ca"):
        new = _rejuvenated(model, x, scheme, capture)  # before: cr/ca lost l2.scale (the graph could not be built)
        scale = dict(new.named_parameters())["l2.scale"]
        assert scale.shape[0] > 16 and torch.isfinite(scale).all()  # grown; before: new entries torch.empty
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-12)
        if scheme != "nr":
            assert isinstance(new.get_submodule("l2"), SR_LAYERS)
