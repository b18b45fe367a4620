"""Recurrent layers (RNN / LSTM / GRU and their cells) read a channel space through their input weights' columns.

A conv front end followed by a recurrent layer (CRNN text recognisers, speech front ends) rejuvenates the front's
channels: the input weights lose the columns of removed features and read new ones through zero columns, the
hidden size stays.  Closed-form costs, function preservation on random recurrent heads, constant folds into
``bias_ih_l0``, the in-place path (the cuDNN weight list follows) and torch.export's capture are checked here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import kill_per_norm
from torch import nn

import nrfx

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class ConvRecurrent(nn.Module):
    """conv-bn-relu (×depth) over N×C×H×W, the H rows folded into the features, a recurrent layer over W, a linear."""

    def __init__(self, cell: str = "lstm", width: int = 12, depth: int = 1, rows: int = 1, hidden: int = 6,
                 layers: int = 1, bidirectional: bool = False, batch_first: bool = False, bias: bool = True,
                 proj: int = 0, padding: int = 1) -> None:
        super().__init__()
        blocks, channels = [], 2
        for _ in range(depth):
            blocks += [nn.Conv2d(channels, width, 3, padding=padding), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d((rows, None)))
        extra = {"proj_size": proj} if proj else {}
        self.rnn = CELLS[cell](width * rows, hidden, num_layers=layers, bidirectional=bidirectional,
                               batch_first=batch_first, bias=bias, **extra)
        self.batch_first = batch_first
        self.head = nn.Linear((proj or hidden) * (2 if bidirectional else 1), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(1, 2)  # N × C·H × W
        f = f.transpose(1, 2) if self.batch_first else f.permute(2, 0, 1)
        out, _ = self.rnn(f)
        return self.head(out)


class CellLoop(nn.Module):
    """conv-bn-relu over N×C×T, then one recurrent cell stepped over the T positions in the forward."""

    def __init__(self, cell: type[nn.RNNCellBase], steps: int = 5) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(3, 10, 1), nn.BatchNorm1d(10), nn.ReLU())
        self.cell, self.steps = cell(10, 6), steps
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.front(x)
        h = x.new_zeros(x.shape[0], 6)
        c = torch.zeros_like(h)
        for t in range(self.steps):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(f[:, :, t], (h, c))
            else:
                h = self.cell(f[:, :, t], h)
        return self.head(h)


def _quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


# -- the rule: closed-form costs -----------------------------------------------------------------------------
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_input_weights_columns_consume_the_features(cell, bidirectional):
    t, width, hidden, dead = 7, 10, 6, (1, 4, 5)
    model = nn.Sequential(nn.Conv1d(3, width, 1), nn.BatchNorm1d(width), nn.ReLU())
    net = _Seq(model, CELLS[cell](width, hidden, bidirectional=bidirectional))
    a = nrfx.analyze(net, torch.randn(2, 3, t))
    gates, directions = GATES[cell] * hidden, 2 if bidirectional else 1
    fixed_params = directions * (gates * hidden + 2 * gates)  # weight_hh and both biases
    fixed_macs = directions * t * gates * hidden

    def params(w):
        return 3 * w + w + 2 * w + directions * gates * w + fixed_params

    def macs(w):
        return t * 3 * w + directions * t * gates * w + fixed_macs

    assert a.params == sum(p.numel() for p in net.parameters()) == params(width)
    assert a.macs == macs(width)
    mask = torch.ones(width, dtype=torch.bool)
    mask[list(dead)] = False
    u = a.utilization({"front.1": mask})
    assert (u.live_params, u.live_macs) == (params(width - len(dead)), macs(width - len(dead)))
    rnn = a.param_info["rnn.weight_ih_l0"].dims
    assert a.space_ids(rnn[1]) == a.space_ids(a.param_info["front.0.weight"].dims[0])
    assert rnn[0] is None  # the gates: sized by the hidden size, no channel space


class _Seq(nn.Module):
    def __init__(self, front: nn.Module, rnn: nn.Module) -> None:
        super().__init__()
        self.front, self.rnn = front, rnn

    def forward(self, x):
        out, _ = self.rnn(self.front(x).permute(2, 0, 1))
        return out


# -- function preservation ------------------------------------------------------------------------------------
@st.composite
def recurrent_heads(draw):
    cell = draw(st.sampled_from(list(CELLS)))
    return dict(cell=cell, width=draw(st.sampled_from([8, 12, 16])), depth=draw(st.integers(1, 2)),
                rows=draw(st.integers(1, 2)), hidden=draw(st.integers(3, 7)), layers=draw(st.integers(1, 2)),
                bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
                proj=draw(st.sampled_from([0, 2])) if cell == "lstm" else 0)


@settings(max_examples=40, **SETTINGS)
@given(arch=recurrent_heads(), scheme=st.sampled_from(["nr", "cr", "ca"]), align=st.sampled_from([1, 4]),
       batch=st.integers(1, 3), seed=st.integers(0, 50), inplace=st.booleans(), rescale=st.booleans())
def test_rejuvenation_preserves_recurrent_heads(arch, scheme, align, batch, seed, inplace, rescale):
    torch.manual_seed(seed)
    model = ConvRecurrent(**arch).double().eval()
    x = torch.randn(batch, 2, 2 * arch["rows"], 6, dtype=torch.float64)
    analysis = _quiet(nrfx.analyze, model, x)
    kill_per_norm(model, analysis, 0.4, seed=seed, constants=True)
    with torch.no_grad():
        expected = model(x)
    budget = _quiet(nrfx.analyze, model, x).params
    new = _quiet(nrfx.rejuvenate, model, None, None, example_inputs=x, scheme=scheme, align=align,
                 constants="keep", inplace=inplace, rescale=rescale)
    with torch.no_grad():
        got = new(x)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9 * max(1.0, expected.abs().max().item()))
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget == budget
    rnn = new.get_submodule("rnn")
    assert rnn.input_size == rnn.weight_ih_l0.shape[1]
    names = rnn._flat_weights_names
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, names, strict=True))


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_a_cell_stepped_in_the_forward_reads_the_space_at_every_step(cell):
    torch.manual_seed(0)
    model = CellLoop(cell).double().eval()
    x = torch.randn(3, 3, 5, dtype=torch.float64)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=2, constants=True)
    expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="cr", align=1, constants="keep")
    torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
    width = new.get_submodule("front.0").out_channels
    assert new.get_submodule("cell").weight_ih.shape[1] == new.get_submodule("cell").input_size == width


# -- constants of removed channels ------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_constants_of_removed_features_fold_into_bias_ih(cell, bidirectional):
    torch.manual_seed(1)
    model = ConvRecurrent(cell, width=16, bidirectional=bidirectional, padding=0).double().eval()
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=3, constants=True)
    with torch.no_grad():
        model.features[1].bias.abs_()  # every dead channel emits relu(β) > 0 into the recurrent layer
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)  # constants="drop" (the default) warns of what it drops
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="nr", align=1)
    torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
    assert new.get_submodule("features.0").out_channels < 16 + 1
    assert any("bias_ih_l0" in note for note in new.nrfx_plan.notes)


def test_a_recurrent_layer_without_biases_cannot_hold_them():
    torch.manual_seed(1)
    model = ConvRecurrent("gru", width=16, bias=False, padding=0).double().eval()
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=3, constants=True)
    with torch.no_grad():
        model.features[1].bias.abs_()
    expected = model(x)
    with pytest.warns(nrfx.NrfxWarning, match="rnn cannot absorb"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, align=1)
    kept = nrfx.rejuvenate(model, None, None, example_inputs=x, align=1, constants="keep")
    torch.testing.assert_close(kept(x), expected, rtol=1e-9, atol=1e-12)


# -- in place, with the optimizer, and under torch.export ------------------------------------------------------
def test_in_place_the_layer_trains_on_with_its_optimizer():
    torch.manual_seed(0)
    model = ConvRecurrent("lstm", width=16, bidirectional=True, layers=2)
    x = torch.randn(3, 2, 4, 6)
    kill_per_norm(model, nrfx.analyze(model, x), 0.5, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, scheme="cr", align=4)
    assert model.rnn.weight_ih_l0.shape[1] == model.rnn.input_size == model.features[0].out_channels
    columns = next(d for d in model.nrfx_param_map["rnn.weight_ih_l0"].dims if d.dim == 1)
    assert (columns.source < 0).any()  # new features, read through zero columns
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(w) in held for w in model.rnn._flat_weights)
    model.train()
    before = model.rnn.weight_ih_l0.detach().clone()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.rnn.weight_ih_l0, before)  # the layer reads the parameters the optimizer steps


@pytest.mark.parametrize("arch", [dict(cell="lstm", proj=2, batch_first=True),
                                  dict(cell="lstm", bidirectional=True, layers=2), dict(cell="gru")],
                         ids=["lstm-proj", "lstm-bidirectional", "gru"])
@pytest.mark.parametrize("inplace", [False, True])
def test_export_raises_a_recurrent_run_to_its_module_and_its_elements(arch, inplace):
    """torch.export's run of an LSTM ends in elements of the aten op's (out, h, c), which the module returns as
    (out, (h, c)): the run becomes the module call and each element is read along its path; the analysis then
    equals fx's (MACs too) and the rewrite keeps the function, in place too."""
    torch.manual_seed(0)
    model = ConvRecurrent(**arch).double().eval()
    x = torch.randn(3, 2, 4, 6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.UnknownOpWarning)
        exported = nrfx.analyze(model, x, capture="export")
    assert exported.capture == "export"
    assert [n.target for n in exported.gm.graph.nodes if n.op == "call_module"][-2:] == ["rnn", "head"]
    traced = nrfx.analyze(model, x)
    assert (exported.macs, exported.params, len(exported.spaces)) == (traced.macs, traced.params, len(traced.spaces))
    kill_per_norm(model, exported, 0.4, seed=1, constants=True)
    with torch.no_grad():
        expected = model(x)
    new = _quiet(nrfx.rejuvenate, model, None, None, example_inputs=x, capture="export", scheme="cr", align=1,
                 constants="keep", inplace=inplace)
    torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
    columns = next(d for d in new.nrfx_param_map["rnn.weight_ih_l0"].dims if d.dim == 1)
    assert (columns.source < 0).any()


def test_an_exported_recurrent_layer_with_a_given_state_stays_an_aten_op():
    """A run reading two tensors from outside (the input and an initial state) is not raised: the aten op stays,
    an unknown op, its channels frozen, its MACs counted (its state made on the CPU is measured on meta)."""
    torch.manual_seed(0)
    model = _WithState().eval()
    x = torch.randn(2, 3, 6)
    with pytest.warns(nrfx.UnknownOpWarning, match="gru"):
        analysis = nrfx.analyze(model, x, capture="export")
    assert analysis.macs == nrfx.analyze(model, x).macs
    assert _quiet(nrfx.analyze, model, x, capture="islands").macs == analysis.macs


class _WithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU())
        self.rnn = nn.GRU(8, 5, batch_first=True)

    def forward(self, x):
        h0 = torch.full((1, x.shape[0], 5), 0.1)
        out, _ = self.rnn(self.front(x).transpose(1, 2), h0)
        return out
