"""Property: random attention stacks with random dead heads keep their function through every rejuvenation.

Drawn per example: the head count H and head dim d, grouped-query attention (kv heads H / r, repeated or
``enable_gqa``) or not, the attention form (fused timm qkv, separate HF projections with SDPA or matmul,
``nn.MultiheadAttention``), one or two blocks with an MLP and residuals, the capture, which heads (and MLP
channels) are dead in each gate, the scheme, the budget, ``align`` and the batch size of the check (other
than the example's).  Checked: the rewritten model computes what the gated model computes (float64), the
user's model is untouched, and head counts stay whole groups.  (One kv head, multi-query attention, stays
frozen: not drawn.)  A second property draws random torchvision Swins (V1, V2), opened head by head.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import nrfx

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOKENS = 5


class Attention(nn.Module):
    """One attention of H heads of d channels over C = H·d, in one of the drawn forms."""

    def __init__(self, heads: int, d: int, kv_heads: int, form: str) -> None:
        super().__init__()
        c = heads * d
        self.h, self.d, self.kv, self.form = heads, d, kv_heads, form
        if form == "fused":
            self.qkv = nn.Linear(c, 3 * c)
        elif form == "mha":
            self.mha = nn.MultiheadAttention(c, heads, batch_first=True)
        else:
            self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, kv_heads * d), nn.Linear(c, kv_heads * d)
        self.o = nn.Linear(c, c)

    def _repeat(self, t):
        r = self.h // self.kv
        return t if r == 1 else t[:, :, None].expand(t.shape[0], self.kv, r, t.shape[2], self.d).reshape(
            t.shape[0], self.h, t.shape[2], self.d)

    def forward(self, x):
        B, T, C = x.shape
        if self.form == "mha":
            return self.o(self.mha(x, x, x, need_weights=False)[0])
        if self.form == "fused":
            q, k, v = self.qkv(x).reshape(B, T, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (f(x).view(B, T, -1, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.form == "gqa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.form == "matmul":
            k, v = self._repeat(k), self._repeat(v)
            out = (q @ k.transpose(-2, -1) * self.d ** -0.5).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v))
        return self.o(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, heads: int, d: int, kv_heads: int, form: str, hidden: int) -> None:
        super().__init__()
        c = heads * d
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(c), Attention(heads, d, kv_heads, form), nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Stack(nn.Module):
    def __init__(self, blocks: list[Block], c: int) -> None:
        super().__init__()
        self.inp, self.blocks, self.out = nn.Linear(6, c), nn.Sequential(*blocks), nn.Linear(c, 3)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


@st.composite
def stacks(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    d = draw(st.sampled_from([2, 4, 8]))
    form = draw(st.sampled_from(["fused", "separate", "matmul", "gqa", "mha"]))
    r = draw(st.sampled_from([r for r in (1, 2, 4) if heads // r >= 2])) if form in ("separate", "matmul", "gqa") else 1
    if form == "gqa" and r == 1:
        form = "separate"
    depth = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 100))
    hidden = [draw(st.sampled_from([8, 12, 16])) for _ in range(depth)]
    note(f"heads {heads}, d {d}, r {r}, form {form}, depth {depth}, seed {seed}, hidden {hidden}")
    torch.manual_seed(seed)
    blocks = [Block(heads, d, heads // r, form, width) for width in hidden]
    return Stack(blocks, heads * d).double().eval(), r, form


def _kill(gated: nn.Module, data) -> None:
    """Random entries of every gate zero, drawn per gate (at least one entry left alive)."""
    with torch.no_grad():
        for path in gated.nrfx_gates:
            weight = gated.get_submodule(path).weight
            dead = data.draw(st.lists(st.booleans(), min_size=weight.numel(), max_size=weight.numel()))
            dead[data.draw(st.integers(0, weight.numel() - 1))] = False
            weight[torch.tensor(dead)] = 0


@settings(max_examples=40, **SETTINGS)
@given(st.data())
def test_random_attention_stacks_keep_their_function(data):
    model, r, form = data.draw(stacks())
    capture = data.draw(st.sampled_from(["export"] if form in ("matmul", "separate") and r > 1 else ["fx", "export"]))
    event(f"{form}, r={r}, {capture}")
    x = torch.randn(2, TOKENS, 6, dtype=torch.float64)
    other = torch.randn(data.draw(st.sampled_from([1, 3, 4])), TOKENS, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gated = nrfx.add_gates(model, x, capture=capture)
    head_gates = [g for g in gated.nrfx_gates if g.endswith("heads_gate")]
    assert len(head_gates) == len(model.blocks)
    _kill(gated, data)
    note(f"capture {capture}, gates {[gated.get_submodule(g).weight.tolist() for g in gated.nrfx_gates]}")
    scheme = data.draw(st.sampled_from(["nr", "cr", "ca"]))
    align = data.draw(st.sampled_from([1, 8]))
    with torch.no_grad():
        want = gated(other)
        analysis = nrfx.analyze(gated, x, capture=capture)
        live = nrfx.Budget(params=analysis.utilization().live_params)  # under align 1: every dead channel goes
        for budget in (live if align == 1 else nrfx.Budget.fraction(1.0), nrfx.Budget.fraction(1.3)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = nrfx.rejuvenate(gated, None, budget, example_inputs=x, capture=capture, scheme=scheme,
                                      align=align, analysis=analysis)
            note(f"budget {budget}, scheme {scheme}, align {align}, batch {other.shape[0]}")
            torch.testing.assert_close(new(other), want, rtol=1e-9, atol=1e-10)
            for path in head_gates:
                count = new.get_submodule(path).weight.numel()
                assert count % r == 0  # whole groups of query heads per kv head
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@st.composite
def swins(draw):
    """A random torchvision Swin (V1 or V2) of two stages and the input size / batch of its check."""
    swin = __import__("torchvision.models.swin_transformer", fromlist=["SwinTransformer"])
    v2 = draw(st.booleans())
    heads = [draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([2, 4]))]
    window = [draw(st.integers(2, 4)), draw(st.integers(2, 4))]
    depths = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    embed = 24 if 3 in heads else 16
    kinds = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    note(f"v2 {v2}, heads {heads}, window {window}, depths {depths}, embed {embed}")
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = swin.SwinTransformer([4, 4], embed, depths, heads, window, num_classes=5, **kinds)
    return model.double().eval(), draw(st.sampled_from([20, 24, 27, 32]))


@settings(max_examples=8, **SETTINGS)
@given(st.data())
def test_random_torchvision_swins_keep_their_function(data):
    """torchvision's Swin opened head by head (nrfx.capture.swin): any window (square or not, larger than the map
    or not), shift, head count and map size (padded or not), random dead heads and MLP channels, any scheme,
    align and budget: the rewritten model computes the gated one at another batch size."""
    model, size = data.draw(swins())
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    other = torch.randn(data.draw(st.sampled_from([1, 3])), 3, size, size, dtype=torch.float64)
    gated = nrfx.add_gates(model, x)
    assert any(g.endswith("heads_gate") for g in gated.nrfx_gates)  # the second stage's 2 or 4 heads are free
    _kill(gated, data)
    scheme, align = data.draw(st.sampled_from(["nr", "cr", "ca"])), data.draw(st.sampled_from([1, 8]))
    budget = data.draw(st.sampled_from([None, nrfx.Budget.fraction(1.3)]))
    note(f"size {size}, scheme {scheme}, align {align}, budget {budget}, batch {other.shape[0]}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(gated, None, budget, example_inputs=x, scheme=scheme, align=align)
        torch.testing.assert_close(new(other), gated(other), rtol=1e-9, atol=1e-10)
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
