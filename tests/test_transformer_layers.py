"""torch.nn's transformer stacks (``nn.TransformerEncoder`` / ``TransformerDecoder`` and their layers) under fx.

They are torch.nn built-ins, hence fx leaves, and their forward cannot be traced (it tests tensors to pick a
fused fast path): as leaves they were unknown ops that froze every channel they read, their feed-forward hidden
dims and heads out of reach.  ``nrfx.capture.transformer`` traces a call fx can spell (no masks an encoder must
convert) as the slow path, written with the module's own submodules.  Checked here: fx sees what torch.export
sees (spaces, params, MACs), widening and rejuvenating keep the function (graph and in place, where the user's
module then runs torch's fused fast path on the resized weights), gated FFN hidden dims and heads lose their dead
channels, and calls that stay leaves (masks, a subclass's own forward) stay exact.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nrfx

D, HEADS, FF = 32, 4, 64


class Tokens(nn.Module):
    """conv-bn-relu stem → tokens → a TransformerEncoder (and optionally a TransformerDecoder over learned
    queries) → mean → linear head."""

    def __init__(self, norm_first: bool = False, activation="relu", batch_first: bool = True,
                 decoder: bool = False, final_norm: bool = False, layers: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, D, 3, 2, 1), nn.BatchNorm2d(D), nn.ReLU())
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D) if final_norm else None,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(D, HEADS, 48, dropout=0.1, activation=activation, batch_first=batch_first,
                                       norm_first=norm_first), layers) if decoder else None
        self.queries = nn.Parameter(torch.randn(5, D))
        self.head = nn.Linear(D, 10)
        self.batch_first = batch_first

    def forward(self, x):
        y = self.stem(x).flatten(2).transpose(1, 2)
        y = self.encoder(y if self.batch_first else y.transpose(0, 1))
        if self.decoder is not None:
            q = self.queries.expand(x.shape[0], -1, -1)
            y = self.decoder(q if self.batch_first else q.transpose(0, 1), y)
        return self.head(y.mean(1 if self.batch_first else 0))


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _spaces(analysis) -> list[tuple[int, int, bool]]:
    return sorted((s.width, s.block, s.is_frozen) for s in analysis.spaces)


def _example(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "encoder-decoder"])
def test_fx_opens_the_stack_and_sees_what_export_sees(decoder):
    torch.manual_seed(0)
    model, x = Tokens(decoder=decoder, final_norm=True).double().eval(), _example()
    fx, ex = _quiet(nrfx.analyze, model, x), _quiet(nrfx.analyze, model, x, capture="export")
    assert fx.capture == "fx" and not fx.unknown_ops
    assert (fx.params, fx.macs) == (ex.params, ex.macs)
    assert fx.params == sum(p.numel() for p in model.parameters())
    assert _spaces(fx) == _spaces(ex)
    free = [s.width for s in fx.spaces if not s.is_frozen]
    layers = 4 if decoder else 2
    assert free.count(FF) == 2 and free.count(HEADS) == layers  # every FFN hidden dim, every self-attention's heads
    assert any(s.is_frozen and s.width == D for s in fx.spaces)  # the LayerNorm stream (its statistics couple)


CONFIGS = list(itertools.product([False, True], ["relu", "gelu", F.gelu, nn.GELU()], [True, False], [False, True]))


@pytest.mark.parametrize("norm_first,activation,batch_first,decoder", CONFIGS,
                         ids=[f"{'pre' if n else 'post'}-{a if isinstance(a, str) else type(a).__name__}-"
                              f"{'bf' if b else 'sf'}-{'dec' if d else 'enc'}" for n, a, b, d in CONFIGS])
def test_widening_a_transformer_stack_keeps_the_function(norm_first, activation, batch_first, decoder):
    """Budget × 1.5 at align 4, nr / cr / ca, in the graph and in place (the user's layers, resized, then run
    torch's own forward: its fused fast path under no_grad)."""
    torch.manual_seed(0)
    model = Tokens(norm_first, activation, batch_first, decoder).double().eval()
    x = _example()
    analysis = _quiet(nrfx.analyze, model, x)
    assert not analysis.unknown_ops
    with torch.no_grad():
        expected = model(x)
        for scheme in ("nr", "cr", "ca"):
            new = _quiet(nrfx.rejuvenate, model, None, nrfx.Budget.fraction(1.5), example_inputs=x, scheme=scheme,
                         align=4, analysis=analysis)
            torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
            assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    assert new.get_submodule("encoder.layers.0.linear1").out_features > FF
    _quiet(nrfx.rejuvenate, model, None, nrfx.Budget.fraction(1.5), example_inputs=x, scheme="cr", align=4,
           inplace=True)
    assert model.encoder.layers[0].linear1.out_features > FF
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_gated_hidden_dims_and_heads_lose_their_dead_channels(scheme):
    torch.manual_seed(0)
    model, x = Tokens(activation="gelu", decoder=True, final_norm=True).double().eval(), _example()
    gated = _quiet(nrfx.add_gates, model, x)
    assert {"encoder.layers.0.linear1_gate", "decoder.layers.1.linear1_gate",
            "encoder.layers.1.self_attn.heads_gate", "decoder.layers.0.self_attn.heads_gate"} <= set(gated.nrfx_gates)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path in gated.nrfx_gates:
            weight = gated.get_submodule(path).weight
            weight[torch.rand(weight.shape, generator=gen) < 0.4] = 0
        expected = gated(x)
    new = _quiet(nrfx.rejuvenate, gated, None, None, example_inputs=x, scheme=scheme, align=4)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
    plan = new.nrfx_plan
    assert plan.cost_live < plan.cost_before and plan.cost_after <= plan.budget


class Masked(nn.Module):
    """An encoder given a key padding mask (it converts masks first: stays one leaf call) and a decoder given a
    causal mask with ``tgt_is_causal=True`` (opened; its masked self-attention stays one module call)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, FF, 0.0, batch_first=True), 1,
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, FF, 0.0, batch_first=True), 1)

    def forward(self, src, tgt, pad, causal):
        memory = self.encoder(src, src_key_padding_mask=pad)
        return self.decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True)


def test_masked_calls_stay_leaves_where_fx_cannot_spell_them_and_stay_exact():
    torch.manual_seed(0)
    model = Masked().double().eval()
    src, tgt = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    args = (src, tgt, pad, causal)
    analysis = _quiet(nrfx.analyze, model, args, capture="fx")
    assert set(analysis.unknown_ops) == {"module torch.nn.modules.transformer.TransformerEncoder"}
    assert FF in [s.width for s in analysis.spaces if not s.is_frozen]  # the decoder's FFN
    with torch.no_grad():
        expected = model(*args)
        new = _quiet(nrfx.rejuvenate, model, None, nrfx.Budget.fraction(1.5), example_inputs=args, align=4,
                     capture="fx", analysis=analysis)
        torch.testing.assert_close(new(*args), expected, rtol=1e-9, atol=1e-12)


class OwnForward(nn.TransformerEncoderLayer):
    """A subclass with a forward of its own computes something else: it is not opened (fx traces its forward,
    which reaches torch's untraceable one: an automatic leaf)."""

    def forward(self, src, *args, **kwargs):
        return super().forward(src * 2.0, *args, **kwargs)


def test_a_subclass_with_its_own_forward_stays_a_leaf():
    model = nn.Sequential(nn.Linear(8, D), OwnForward(D, HEADS, FF, 0.0, batch_first=True), nn.Linear(D, 3))
    analysis = _quiet(nrfx.analyze, model.double().eval(), torch.randn(2, 5, 8, dtype=torch.float64), capture="fx")
    assert "1" in analysis.auto_leaves
    assert all(s.is_frozen for s in analysis.spaces if s.width in (D, FF))


def test_an_opened_stack_trains():
    """Dropout in the opened layers follows train / eval; a rejuvenated stack takes a training step."""
    torch.manual_seed(0)
    model, x = Tokens().double(), _example(4)
    new = _quiet(nrfx.rejuvenate, model.eval(), None, nrfx.Budget.fraction(1.5), example_inputs=x, align=4)
    new.train()
    first, second = new(x), new(x)
    assert not torch.equal(first, second)  # dropout is on
    first.sum().backward()
    assert new.get_parameter("encoder.layers.0.linear1.weight").grad is not None
    new.eval()
    torch.testing.assert_close(new(x), new(x))


class Seq2Seq(nn.Module):
    """nn.Transformer, with a causal target mask (``tgt_is_causal=True``) or without masks."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.t = nn.Transformer(D, HEADS, 2, 2, FF, dropout=0.0, batch_first=True)
        self.causal = causal

    def forward(self, src, tgt):
        if not self.causal:
            return self.t(src, tgt)
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=src.dtype)
        return self.t(src, tgt, tgt_mask=mask, tgt_is_causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["no-masks", "causal-target"])
def test_nn_transformer_opens_into_its_encoder_and_decoder(causal):
    """Every FFN hidden dim is free; self-attention heads too, except the decoder's masked ones under fx (its
    causal mask is built by ``triu`` from factories: no channels)."""
    torch.manual_seed(0)
    model = Seq2Seq(causal).double().eval()
    args = (torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64))
    analysis = _quiet(nrfx.analyze, model, args, capture="fx")
    assert not analysis.unknown_ops
    free = [s.width for s in analysis.spaces if not s.is_frozen]
    assert free.count(FF) == 4 and free.count(HEADS) == (2 if causal else 4)
    with torch.no_grad():
        expected = model(*args)
        for scheme in ("nr", "cr", "ca"):
            new = _quiet(nrfx.rejuvenate, model, None, nrfx.Budget.fraction(1.5), example_inputs=args, align=4,
                         scheme=scheme, capture="fx", analysis=analysis)
            torch.testing.assert_close(new(*args), expected, rtol=1e-9, atol=1e-12)
