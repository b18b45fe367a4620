"""Attention heads: q, k, v and the output projection's input kept and added in whole heads.

Closed forms on a tiny attention (H = 4 heads of d = 8: spaces, blocks, c(A) and U(θ) with one
head dead), fx = export agreement, per-head gates from ``add_gates``, function preservation
(float64, other batch sizes) with dead heads and with widening for the fused timm form, the
Hugging Face form (``view(B, N, -1, d)``), the matmul form, the einsum form and the real timm / transformers /
torchvision models, grouped-query attention (a kv head with its query heads), ``nn.MultiheadAttention``
opened head by head, a returned key/value cache, and what stays frozen (cross-attention, a reshape into
three dims that no attention reads, in-place literals) with its reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nrfx
from nrfx.plan.planner import planning_units
from nrfx.rewrite.gating import head_gate_sites
from nrfx.rewrite.inplace import freeze_for_inplace

C, H, D, N = 32, 4, 8, 6


class Fused(nn.Module):
    """timm's Attention: one qkv Linear, reshape(B, N, 3, H, d), SDPA, literal-free merge from x.shape."""

    def __init__(self, dim: int = C, heads: int = H) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, Cx = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, Cx))


class Separate(nn.Module):
    """Hugging Face style: q, k, v Linears, ``view(B, N, -1, d)``, attention by matmul or SDPA."""

    def __init__(self, dim: int = C, head_dim: int = D, matmul: bool = False, kv_heads: int | None = None) -> None:
        super().__init__()
        self.d, self.matmul, self.gqa = head_dim, matmul, kv_heads is not None
        kv = (kv_heads or dim // head_dim) * head_dim
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, kv), nn.Linear(dim, kv)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, T = x.shape[0], x.shape[1]
        q, k, v = (f(x).view(B, T, -1, self.d).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.matmul:
            attn = (q @ k.transpose(-2, -1)) * self.d ** -0.5
            out = attn.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class Repeated(nn.Module):
    """Llama style grouped-query attention: kv heads repeated (``expand`` + ``reshape``) for SDPA or a matmul,
    or passed as they are with ``enable_gqa``."""

    def __init__(self, kv_heads: int = 2, mode: str = "repeat") -> None:
        super().__init__()
        self.r, self.mode = H // kv_heads, mode
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, kv_heads * D), nn.Linear(C, kv_heads * D)
        self.o = nn.Linear(C, C)

    def _repeat(self, t):
        b, kv, n, d = t.shape
        return t[:, :, None].expand(b, kv, self.r, n, d).reshape(b, kv * self.r, n, d)

    def forward(self, x):
        B, T = x.shape[0], x.shape[1]
        q, k, v = (f(x).view(B, T, -1, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.mode == "gqa":
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif self.mode == "repeat":
            out = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v))
        else:
            out = (q @ self._repeat(k).transpose(-2, -1) * D ** -0.5).softmax(-1) @ self._repeat(v)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class NeoX(nn.Module):
    """GPT-NeoX style: one qkv Linear viewed as (B, N, H, 3·d), split on the last dim, merged with ``flatten(2)``."""

    def __init__(self, dim: int = C, heads: int = H) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.qkv, self.dense = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).view(B, T, self.heads, 3 * self.d).transpose(1, 2).split(self.d, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).flatten(2))


class Einsum(nn.Module):
    """torchvision MaxViT's form: one qkv Linear chunked, heads split by reshape, attention by two einsums with
    the head as a batch label, merged back with the width read from the input's shape."""

    def __init__(self, dim: int = C, heads: int = H) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.qkv, self.merge = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, Cx = x.shape
        qkv = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (qkv[i].reshape(B, T, self.heads, self.d).transpose(1, 2) for i in range(3))
        attn = torch.einsum("bhid,bhjd->bhij", q, k * self.d ** -0.5).softmax(-1)
        return self.merge(torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(B, T, Cx))


class Net(nn.Module):
    """Embedding, one pre-norm attention block with a residual, a head: the heads are the only free spaces."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(8, C), attn, nn.Linear(C, 5)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.attn(h))


def net(attn: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return Net(attn).double().eval()


def x_(batch: int = 2, tokens: int = N) -> torch.Tensor:
    return torch.randn(batch, tokens, 8, dtype=torch.float64)


def head_unit(analysis):
    units = [u for u in planning_units(analysis) if max(u.blocks) > 1]
    assert len(units) == 1
    return units[0]


def kill_head(gated: nn.Module, head: int = 1) -> None:
    with torch.no_grad():
        for name in gated.nrfx_gates:
            if name.endswith("heads_gate"):
                gated.get_submodule(name).weight[head] = 0


def _rejuvenations(gated, x, capture: str, other) -> list:
    """(fraction, result) at 1.0 and 1.3 × c(A) (align 1); each computes the gated model's outputs on ``other``."""
    results = []
    with torch.no_grad():
        want = gated(other)
        for fraction in (1.0, 1.3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = nrfx.rejuvenate(gated, None, nrfx.Budget.fraction(fraction), example_inputs=x,
                                      capture=capture, align=1)
            torch.testing.assert_close(new(other), want, rtol=0, atol=1e-12)
            results.append((fraction, new))
    return results


# -- closed forms --------------------------------------------------------------------------------
def test_separate_projections_form_one_unit_of_whole_heads():
    model, x = net(Separate()), x_()
    a = nrfx.analyze(model, x)
    unit = head_unit(a)
    assert not unit.frozen
    assert sorted(zip((a.spaces[s].width for s in unit.spaces), unit.blocks, strict=True)) == \
        [(H, 1), (C, D), (C, D), (C, D)]
    names = {name: a.space_ids(r.output) for name, r in a.records.items() if getattr(r, "kind", "") == "linear"}
    assert {s for n in ("attn_q", "attn_k", "attn_v") for s in names[n]} <= set(unit.spaces)
    head = next(s for s, b in zip(unit.spaces, unit.blocks, strict=True) if b == 1)
    assert a.space_ids(a.records["attn_o"].input) == [head]  # the out projection reads heads of d features
    assert a.records["attn_o"].input.inner == D


def test_params_and_macs_after_removing_one_head():
    model, x = net(Separate()), x_()
    gated = nrfx.add_gates(model, x)
    kill_head(gated)
    a = nrfx.analyze(gated, x)
    u = a.utilization()
    unit = head_unit(a)
    assert sorted(int(u.alive[s].sum()) for s in unit.spaces) == [H - 1, C - D, C - D, C - D]
    assert not u.alive[unit.spaces[0]].reshape(-1, unit.blocks[0])[1].any()  # head 1, in every space of the unit
    # q, k, v lose d rows (and biases), o loses d columns, the gate one entry
    assert u.params - u.live_params == 3 * (D * C + D) + D * C + 1
    # per example: q, k, v and o lose N·d·C each, q·kᵀ and attn·v lose N·N·d each, the gate N·d
    macs_removed = 4 * N * D * C + 2 * N * N * D
    assert a.macs - a.macs_under(u.alive) in (macs_removed, macs_removed + N * D, macs_removed + N)


def test_fx_and_export_agree():
    model, x = net(Fused()), x_()
    fx, ex = (nrfx.analyze(model, x, capture=c) for c in ("fx", "export"))
    for a in (fx, ex):
        assert not head_unit(a).frozen
    assert (fx.params, fx.macs) == (ex.params, ex.macs)
    units = [head_unit(a) for a in (fx, ex)]
    assert [sorted(zip((a.spaces[s].width for s in u.spaces), u.blocks, strict=True)) for a, u in zip((fx, ex), units,
                                                                                                     strict=True)] == \
        [[(H, 1), (C, D), (C, D), (C, D)]] * 2
    # fx reads the residual width as a number (``B, T, C = x.shape``) and freezes it; export spells sizes as literals


# -- gates and function preservation ------------------------------------------------------------------
@pytest.mark.parametrize("attn", [Fused, Separate, lambda: Separate(matmul=True), NeoX, Einsum],
                         ids=["fused", "hf", "matmul", "neox", "einsum"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_dead_heads_and_widening_keep_the_function(attn, capture):
    model, x = net(attn()), x_()
    gated = nrfx.add_gates(model, x, capture=capture)
    assert [g for g in gated.nrfx_gates if g.endswith("heads_gate")] == ["attn.heads_gate"]
    assert not {"attn.q_gate", "attn.k_gate", "attn.v_gate", "attn.qkv_gate"} & set(gated.nrfx_gates)  # gated whole
    a = nrfx.analyze(gated, x, capture=capture)
    unit = head_unit(a)
    assert not unit.frozen
    assert set(unit.spaces) <= a.signalled_spaces()  # the head gate's signal covers q, k and v of its unit
    kill_head(gated)
    other = x_(3, N + 2 if capture == "fx" else N)  # export keeps only the batch size dynamic
    for _, new in _rejuvenations(gated, x, capture, other):
        plan = new.nrfx_plan
        for s, block in zip(unit.spaces, unit.blocks, strict=True):
            assert plan.keep[s] == [c for c in range(H * block) if c // block != 1]  # head 1 removed everywhere
            assert plan.grow[s] % block == 0
        assert new.get_submodule("attn.heads_gate").weight.numel() >= H - 1


@pytest.mark.parametrize(("mode", "capture"), [("repeat", "export"), ("matmul", "export"), ("gqa", "export"),
                                               ("gqa", "fx")])
def test_grouped_query_attention_moves_a_kv_head_with_its_query_heads(mode, capture):
    """H = 4 query heads over 2 kv heads: a kv head and its 2 query heads are one block of the head unit; a group
    dies only when both its query heads do, and then its kv head goes too; widening adds whole groups."""
    model, x = net(Repeated(mode=mode)), x_()
    gated = nrfx.add_gates(model, x, capture=capture)
    assert [g for g in gated.nrfx_gates if g.endswith("heads_gate")] == ["attn.heads_gate"]
    a = nrfx.analyze(gated, x, capture=capture)
    unit = head_unit(a)
    assert not unit.frozen and set(unit.spaces) <= a.signalled_spaces()
    widths = sorted(zip((a.spaces[s].width for s in unit.spaces), unit.blocks, strict=True))
    assert widths == [(2, 1), (2, 1), (H, 2), (2 * D, D), (2 * D, D), (C, 2 * D)]  # k, v heads, q heads, k, v, q
    other = x_(3, N + 2 if capture == "fx" else N)
    for dead, kv_kept in (([1], [0, 1]), ([2, 3], [0])):  # one query head of a group: the group stays
        with torch.no_grad():
            gated.get_submodule("attn.heads_gate").weight.fill_(1.0)
            gated.get_submodule("attn.heads_gate").weight[dead] = 0
        for _, new in _rejuvenations(gated, x, capture, other):
            k = a.space_ids(a.records["attn_k"].output)[0]
            assert new.nrfx_plan.keep[k] == [j * D + c for j in kv_kept for c in range(D)]
            assert new.nrfx_plan.grow[k] % D == 0
            heads = new.get_submodule("attn.heads_gate").weight.numel()
            assert heads == 2 * new.get_submodule("attn.k").weight.shape[0] // D  # two query heads per kv head


def test_fused_literal_head_count_is_rewritten():
    model, x = net(Fused()), x_()
    gated = nrfx.add_gates(model, x)
    kill_head(gated, 0)
    kill_head(gated, 2)
    live = nrfx.analyze(gated, x).utilization().live_params
    new = nrfx.rejuvenate(gated, None, nrfx.Budget(params=live), example_inputs=x, align=1)
    assert new.attn.qkv.weight.shape == (3 * 2 * D, C)
    assert new.attn.proj.weight.shape == (C, 2 * D)
    assert any(note.startswith("reheads:") for note in new.nrfx_plan.notes)
    views = [n for n in new.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert any(2 in n.args[1:] and D in n.args[1:] for n in views)  # reshape(B, T, 3, 2, d)
    other = x_(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(new(other), gated(other), rtol=0, atol=1e-12)


# -- what stays frozen, and why -----------------------------------------------------------------------
def reasons(analysis) -> list[str]:
    return [r for s in analysis.spaces for r in s.frozen]


def test_repeated_kv_heads_read_from_the_shape_under_fx_stay_frozen():
    """fx sees ``b, kv, n, d = t.shape``: a head count read as a number freezes (export spells it as a literal)."""
    a = nrfx.analyze(net(Repeated(mode="repeat")), x_(), capture="fx")
    assert all(u.frozen for u in planning_units(a) if max(u.blocks) > 1)
    assert any("channel count read as a number" in r for r in reasons(a))


class WithMHA(nn.Module):
    """An ``nn.MultiheadAttention`` between two Linears, as self-attention or attending to a second input."""

    def __init__(self, batch_first: bool = True, need_weights: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights, self.cross = batch_first, need_weights, cross
        self.inp, self.out = nn.Linear(8, C), nn.Linear(C, 5)
        self.mha = nn.MultiheadAttention(C, H, batch_first=batch_first)

    def forward(self, x):
        h = self.inp(x)
        s = h if self.batch_first else h.transpose(0, 1)
        kv = s * 2.0 if self.cross else s
        y = self.mha(s, kv, kv, need_weights=self.need_weights)[0]
        return self.out(h + (y if self.batch_first else y.transpose(0, 1)))


def _rejuvenated_with_a_dead_head(gated, x, capture: str, head: int) -> list:
    """(fraction, result) at 1.0 and 1.3 × c(A), ``head`` dead in every heads gate; the outputs equal at batch 3."""
    kill_head(gated, head)
    return _rejuvenations(gated, x, capture, x_(3))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("capture", "need_weights"), [("fx", False), ("export", False), ("export", True)])
def test_multihead_attention_heads(batch_first, capture, need_weights):
    """nn.MultiheadAttention's packed in_proj: a dead head leaves q, k and v rows and out_proj columns; names stay."""
    model, x = WithMHA(batch_first, need_weights).double().eval(), x_()
    gated = nrfx.add_gates(model, x, capture=capture)
    assert "mha.heads_gate" in gated.nrfx_gates
    for fraction, new in _rejuvenated_with_a_dead_head(gated, x, capture, 1):
        heads = new.get_submodule("mha.heads_gate").weight.numel()
        assert new.get_parameter("mha.in_proj_weight").shape[0] == 3 * heads * D
        assert new.get_submodule("mha.out_proj").weight.shape[1] == heads * D
        assert heads == H - 1 if fraction == 1.0 else heads >= H - 1
    assert isinstance(model.mha, nn.MultiheadAttention) and model.mha.in_proj_weight.shape == (3 * C, C)  # untouched


class MaskedMHA(nn.Module):
    """Self-attention with a causal ``attn_mask`` (bool or float) and a ``key_padding_mask`` read from the input."""

    def __init__(self, float_mask: bool) -> None:
        super().__init__()
        self.float_mask = float_mask
        self.inp, self.mha, self.out = nn.Linear(8, C), nn.MultiheadAttention(C, H, batch_first=True), nn.Linear(C, 5)

    def forward(self, x):
        h = self.inp(x)
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        if self.float_mask:
            causal = torch.zeros(causal.shape, dtype=x.dtype).masked_fill(causal, float("-inf"))
        padding = x[..., 0] > 1.0
        padding[:, 0] = False  # every query keeps a key
        return self.out(h + self.mha(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0])


@pytest.mark.parametrize("float_mask", [False, True])
def test_multihead_attention_with_masks_opens_under_export(float_mask):
    """attn_mask and key_padding_mask become one additive SDPA mask; dead heads leave, the outputs stay."""
    model, x = MaskedMHA(float_mask).double().eval(), x_()
    gated = nrfx.add_gates(model, x, capture="export")
    assert "mha.heads_gate" in gated.nrfx_gates
    for _, new in _rejuvenated_with_a_dead_head(gated, x, "export", 2):
        assert new.get_submodule("mha.heads_gate").weight.numel() >= H - 1


@pytest.mark.parametrize(("capture", "need_weights", "cross"), [("fx", True, False), ("export", False, True)])
def test_multihead_attention_stays_whole_where_it_cannot_open(capture, need_weights, cross):
    """Weights asked for under fx, or cross-attention: one opaque call, frozen with the reason."""
    a = nrfx.analyze(WithMHA(need_weights=need_weights, cross=cross).eval(), x_().float(), capture=capture)
    assert not head_gate_sites(a)
    assert all(u.frozen for u in planning_units(a) if max(u.blocks) > 1)
    if capture == "fx":
        assert any(r.startswith("input of MultiheadAttention") for r in reasons(a))


def test_torchvision_vit_heads():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    x, other = (torch.randn(b, 3, 32, 32, dtype=torch.float64) for b in (2, 3))
    _check_model(model, x, other, 0.8)


def test_reshape_into_three_dims_without_attention_stays_frozen():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(8, 4 * 3 * 3), nn.Conv2d(4, 2, 1)

        def forward(self, z):
            return self.conv(self.fc(z).view(z.shape[0], 4, 3, 3))

    a = nrfx.analyze(Decoder().eval(), torch.randn(2, 8))
    fc = a.space_ids(a.records["fc"].output)
    assert all(a.spaces[s].is_frozen for s in fc)
    assert any("never read by attention" in r for s in fc for r in a.spaces[s].frozen)


def test_in_place_freezes_spelled_head_counts():
    fused, hf = (nrfx.analyze(net(m), x_()) for m in (Fused(), Separate()))
    pinned = freeze_for_inplace(fused)
    assert all(u.frozen for u in planning_units(pinned) if max(u.blocks) > 1)
    assert any("spells attention heads" in r for r in reasons(pinned))
    assert not any(u.frozen for u in planning_units(freeze_for_inplace(hf)) if max(u.blocks) > 1)  # -1 sizes


# -- real models ----------------------------------------------------------------------------------------
def _check_model(model, x, other, min_unit_share, dead=(0,), gates=2):
    model = model.double().eval()
    gated = nrfx.add_gates(model, x)
    heads = [g for g in gated.nrfx_gates if g.endswith("heads_gate")]
    assert len(heads) == gates
    a = nrfx.analyze(gated, x)
    signalled = {a.spaces[s].unit for s in a.signalled_spaces()}
    share = sum(s.width for s in a.spaces if not s.is_frozen and s.unit in signalled) / sum(s.width for s in a.spaces)
    assert share >= min_unit_share
    for head in dead:
        kill_head(gated, head)
    want = gated(other)
    for fraction in (1.0, 1.3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = nrfx.rejuvenate(gated, None, nrfx.Budget.fraction(fraction), example_inputs=x)
        got = new(other)
        for w, g in zip(*(o if isinstance(o, tuple) else (o[0],) if not isinstance(o, torch.Tensor) else (o,)
                          for o in (want, got)), strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_torchvision_maxvit_heads():
    """MaxViT's attention (two einsums with the head a batch label, a relative position bias table added per
    head) was frozen ("batch dim of an einsum"): 64 % of maxvit_t free, 96 % now."""
    maxvit = pytest.importorskip("torchvision.models.maxvit")
    model = maxvit.MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                          block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    x, other = (torch.randn(b, 3, 32, 32, dtype=torch.float64) for b in (2, 3))
    _check_model(model, x, other, 0.9, gates=4)


def _tiny_swin(v2: bool, heads=(2, 4), window=(3, 3)):
    """A torchvision Swin (V1 or V2) of two stages, 16 → 32 channels, heads of 8, windows of 3×3."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    kinds = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if v2 else {}
    torch.manual_seed(0)
    return swin.SwinTransformer([4, 4], 16, [1, 2], list(heads), list(window), num_classes=10, **kinds)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_torchvision_swin_heads(v2):
    """torchvision's Swin computes its attention in one wrapped function that reads C from the input shape: it froze
    the heads, the projections and the token stream (swin_t 47 % free). Opened (nrfx.capture.swin), each block's heads
    are free, gated and resized whole; 36 × 36 inputs are padded to whole windows, the last stage's 3 × 3 map is
    one window (no shift: torchvision skips the mask, the spelled form adds zeros)."""
    x, other = (torch.randn(b, 3, 36, 36, dtype=torch.float64) for b in (2, 3))
    _check_model(_tiny_swin(v2), x, other, 0.8, dead=(0, 1), gates=3)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
@pytest.mark.parametrize("size", [24, 27, 36])
def test_swin_spelled_attention_is_torchvisions_own(v2, size):
    """The opened attention computes torchvision's ``shifted_window_attention`` bit for bit: shifted and plain
    windows, maps padded to whole windows and maps no larger than one window, eval and train mode (dropout 0), a
    batch of 3; the analysis counts the same MACs and parameters as the one-node rule of the wrapped function."""
    from nrfx.capture.swin import traced_call

    model = _tiny_swin(v2).double()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    blocks = [m for m in model.modules() if type(m).__name__.startswith("ShiftedWindowAttention")]
    assert {tuple(b.shift_size) for b in blocks} == {(0, 0), (1, 1)}
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out))) for b in blocks]
    for mode in (False, True):
        seen.clear()
        model.train(mode)(x)
        for block, inputs, out in seen:
            assert torch.equal(traced_call(block, (inputs,), {}), out)
    for hook in hooks:
        hook.remove()
    model.eval()
    opened, whole = nrfx.analyze(model, x), nrfx.analyze(_opaque_attention(model), x)
    assert (opened.macs, opened.params) == (whole.macs, whole.params)
    assert not head_gate_sites(whole) and len(head_gate_sites(opened)) == 3
    free = [a.coverage().free_channels / a.coverage().channels for a in (opened, whole)]
    assert 1 - free[0] < (1 - free[1]) / 3, free  # frozen: V1 9 % instead of 54 %, V2 3 % instead of 17 %


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin_v2"])
def test_swin_attention_keeps_its_widths_in_place(v2):
    """In place the user's Swin attention runs torchvision's function (C from the input, its num_heads): every dim of
    its parameters stays, with the reason; the rest widens and the model computes what it did."""
    model = _tiny_swin(v2).double().eval()
    x, other = (torch.randn(b, 3, 36, 36, dtype=torch.float64) for b in (2, 3))
    want = model(other)
    attention = {n: p.shape for n, p in model.named_parameters() if ".attn." in n and ".cpb_mlp." not in n}
    before = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=x, inplace=True)
    assert new is model and sum(p.numel() for p in model.parameters()) > 1.2 * before
    assert {n: p.shape for n, p in model.named_parameters() if n in attention} == attention
    assert any("whose code reads its widths and num_heads" in note for note in model.nrfx_plan.notes)
    torch.testing.assert_close(model(other), want, rtol=0, atol=1e-10)


def _opaque_attention(model: nn.Module) -> nn.Module:
    """A copy whose Swin attention modules are a subclass with its own forward (the same call): not opened."""
    import copy

    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module).__name__.startswith("ShiftedWindowAttention"):
            module.__class__ = _with_own_forward(type(module))
    return model


def _with_own_forward(kind: type) -> type:
    """A subclass of ``kind`` whose forward is its own (calling ``kind``'s)."""

    def forward(self, x):
        return kind.forward(self, x)

    return type(f"Own{kind.__name__}", (kind,), {"forward": forward})


def test_timm_vit_heads():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    x, other = (torch.randn(b, 3, 32, 32, dtype=torch.float64) for b in (2, 3))
    _check_model(model, x, other, 0.69)  # the rest: the residual stream and the 1000 classes (model output)


def test_bert_heads():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    x, other = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 7))
    _check_model(transformers.BertModel(config), x, other, 0.8)


def test_gpt2_heads_with_its_cache():
    """GPT-2 returns its key/value cache by default: the cache does not pin the heads, it follows them."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    x, other = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 7))
    model = transformers.GPT2Model(config)
    _check_model(model, x, other, 0.8)
    gated = nrfx.add_gates(model.double().eval(), x)
    kill_head(gated, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(gated, None, None, example_inputs=x, align=1)
    cache = new(other).past_key_values
    keys = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
    assert keys.shape[1] == new.get_submodule("h.0.attn.heads_gate").weight.numel()  # heads, not the original 4


def test_llama_grouped_query_heads():
    """Llama (4 query heads over 2 kv heads, repeated by ``repeat_kv``): the first group dead, kept out and regrown."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    x, other = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 7))
    _check_model(transformers.LlamaModel(config), x, other, 0.8, dead=(0, 1))


def test_multihead_attention_in_place_keeps_the_module():
    """In place the user's nn.MultiheadAttention stays as it is (its dims frozen, with the reason)."""
    model, x, other = WithMHA().double().eval(), x_(), x_(3)
    want = model(other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, inplace=True)
    assert same is model and isinstance(model.mha, nn.MultiheadAttention)
    assert model.mha.in_proj_weight.shape == (3 * C, C)
    assert any("is a MultiheadAttention, whose code reads its widths" in note for note in same.nrfx_plan.notes)
    torch.testing.assert_close(same(other), want, rtol=0, atol=1e-12)


def test_t5_heads_share_the_relative_position_bias():
    """T5 adds one relative position bias (a table with a column per head, computed once) to every layer's scores:
    the heads of all layers and the table's columns are one unit, gated in each layer; a head dead in every layer
    leaves them all."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    x, other = torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (3, 7))
    model = transformers.T5EncoderModel(config)
    _check_model(model, x, other, 0.8, dead=(2,))
    gated = nrfx.add_gates(model.double().eval(), x)
    kill_head(gated, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = nrfx.analyze(gated, x).utilization().live_params
        new = nrfx.rejuvenate(gated, None, nrfx.Budget(params=live), example_inputs=x, align=1)
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert new.get_parameter(table).shape[1] == H - 1
    assert all(new.get_parameter(f"encoder.block.{i}.layer.0.SelfAttention.q.weight").shape[0] == (H - 1) * D
               for i in range(2))


def test_multihead_attention_subclass_with_its_own_forward_stays_whole():
    """A subclass that overrides forward is not opened (its computation is its own)."""

    class Scaled(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            out, weights = super().forward(query, key, value, **kwargs)
            return 2 * out, weights

    model = WithMHA()
    model.mha = Scaled(C, H, batch_first=True)
    a = nrfx.analyze(model.eval(), x_().float(), capture="fx")
    assert not head_gate_sites(a)


def test_attention_whose_instance_forward_was_replaced_stays_whole():
    """An instance whose forward was replaced (``attn.forward = …``) is traced as it is, never opened: the replaced
    forward computes something else (here twice the attention), and the captured graph computes what it does."""
    from types import MethodType

    swin, mha = _tiny_swin(False).double().eval(), WithMHA().double().eval()
    for model, attention, x in ((swin, swin.features[3][0].attn, torch.randn(2, 3, 36, 36, dtype=torch.float64)),
                                (mha, mha.mha, x_())):
        kind = type(attention)

        def doubled(self, *args, kind=kind, **kwargs):
            out = kind.forward(self, *args, **kwargs)
            return (2 * out[0], *out[1:]) if isinstance(out, tuple) else 2 * out

        attention.forward = MethodType(doubled, attention)
        a = nrfx.analyze(model, x, capture="fx")
        opened = [site for site in head_gate_sites(a) if site[3].startswith(("features.3.0", "mha"))]
        assert not opened, opened
        torch.testing.assert_close(a.gm(x), model(x), rtol=0, atol=0)


def test_default_alignment_moves_one_head_of_eight_channels():
    """align=8: 8 heads of d = 8 (q, k, v 64 wide, multiples of 8 at any head count) lose one dead head, not 8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), Separate(dim=64, head_dim=8), nn.Linear(64, 5)).double().eval()
    x = x_()
    gated = nrfx.add_gates(model, x)
    heads = next(g for g in gated.nrfx_gates if g.endswith("heads_gate"))
    with torch.no_grad():
        gated.get_submodule(heads).weight[3] = 0
    live = nrfx.analyze(gated, x).utilization().live_params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(gated, None, nrfx.Budget(params=live), example_inputs=x)
    assert new.nrfx_plan.align == 8
    assert new.get_submodule(heads).weight.numel() == 7
    assert new.get_parameter("1.q.weight").shape[0] == 56  # still a multiple of 8
    other = x_(3)
    torch.testing.assert_close(new(other), gated(other), rtol=0, atol=1e-12)


def test_nn_transformer_with_masks_gated_and_rejuvenated():
    """nn.Transformer (analysed as islands) with a causal tgt_mask and padding masks: self-attention heads and MLPs
    gated, 40 % dead, removed and regrown with the outputs kept; the opened modules stay modules (the decoder
    reads ``layers[0].self_attn.batch_first``) and the user's model is untouched."""

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.Transformer(C, H, 1, 1, 64, batch_first=True, dropout=0.0)

        def forward(self, src, tgt):
            mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=src.dtype)
            pad = src[..., 0] > 1.0
            pad[:, 0] = False
            return self.t(src, tgt, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)

    torch.manual_seed(0)
    model = Seq2Seq().double().eval()
    x = tuple(torch.randn(2, n, C, dtype=torch.float64) for n in (7, 5))
    other = tuple(torch.randn(3, n, C, dtype=torch.float64) for n in (7, 5))
    gated = nrfx.add_gates(model, x)
    assert {"t.encoder.layers.0.self_attn.heads_gate", "t.decoder.layers.0.self_attn.heads_gate"} <= \
        set(gated.nrfx_gates)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path in gated.nrfx_gates:
            weight = gated.get_submodule(path).weight
            weight[torch.rand(weight.shape[0], generator=gen) < 0.4] = 0
        want = gated(*other)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for budget in (None, nrfx.Budget.fraction(1.2)):
                new = nrfx.rejuvenate(gated, None, budget, example_inputs=x)
                torch.testing.assert_close(new(*other), want, rtol=0, atol=1e-10)
    assert model.t.decoder.layers[0].self_attn.in_proj_weight.shape == (3 * C, C)


class BeitLike(nn.Module):
    """BEiT's attention: a qkv bias concatenated from q, k (a zero buffer) and v vectors, and a relative position bias
    read from a table (one column per head) by an index buffer, given to SDPA as its mask."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(C)), nn.Parameter(torch.randn(C))
        self.register_buffer("k_bias", torch.zeros(C), persistent=False)
        self.table = nn.Parameter(torch.randn(2 * N - 1, H))
        self.register_buffer("index", torch.arange(N)[:, None] - torch.arange(N)[None, :] + N - 1)

    def forward(self, x):
        B, T, Cx = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel = self.table[self.index.view(-1)].view(T, T, -1).permute(2, 0, 1).unsqueeze(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=rel).transpose(1, 2).reshape(B, T, Cx))


def test_beit_like_bias_vectors_and_position_table_follow_the_heads():
    """The concatenated qkv bias takes q, k and v's spaces and the table's columns join the heads: a dead head leaves
    its bias entries and its table column, and the outputs stay."""
    model, x = net(BeitLike()), x_()
    gated = nrfx.add_gates(model, x, capture="fx")
    assert "attn.heads_gate" in gated.nrfx_gates
    a = nrfx.analyze(gated, x, capture="fx")
    assert not head_unit(a).frozen
    for name in ("attn.q_bias", "attn.v_bias", "attn.k_bias", "attn.table"):
        assert any(d is not None for d in a.param_info[name].dims), name
    kill_head(gated, 1)
    table = a.space_ids(a.param_info["attn.table"].dims[1])[0]
    assert nrfx.analyze(gated, x, capture="fx").utilization().alive[table].tolist() == [True, False, True, True]
    for _, new in _rejuvenations(gated, x, "fx", x_(3)):
        assert 1 not in new.nrfx_plan.keep[table]
        heads = new.get_submodule("attn.heads_gate").weight.numel()
        assert new.get_parameter("attn.table").shape == (2 * N - 1, heads)
        assert new.get_parameter("attn.q_bias").shape == (heads * D,)


class SingleHead(nn.Module):
    """Attention without heads or a literal width (SAGAN's, a non-local block's): q·kᵀ sums over a free space."""

    def __init__(self, einsum: bool = False) -> None:
        super().__init__()
        self.einsum = einsum
        self.stem, self.norm = nn.Linear(6, 12), nn.BatchNorm1d(12)
        self.q, self.k, self.v, self.o = nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(12, 8), nn.Linear(8, 6)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x).transpose(1, 2)).transpose(1, 2))
        q, k = self.q(x), self.k(x)
        scores = torch.einsum("bnd,bmd->bnm", q, k) if self.einsum else q @ k.transpose(1, 2)
        return self.o(scores.softmax(-1) @ self.v(x))


@pytest.mark.parametrize("einsum", [False, True])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_space_two_activations_contract_shrinks_but_never_grows(scheme, einsum):
    """A new channel of q·kᵀ's inner space would add q_R·k_R to every score (the R rows of q and k are fresh): the
    plan keeps that space whole, so widening everything else keeps the function; a plan that grows it is refused."""
    torch.manual_seed(0)
    model = SingleHead(einsum).double().eval()
    with torch.no_grad():
        model.norm.weight[[2, 5, 7]] = 0
        model.norm.bias[[2, 5, 7]] = 0
        model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    (inner,) = set(analysis.space_ids(analysis.records["q"].output))
    assert analysis.spaces[inner].contracted and not analysis.spaces[inner].is_frozen
    other = torch.randn(3, 7, 6, dtype=torch.float64)
    for budget in (None, nrfx.Budget.fraction(1.5, "params")):
        new = nrfx.rejuvenate(model, None, budget, example_inputs=x, scheme=scheme, align=1)
        plan = new.nrfx_plan
        assert plan.grow[inner] == 0 and sum(plan.grow) > 0
        with torch.no_grad():
            torch.testing.assert_close(new(other), model(other), rtol=1e-9, atol=1e-12)
    grown = {**plan.to_dict(), "grow": [g + (s == inner) for s, g in enumerate(plan.grow)]}
    with pytest.raises(nrfx.PlanError, match="product of two activations"):
        nrfx.apply_plan(model, grown, x)
