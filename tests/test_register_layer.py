"""nrfx.register_layer: a layer nrfx has never seen is analysed *and* rewritten, with its own attributes kept true.

Properties: random widths, dead sets and budgets keep the function (fx and export); the registered
``fix`` keeps the layer's size attribute equal to its weight; a registered scale layer is a
liveliness signal whose new channels start at γ0; a ``check`` that fails names the module; and
``unregister_layer`` takes it all back.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from support import zero_scales
from torch import nn

import nrfx
from nrfx.analysis.rules.layers import gate, linear_module
from nrfx.errors import RewriteError
from nrfx.ops.layer_kinds import is_scale, layer_kind


class Dense(nn.Module):
    """A from-scratch linear layer whose forward reads its width attribute."""

    def __init__(self, inputs: int, units: int) -> None:
        super().__init__()
        self.units = units
        self.weight = nn.Parameter(torch.randn(units, inputs) / inputs**0.5)
        self.bias = nn.Parameter(torch.randn(units) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias.expand(x.shape[0], self.units), x, self.weight.t())


class Scale(nn.Module):
    """A per-channel scale of its own (no bias): a liveliness signal once registered with ``scale=True``."""

    dim = 1

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.weight.view(1, self.channels)


def _fix_dense(layer: Dense) -> None:
    layer.units = layer.weight.shape[0]


def _check_dense(layer: Dense) -> str | None:
    return None if layer.bias.shape == (layer.units,) else f"bias {tuple(layer.bias.shape)} vs units={layer.units}"


def _fix_scale(layer: Scale) -> None:
    layer.channels = layer.weight.numel()


@pytest.fixture
def registered():
    """Dense and Scale registered for one test, then taken back."""
    nrfx.register_layer(Dense, rule=linear_module, fix=_fix_dense, check=_check_dense,
                        constant_passes=lambda layer: None)
    nrfx.register_layer(Scale, rule=gate, fix=_fix_scale, scale=True)
    yield
    nrfx.unregister_layer(Dense)
    nrfx.unregister_layer(Scale)


def _net(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Dense(5, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), Dense(hidden, hidden), Scale(hidden),
                         nn.ReLU(), Dense(hidden, 3)).eval()


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize(("hidden", "fraction", "budget", "seed"),
                         [(12, 0.25, 1.0, 0), (16, 0.5, 2.0, 1), (9, 0.4, 1.5, 2), (24, 0.3, 0.8, 3)])
def test_registered_layers_are_rewritten_and_keep_the_function(registered, capture, hidden, fraction, budget, seed):
    net = _net(hidden, seed)
    zero_scales(net, fraction, seed, shifts=True)
    x = torch.randn(6, 5)
    analysis = nrfx.analyze(net, x, capture=capture)
    dead = round(fraction * hidden)
    assert analysis.utilization().live_params < analysis.params
    assert sum((~a).sum().item() for a in analysis.alive()) >= dead  # both scales are read as signals
    new = nrfx.rejuvenate(net, None, nrfx.Budget.fraction(budget), example_inputs=x, analysis=analysis, align=1)
    torch.testing.assert_close(new(x), net(x))
    torch.testing.assert_close(new(x[:2]), net(x[:2]))  # another batch size
    assert sum(new.nrfx_plan.grow) > 0  # new channels were added (and the dead ones removed)
    for layer in new.modules():
        if isinstance(layer, Dense):
            assert layer.units == layer.weight.shape[0] == layer.bias.shape[0]
        if isinstance(layer, Scale):
            assert layer.channels == layer.weight.numel()


def test_a_registered_scale_is_a_liveliness_signal_whose_new_channels_start_at_gamma0(registered):
    net = _net(8, 0)
    with torch.no_grad():
        net[4].weight[:3] = 0
    assert is_scale(net[4]) and "4" in nrfx.norm_masks(net)
    x = torch.randn(4, 5)
    new = nrfx.rejuvenate(net, None, nrfx.Budget.fraction(2.0), example_inputs=x, gamma0=0.75, align=1)
    scale = next(m for m in new.modules() if isinstance(m, Scale))
    survivors = int((net[4].weight != 0).sum())
    assert scale.weight.numel() > 8
    assert bool((scale.weight[survivors:] == 0.75).all())  # [S, R] order: the R entries start at γ0
    torch.testing.assert_close(new(x), net(x))


def test_a_failing_check_names_the_module(registered):
    nrfx.register_layer(Dense, rule=linear_module, check=_check_dense)  # no fix: units go stale
    net = _net(8, 0)
    zero_scales(net, 0.25, 0, shifts=True)
    with pytest.raises(RewriteError, match=r"rewritten module '0' \(Dense\) is inconsistent: bias \(\d+,\) vs units=8"):
        nrfx.rejuvenate(net, None, nrfx.Budget.fraction(2.0), example_inputs=torch.randn(4, 5), align=1)


def test_unregister_takes_the_layer_back(registered):
    nrfx.unregister_layer(Dense)
    assert layer_kind(Dense(2, 2)) is None
    net = nn.Sequential(Dense(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[1].weight[:3] = 0
    with pytest.warns(nrfx.UnknownOpWarning):  # traced into: addmm of a computed weight (weight.t()) is unknown
        assert nrfx.analyze(net, torch.randn(4, 5)).utilization().r_params == 1.0


@pytest.mark.parametrize("bad", [dict(kind=int), dict(kind=Dense, fix=3), dict(kind=Dense, rule="linear")])
def test_bad_registrations_are_type_errors(bad):
    kind = bad.pop("kind")
    with pytest.raises(TypeError, match="register_layer"):
        nrfx.register_layer(kind, **bad)
    assert layer_kind(Dense(2, 2)) is None


def _constant_net(hidden: int, dead: int, seed: int) -> nn.Sequential:
    """Linear → BatchNorm1d with ``dead`` channels at γ = 0, β ≠ 0 (each a constant) and small live γ → Dense."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, hidden), nn.BatchNorm1d(hidden), Dense(hidden, 3)).eval()
    with torch.no_grad():
        chosen = torch.randperm(hidden)[:dead]
        net[1].weight.uniform_(0.001, 0.01)  # below γ0: neural rescaling raises them
        net[1].weight[chosen] = 0
        net[1].bias[chosen] = torch.rand(dead) + 0.5
    return net


@pytest.mark.parametrize(("hidden", "dead", "seed"), [(16, 6, 0), (9, 2, 1), (24, 11, 2)])
def test_constants_of_removed_channels_reach_a_registered_layer(hidden, dead, seed):
    """Dead channels emitting β reach a registered layer: measured there (its rule reads channels as a linear's
    does); folded into its bias when ``constant_passes`` says it can, else a warning naming it (or kept with
    constants='keep'); never dropped silently."""
    net, x = _constant_net(hidden, dead, seed), torch.randn(8, 5)
    budget = nrfx.Budget.fraction(1.0)
    try:
        nrfx.register_layer(Dense, rule=linear_module, fix=_fix_dense)
        with pytest.warns(nrfx.NrfxWarning, match="2 cannot absorb exactly"):
            nrfx.rejuvenate(net, None, budget, example_inputs=x, align=1)
        kept = nrfx.rejuvenate(net, None, budget, example_inputs=x, align=1, constants="keep")
        torch.testing.assert_close(kept(x), net(x))
        nrfx.register_layer(Dense, rule=linear_module, fix=_fix_dense, constant_passes=lambda layer: None)
        folded = nrfx.rejuvenate(net, None, budget, example_inputs=x, align=1)
        assert "fold: constants of removed inputs of 2 added to its bias" in folded.nrfx_plan.notes
        assert folded.get_submodule("2").weight.shape[1] == len(folded.nrfx_plan.keep[0]) + folded.nrfx_plan.grow[0]
        torch.testing.assert_close(folded(x), net(x))
    finally:
        nrfx.unregister_layer(Dense)


def test_in_columns_lets_rescaling_fold_into_a_registered_layer():
    """``in_columns``: weight[:, j] reads input channel j, so neural rescaling divides those columns (exact);
    without it the norm is left as it is, with a note."""
    net, x = _constant_net(12, 4, 3), torch.randn(8, 5)
    try:
        for columns, note in ((None, "rescale skipped at 1"), (lambda layer: True, "rescale: 1 norms rescaled")):
            nrfx.register_layer(Dense, rule=linear_module, fix=_fix_dense, constant_passes=lambda layer: None,
                                in_columns=columns)
            new = nrfx.rejuvenate(net, None, nrfx.Budget.fraction(1.5), example_inputs=x, align=1, rescale=True)
            assert any(n.startswith(note) for n in new.nrfx_plan.notes), new.nrfx_plan.notes
            torch.testing.assert_close(new(x), net(x))
            gamma = next(m for m in new.modules() if isinstance(m, nn.BatchNorm1d)).weight
            assert bool((gamma.abs() >= 1).all()) == (columns is not None)  # rescaled up to γ0 = 1 where it folds
    finally:
        nrfx.unregister_layer(Dense)


class Readout(nn.Module):
    """A layer whose input enters through ``w_in`` / ``b_in`` (not ``weight`` / ``bias``), as an RNN's ``weight_ih``."""

    def __init__(self, inputs: int, units: int) -> None:
        super().__init__()
        self.input_size = inputs
        self.w_in = nn.Parameter(torch.randn(units, inputs) / inputs**0.5)
        self.b_in = nn.Parameter(torch.randn(units) * 0.1)

    def forward(self, x):
        return torch.tanh(nn.functional.linear(x, self.w_in, self.b_in))


def test_projections_say_where_a_constant_input_folds():
    """The built-in recurrent rule reads the columns of every ``projections`` weight; the constants of removed
    inputs fold into the paired bias (exact), with no warning."""
    from nrfx.analysis.rules.layers import recurrent

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), Readout(12, 4)).eval()
    with torch.no_grad():
        net[1].weight[:5] = 0
        net[1].bias[:5] = torch.rand(5) + 0.5
    x = torch.randn(8, 5)

    def fix(layer: Readout) -> None:
        layer.input_size = layer.w_in.shape[1]

    try:
        nrfx.register_layer(Readout, rule=recurrent, fix=fix, constant_passes=lambda layer: None,
                            projections=lambda layer: (("w_in", "b_in"),))
        with warnings.catch_warnings():
            warnings.simplefilter("error", nrfx.NrfxWarning)
            folded = nrfx.rejuvenate(net, None, nrfx.Budget.fraction(1.0), example_inputs=x, align=1)
        assert "fold: constants of removed inputs of 2 added to its b_in" in folded.nrfx_plan.notes
        layer = folded.get_submodule("2")
        assert layer.w_in.shape[1] == layer.input_size == folded.get_submodule("0").out_features
        torch.testing.assert_close(folded(x), net(x))
    finally:
        nrfx.unregister_layer(Readout)


def test_a_rule_that_does_not_fit_its_layer_is_an_error_naming_rule_node_and_way_out():
    """Registered without ``projections``, the recurrent rule reads ``weight``, which Readout lacks: a RuleError
    naming the rule, the node, the layer and what to do (not a bare AttributeError from inside nrfx)."""
    from nrfx.analysis.rules.layers import recurrent

    net = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), Readout(12, 4)).eval()
    try:
        nrfx.register_layer(Readout, rule=recurrent)
        with pytest.raises(nrfx.RuleError, match=r"rule nrfx\.analysis\.rules\.layers\.recurrent failed on node "
                                                 r"'.*' \(call_module 2\).*Readout.*AttributeError.*"
                                                 r"nrfx\.unregister_layer") as caught:
            nrfx.analyze(net, torch.randn(8, 5))
        assert isinstance(caught.value.__cause__, AttributeError)
    finally:
        nrfx.unregister_layer(Readout)
    assert nrfx.analyze(net, torch.randn(8, 5)).macs > 0  # unregistered: analysed through the layer
