"""The aten ops that froze whole models until they got a translation and a rule (issue "aten gaps").

Each op runs in a tiny model ``conv 1×1 (3→8) → BN → op → conv 1×1 (→4)``: the 8-wide space is free
exactly when the op passes channels through, frozen (with the op's reason) when it acts along them.
Parameters and MACs are counted by hand, fx and torch.export must agree, the zero rule is checked
through the BN's dead channels, and rejuvenation (slim and wide) keeps the function in float64.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nrfx
from nrfx.capture.aten import TORCH_LEVEL
from nrfx.errors import NrfxWarning

aten = torch.ops.aten
H = W = 6  # spatial size of every example


def _analyze(model: nn.Module, args, capture: str, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nrfx.analyze(model, args, capture=capture, **options)


def _aten_ops(model: nn.Module, args: tuple) -> set:
    """The aten overloads torch.export records for the module (the test must exercise them)."""
    program = torch.export.export(model.eval(), args, strict=False)
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def _spaces(analysis) -> list[tuple[int, bool]]:
    """(width, frozen) of every space, in a capture-independent order."""
    return sorted((s.width, s.is_frozen) for s in analysis.spaces)


def _assert_agree(model: nn.Module, args: tuple):
    """fx and export see the same spaces, parameters and MACs; export leaves no aten op untranslated."""
    fx, ex = _analyze(model, args, "fx"), _analyze(model, args, "export")
    assert ex.capture == "export" and fx.capture == "fx"
    assert not fx.unknown_ops and not ex.unknown_ops
    assert _spaces(fx) == _spaces(ex)
    assert (fx.params, fx.macs) == (ex.params, ex.macs)
    return fx, ex


# -- one op between a BN and a head conv ------------------------------------------------------------------------
class Around(nn.Module):
    """conv 1×1 (3→8) → BN → ``op(self, x, y)`` → conv 1×1 (head_in→4)."""

    def __init__(self, op: Callable, head_in: int = 8):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(head_in, 4, 1)
        self.register_buffer("grid", torch.rand(1, H, W, 2) * 2 - 1)

    def forward(self, x):
        return self.head(self.op(self, x, self.bn(self.conv(x))))


def _gather_index(y: torch.Tensor) -> torch.Tensor:
    """An index computed from y itself (its channel dim is y's): positions along dim 2, in range."""
    return (y > 0).to(torch.long).cumsum(2).clamp(max=H - 1)


def _meshgrid(y: torch.Tensor) -> torch.Tensor:
    """y plus a coordinate grid made by meshgrid (no channels)."""
    gy, gx = torch.meshgrid(torch.arange(H, dtype=y.dtype), torch.arange(W, dtype=y.dtype), indexing="ij")
    return y + gy * gx


@dataclass(frozen=True)
class Case:
    op: Callable
    aten: frozenset  # the overloads export records (translated by nrfx.capture.aten)
    frozen: str | None = None  # None: the 8-wide space is free; else a phrase of its freeze reason
    keeps_zero: bool = True  # a dead BN channel (γ = β = 0) stays dead through the op
    head_in: int = 8
    positions: int = H * W  # output positions of the head conv


CASES = {
    "pow": Case(lambda m, x, y: y ** 2, frozenset({aten.pow.Tensor_Scalar})),
    "pow_scalar_base": Case(lambda m, x, y: 2 ** y, frozenset({aten.pow.Scalar}), keeps_zero=False),
    "and": Case(lambda m, x, y: y * ((y > 0) & (y < 1)), frozenset({aten.__and__.Tensor})),
    "or": Case(lambda m, x, y: y * ((y > 0) | (y < -1)), frozenset({aten.__or__.Tensor})),
    "masked_fill_zero": Case(lambda m, x, y: y.masked_fill(x[:, :1] > 0, 0.0), frozenset({aten.masked_fill.Scalar})),
    "masked_fill_one": Case(lambda m, x, y: y.masked_fill(x[:, :1] > 0, 1.0), frozenset({aten.masked_fill.Scalar}),
                            keeps_zero=False),
    "where_zero": Case(lambda m, x, y: torch.where(x[:, :1] > 0, y, 0.0), frozenset({aten.where.ScalarOther})),
    "where_tensors": Case(lambda m, x, y: torch.where(y > 0, y, y * 0.5), frozenset({aten.where.self})),
    "where_one": Case(lambda m, x, y: torch.where(x[:, :1] > 0, y, 1.0), frozenset({aten.where.ScalarOther}),
                      keeps_zero=False),
    "cumsum": Case(lambda m, x, y: torch.cumsum(y, 2), frozenset({aten.cumsum.default})),
    "cumsum_channels": Case(lambda m, x, y: torch.cumsum(y, 1), frozenset({aten.cumsum.default}), "cumulative"),
    "roll": Case(lambda m, x, y: torch.roll(y, 1, 3), frozenset({aten.roll.default})),
    "roll_channels": Case(lambda m, x, y: torch.roll(y, 1, 1), frozenset({aten.roll.default}), "roll along channels"),
    "gather": Case(lambda m, x, y: torch.gather(y, 2, _gather_index(y)), frozenset({aten.gather.default})),
    "gather_channels": Case(lambda m, x, y: torch.gather(y, 1, _gather_index(y)), frozenset({aten.gather.default}),
                            "gather along channels"),
    "repeat": Case(lambda m, x, y: y.repeat(1, 1, 2, 1), frozenset({aten.repeat.default}), positions=2 * H * W),
    "repeat_channels": Case(lambda m, x, y: y.repeat(1, 2, 1, 1), frozenset({aten.repeat.default}),
                            "repeat along channels", head_in=16),
    "linspace": Case(lambda m, x, y: y + torch.linspace(0, 1, W, dtype=y.dtype), frozenset({aten.linspace.default}),
                     keeps_zero=False),
    "meshgrid": Case(lambda m, x, y: _meshgrid(y), frozenset({aten.meshgrid.indexing}), keeps_zero=False),
    "grid_sample": Case(lambda m, x, y: F.grid_sample(y, x[:, :2].permute(0, 2, 3, 1) * 0 + m.grid,
                                                      align_corners=False), frozenset({aten.grid_sampler.default})),
    "vector_norm": Case(lambda m, x, y: y * torch.linalg.vector_norm(y, 2, dim=(2, 3), keepdim=True),
                        frozenset({aten.linalg_vector_norm.default})),
    "norm": Case(lambda m, x, y: y * torch.norm(y, p=2, dim=(2, 3), keepdim=True),
                 frozenset({aten.linalg_vector_norm.default})),
    "vector_norm_channels": Case(lambda m, x, y: y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + 1e-6),
                                 frozenset({aten.linalg_vector_norm.default}), "reduction"),
    "mean_all": Case(lambda m, x, y: y * y.mean(), frozenset({aten.mean.default})),
    "sum_all": Case(lambda m, x, y: y * torch.sum(y), frozenset({aten.sum.default})),
    "diff": Case(lambda m, x, y: torch.diff(y, dim=3), frozenset({aten.diff.default}), positions=H * (W - 1)),
    "remainder": Case(lambda m, x, y: y % 1.5, frozenset({aten.remainder.Scalar})),
    "remainder_tensor": Case(lambda m, x, y: torch.remainder(y, x[:, :1].abs() + 1),
                             frozenset({aten.remainder.Tensor})),
    "fmod": Case(lambda m, x, y: torch.fmod(y, 2.0), frozenset({aten.fmod.Scalar})),
    "floor_divide": Case(lambda m, x, y: y // 0.5, frozenset({aten.floor_divide.default})),
    "normalize": Case(lambda m, x, y: F.normalize(y, dim=3), frozenset({aten.expand_as.default})),
    "triu": Case(lambda m, x, y: torch.triu(y, 1), frozenset({aten.triu.default})),
    "sliding_windows": Case(lambda m, x, y: F.pad(y, (1, 1)).unfold(3, 3, 1).sum(-1), frozenset({aten.unfold.default})),
    "unfold_fold": Case(lambda m, x, y: F.fold(F.unfold(y, 2, stride=2), (H, W), 2, stride=2),
                        frozenset({aten.im2col.default, aten.col2im.default})),
    "sign": Case(lambda m, x, y: torch.sign(y) * y.abs().sqrt(), frozenset({aten.sign.default})),
    "floor": Case(lambda m, x, y: torch.floor(y * 4) / 4, frozenset({aten.floor.default})),
    "expm1_log1p": Case(lambda m, x, y: torch.log1p(torch.expm1(y)), frozenset({aten.expm1.default,
                                                                                aten.log1p.default})),
    "erfc": Case(lambda m, x, y: torch.erfc(y), frozenset({aten.erfc.default}), keeps_zero=False),
    "fmax": Case(lambda m, x, y: torch.fmax(y, 0.5 * y), frozenset({aten.fmax.default})),
    "fmin": Case(lambda m, x, y: y.fmin(-y.abs()), frozenset({aten.fmin.default})),
    "hypot": Case(lambda m, x, y: torch.hypot(y, 2 * y), frozenset({aten.hypot.default})),
    "copysign": Case(lambda m, x, y: torch.copysign(y, x[:, :1]), frozenset({aten.copysign.Tensor})),
    "xlogy": Case(lambda m, x, y: torch.xlogy(y, x[:, :1].abs() + 1), frozenset({aten.xlogy.Tensor})),
    "special_xlogy": Case(lambda m, x, y: torch.special.xlogy(y, y.abs() + 1), frozenset({aten.special_xlogy.default})),
    "xor": Case(lambda m, x, y: y * ((y > 0) ^ (x[:, :1] > 0)), frozenset({aten.__xor__.Tensor})),
    "logical_xor": Case(lambda m, x, y: torch.logical_xor(y, x[:, :1] > 0) * y, frozenset({aten.logical_xor.default})),
    "logaddexp": Case(lambda m, x, y: torch.logaddexp(y, 0.5 * y), frozenset({aten.logaddexp.default}),
                      keeps_zero=False),
    "logaddexp2": Case(lambda m, x, y: y.logaddexp2(x[:, :1]), frozenset({aten.logaddexp2.default}), keeps_zero=False),
    "atan2": Case(lambda m, x, y: torch.atan2(y, x[:, :1] - 0.5), frozenset({aten.atan2.default}), keeps_zero=False),
    "heaviside": Case(lambda m, x, y: torch.heaviside(y, 0.5 + 0 * y), frozenset({aten.heaviside.default}),
                      keeps_zero=False),
    "lerp": Case(lambda m, x, y: torch.lerp(y, 2 * y + 1, 0.25), frozenset({aten.lerp.Scalar}), keeps_zero=False),
    "lerp_weights": Case(lambda m, x, y: y.lerp(-y, torch.sigmoid(y)), frozenset({aten.lerp.Tensor}),
                         keeps_zero=False),  # zero here, but lerp's rule does not say so: kept, not wrong
    "tensor_split": Case(lambda m, x, y: torch.cat(torch.tensor_split(y, (2,), dim=2)[::-1], 2)
                         * torch.cat(torch.tensor_split(y, 2, dim=3)[::-1], 3),
                         frozenset({aten.tensor_split.indices, aten.tensor_split.sections})),
    "cat_rows": Case(lambda m, x, y: torch.cat([y, -y], 2)[:, :, ::2], frozenset({aten.cat.default})),
    "stack": Case(lambda m, x, y: torch.stack([y, y.flip(3)], 4).amax(4), frozenset({aten.stack.default})),
    "flip": Case(lambda m, x, y: y.flip(2, 3) - torch.flip(y, [3]), frozenset({aten.flip.default})),
    "flip_channels": Case(lambda m, x, y: torch.fliplr(y), frozenset({aten.fliplr.default}), "flip along channels"),
    "rot90": Case(lambda m, x, y: torch.rot90(y, 1, (2, 3)) + y.rot90(2, [3, 2]), frozenset({aten.rot90.default})),
    "not": Case(lambda m, x, y: y * ~(y > 0.5) + y * torch.logical_not(y < -0.5),
                frozenset({aten.bitwise_not.default, aten.logical_not.default})),
    "repeat_interleave": Case(lambda m, x, y: y.repeat_interleave(2, dim=3)[..., ::2]
                              + torch.repeat_interleave(y, 1, 1), frozenset({aten.repeat_interleave.self_int})),
    "repeat_interleave_channels": Case(lambda m, x, y: torch.repeat_interleave(y, 2, dim=1),
                                       frozenset({aten.repeat_interleave.self_int}), "repeat_interleave along",
                                       head_in=16),
    "tile": Case(lambda m, x, y: y.tile(2, 1)[:, :, :H] + torch.tile(y, (1, 1, 1, 2))[..., W:],
                 frozenset({aten.tile.default})),
    "tile_channels": Case(lambda m, x, y: y.tile((2, 1, 1)), frozenset({aten.tile.default}), "repeat along channels",
                          head_in=16),
    "reshape_as": Case(lambda m, x, y: y.flatten(2).reshape_as(y) * y.view_as(y),
                       frozenset({aten.reshape_as.default, aten.view_as.default})),
    "clamp_tensor": Case(lambda m, x, y: torch.clamp(y, min=-x[:, :1].abs(), max=x[:, :1].abs()),
                         frozenset({aten.clamp.Tensor}), keeps_zero=False),  # the rule keeps no zeros
    "one_hot": Case(lambda m, x, y: y + F.one_hot((x[:, 0] > 0).long(), W)[..., 0, :].unsqueeze(1).to(y.dtype),
                    frozenset({aten.one_hot.default}), keeps_zero=False),
    "tril_channels": Case(lambda m, x, y: torch.tril(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                          frozenset({aten.tril.default}), "triangle"),
}


def _model(case: Case) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Around(case.op, case.head_in).double().eval(), torch.randn(2, 3, H, W, dtype=torch.float64)


def _kill(model: Around, dead: list[int]) -> None:
    """BN channels that output exact zeros (γ = β = 0); the live ones far from identity."""
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight[dead] = 0
        model.bn.bias[dead] = 0


@functools.cache
def _identity_analysis():
    """The export analysis of ``Around`` with no op (its MACs are the convs'): one capture for every case."""
    _, x = _model(CASES["pow"])
    return _analyze(Around(lambda m, x, y: y).double().eval(), (x,), "export")


@pytest.mark.parametrize("name", CASES)
def test_op_spaces_cost_and_agreement(name: str):
    """Hand-counted params and MACs; the 8-wide space is free or frozen by the op's rule; fx = export."""
    case = CASES[name]
    model, x = _model(case)
    assert case.aten <= _aten_ops(model, (x,))
    assert all(TORCH_LEVEL.for_function(op) is not None for op in case.aten)
    _, ex = _assert_agree(model, (x,))
    assert ex.params == (3 * 8 + 8) + 2 * 8 + (case.head_in * 4 + 4)
    identity = _identity_analysis()
    conv_macs = 8 * 3 * H * W + 4 * case.head_in * case.positions
    assert ex.macs - conv_macs == identity.macs - (8 * 3 + 4 * 8) * H * W  # the op itself costs no MACs
    conv = ex.space_ids(ex.records["conv"].output)
    assert len(conv) == 1 and ex.spaces[conv[0]].width == 8
    space = ex.spaces[conv[0]]
    if case.frozen is None:
        assert not space.is_frozen
    else:
        assert space.is_frozen and any(case.frozen in reason for reason in space.frozen)
    assert [s.width for s in ex.spaces if not s.is_frozen] == ([] if case.frozen else [8])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.frozen is None])
def test_op_zero_rule(name: str):
    """A channel dead at the BN is dead at the head only when the op keeps zeros (f(0) = 0 for that channel)."""
    case = CASES[name]
    model, x = _model(case)
    _kill(model, [1, 4, 6])
    for capture in ("fx", "export"):
        analysis = _analyze(model, (x,), capture)
        space = analysis.space_ids(analysis.records["conv"].output)[0]
        alive = analysis.utilization().alive[space]
        assert int(alive.sum()) == (5 if case.keeps_zero else 8), capture
        if case.keeps_zero:
            assert not alive[[1, 4, 6]].any()


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.frozen is None])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_op_rejuvenation_keeps_function(name: str, capture: str):
    """Dead channels removed (where the op keeps zeros), then widened to 1.3 × c(A): the outputs stay the same
    (float64)."""
    case = CASES[name]
    model, x = _model(case)
    _kill(model, [0, 3, 5])
    with torch.no_grad():
        expected = model(x)
    analysis = _analyze(model, (x,), capture)  # one capture for both rewrites
    live = analysis.utilization().live_params
    slim = nrfx.rejuvenate(model, None, nrfx.Budget(params=live), example_inputs=x, align=1, analysis=analysis)
    wide = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=x, align=1, analysis=analysis)
    kept = 5 if case.keeps_zero else 8
    assert slim.get_parameter("conv.weight").shape[0] == kept == slim.get_parameter("head.weight").shape[1]
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for new in (slim, wide):
            torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)


# -- clamp with tensor bounds: Gemma 4's clipped linears ---------------------------------------------------------
class Clipped(nn.Module):
    """conv 1×1 (3→8) → BN → ``clamp(y, lo, hi)`` with 0-d bounds held as buffers (or parameters) → conv (→4)."""

    def __init__(self, lo: float, hi: float, learned: bool = False):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        bounds = torch.tensor(lo), torch.tensor(hi)
        if learned:
            self.lo, self.hi = (nn.Parameter(b) for b in bounds)
        else:
            self.register_buffer("lo", bounds[0])
            self.register_buffer("hi", bounds[1])

    def forward(self, x):
        return self.head(torch.clamp(self.bn(self.conv(x)), self.lo, self.hi))


@pytest.mark.parametrize(("lo", "hi", "learned", "keeps"), [(-math.inf, math.inf, False, True),
                                                            (-1.0, 1.0, False, True), (0.1, 1.0, False, False),
                                                            (-1.0, 1.0, True, False)])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_clamp_by_buffers_around_zero_keeps_zeros(lo, hi, learned, keeps, capture):
    """A dead channel stays dead through a clamp whose buffer bounds hold 0 (±inf: a no-op clamp); bounds without
    0, or parameters (they move in training), keep no zeros; rejuvenation keeps the function either way."""
    torch.manual_seed(0)
    model, x = Clipped(lo, hi, learned).double().eval(), torch.randn(2, 3, H, W, dtype=torch.float64)
    _kill(model, [0, 3, 5])
    a = _analyze(model, (x,), capture)
    assert not a.unknown_ops
    assert int(a.utilization().alive[a.space_ids(a.records["conv"].output)[0]].sum()) == (5 if keeps else 8)
    with torch.no_grad():
        expected = model(x)
    for budget in (None, nrfx.Budget.fraction(1.3)):
        new = nrfx.rejuvenate(model, None, budget, example_inputs=x, capture=capture, align=1, analysis=a)
        torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)


# -- addmm: Hugging Face Conv1D, x @ W + b with W stored (in, out) ---------------------------------------------
class AddmmMlp(nn.Module):
    """x (…, 8) → addmm 8→16 (W1 stored (in, out)) → ReLU → addmm 16→4: GPT-2's MLP with Conv1D layers."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.relu(torch.addmm(self.b1, x.flatten(0, -2), self.w1))
        return torch.addmm(self.b2, h, self.w2).unflatten(0, x.shape[:-1])


def test_addmm_is_a_linear_layer_with_weight_in_out():
    """Params and MACs by hand; the hidden space is free; W's dim 0 carries the input space, dim 1 the output."""
    torch.manual_seed(0)
    model, x = AddmmMlp().double().eval(), torch.randn(2, 5, 8, dtype=torch.float64)
    assert aten.addmm.default in _aten_ops(model, (x,))
    fx, ex = _assert_agree(model, (x,))
    for analysis in (fx, ex):
        assert analysis.params == 8 * 16 + 16 + 16 * 4 + 4
        assert analysis.macs == 5 * 8 * 16 + 5 * 16 * 4  # per example: 5 rows
        assert [s.width for s in analysis.spaces if not s.is_frozen] == [16]
        hidden = analysis.space_ids(analysis.param_info["w1"].dims[1])
        assert analysis.param_info["w1"].dims[0] is None  # the model input: no space
        assert analysis.space_ids(analysis.param_info["w2"].dims[0]) == hidden
        assert analysis.space_ids(analysis.param_info["b1"].dims[0]) == hidden
        assert analysis.space_ids(analysis.param_info["w2"].dims[1]) == analysis.space_ids(
            analysis.param_info["b2"].dims[0])


def test_addmm_with_a_computed_weight_is_unknown():
    """addmm whose weight is not a parameter: an unknown op (frozen, recorded), never a guess."""

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.w = nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            return torch.addmm(torch.zeros(4), self.fc(x), self.w * 2)

    analysis = _analyze(Computed(), (torch.randn(3, 8),), "fx")
    assert "function addmm with a computed weight" in analysis.unknown_ops
    assert all(s.is_frozen for s in analysis.spaces)


def _conv1d_mlp():
    """HF Conv1D (8→16) → GELU → nrfx.Gate → HF Conv1D (16→8), with a residual: the GPT-2 MLP block."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.act, self.gate, self.c_proj = conv1d(16, 8), nn.GELU(), nrfx.Gate(16, -1), conv1d(8, 16)

        def forward(self, x):
            return x + self.c_proj(self.gate(self.act(self.c_fc(x))))

    torch.manual_seed(0)
    model = Mlp().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model, torch.randn(2, 5, 8, dtype=torch.float64)


def test_hf_conv1d_is_free_under_export():
    """Conv1D's ``view(-1, x.size(-1))`` / ``view(*lead, nf)`` become export literals: the hidden space stays free."""
    model, x = _conv1d_mlp()
    analysis = _analyze(model, (x,), "export")
    assert not analysis.unknown_ops
    assert [s.width for s in analysis.spaces if not s.is_frozen] == [16]
    assert analysis.coverage().monitored_channels == 16
    fc, proj = analysis.param_info["c_fc.weight"], analysis.param_info["c_proj.weight"]
    assert fc.shape == (8, 16) and fc.dims[0] is None  # dim 0 reads the model input: no space
    hidden = analysis.space_ids(fc.dims[1])
    assert analysis.space_ids(proj.dims[0]) == hidden and analysis.spaces[hidden[0]].width == 16
    assert analysis.spaces[analysis.space_ids(proj.dims[1])[0]].is_frozen  # the residual stream: the output
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert analysis.macs == 5 * (8 * 16 + 16 * 8)


def test_hf_conv1d_rejuvenation_keeps_function():
    """Dead gate entries removed (W (in, out) cut on dim 1 of c_fc, dim 0 of c_proj), then widened: same outputs."""
    model, x = _conv1d_mlp()
    with torch.no_grad():
        model.gate.weight.uniform_(0.5, 1.5)
        model.gate.weight[[1, 2, 7, 11, 12]] = 0
        expected = model(x)
    live = _analyze(model, (x,), "export").utilization().live_params
    slim = nrfx.rejuvenate(model, None, nrfx.Budget(params=live), example_inputs=x, capture="export", align=1)
    assert slim.get_parameter("c_fc.weight").shape == (8, 11)
    assert slim.get_parameter("c_proj.weight").shape == (11, 8)
    wide = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=x, capture="export", align=1)
    assert wide.get_parameter("c_fc.weight").shape[1] > 16
    with torch.no_grad():
        for new in (slim, wide):
            torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(new(torch.cat([x, x])), torch.cat([expected, expected]), rtol=1e-9, atol=1e-12)


def _tiny_gpt2(gates: bool):
    """transformers' GPT2Model at a tiny size (no cache: export cannot return a DynamicCache), optionally gated."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).double().eval()
    if gates:
        gen = torch.Generator().manual_seed(0)
        for block in model.h:
            gate = nrfx.Gate(256, -1).double()
            with torch.no_grad():
                gate.weight.copy_(torch.rand(256, generator=gen, dtype=torch.float64) + 0.5)
                gate.weight[torch.randperm(256, generator=gen)[:100]] = 0
            block.mlp.act = nn.Sequential(block.mlp.act, gate)
    return model, torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def test_gpt2_mlp_hidden_spaces_are_free():
    """GPT-2 (Conv1D everywhere) was wholly frozen; now each MLP hidden space (4 × n_embd) is free, and so are
    the attention heads of each block (q, k, v of n_embd channels in whole heads, and the 4 heads themselves)."""
    model, ids = _tiny_gpt2(gates=False)
    analysis = _analyze(model, (ids,), "export")
    assert not analysis.unknown_ops
    assert [s.width for s in analysis.spaces if not s.is_frozen] == [64, 64, 64, 4, 256] * 2
    assert analysis.params == sum(p.numel() for p in model.parameters())
    for block in range(2):
        for name in ("c_fc", "c_proj"):
            assert f"h.{block}.mlp.{name}.weight" in analysis.param_info


def test_gpt2_rejuvenation_keeps_function():
    """A gated GPT-2: 100 of 256 hidden channels dead per block; slimmed and re-grown, the outputs stay the same."""
    model, ids = _tiny_gpt2(gates=True)
    analysis = _analyze(model, (ids,), "export")
    u = analysis.utilization()
    assert sorted(int(a.sum()) for a, s in zip(u.alive, analysis.spaces, strict=True) if not s.is_frozen) == \
        [4, 4] + [64] * 6 + [156, 156]  # heads all alive, 100 hidden channels dead per block
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    slim = nrfx.rejuvenate(model, None, nrfx.Budget(params=u.live_params), example_inputs=(ids,), capture="export",
                           analysis=analysis, align=1)
    assert slim.get_parameter("h.0.mlp.c_fc.weight").shape == (64, 156)
    regrown = nrfx.rejuvenate(model, None, None, example_inputs=(ids,), capture="export", analysis=analysis, align=1)
    assert regrown.get_parameter("h.1.mlp.c_proj.weight").shape == (224, 64)  # heads share the regrown budget
    with torch.no_grad():
        for new in (slim, regrown):
            torch.testing.assert_close(new(ids).last_hidden_state, expected, rtol=1e-9, atol=1e-12)


# -- embedding, copy_ ------------------------------------------------------------------------------------------------
class TableLookup(nn.Module):
    """F.embedding(ids, table (10, 8)) → BN over the embedding dim → Linear 8→4."""

    def __init__(self, max_norm: float | None = None):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 8))
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)
        self.max_norm = max_norm

    def forward(self, ids):
        e = F.embedding(ids, self.table, max_norm=self.max_norm)
        return self.head(self.bn(e.transpose(1, 2)).transpose(1, 2))


def test_functional_embedding_makes_a_space():
    """The table's dim 1 is a new space (free here), its dim 0 (the vocabulary) none; no MACs."""
    model, ids = TableLookup().double().eval(), torch.randint(0, 10, (2, 5))
    assert aten.embedding.default in _aten_ops(model, (ids,))
    fx, ex = _assert_agree(model, (ids,))
    for analysis in (fx, ex):
        assert analysis.params == 10 * 8 + 2 * 8 + 8 * 4 + 4
        assert [s.width for s in analysis.spaces if not s.is_frozen] == [8]
        table = analysis.param_info["table"]
        assert table.dims[0] is None and analysis.space_ids(table.dims[1]) == analysis.space_ids(
            analysis.param_info["head.weight"].dims[1])
        assert analysis.records["embedding"].kind == "embedding"


def test_functional_embedding_rejuvenation_keeps_function():
    """Dead BN channels of the embedding dim removed: the table loses those columns, the outputs stay."""
    torch.manual_seed(0)
    model, ids = TableLookup().double().eval(), torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.weight[[2, 5]] = 0
        model.bn.bias[[2, 5]] = 0
        expected = model(ids)
    for capture in ("fx", "export"):
        live = _analyze(model, (ids,), capture).utilization().live_params
        slim = nrfx.rejuvenate(model, None, nrfx.Budget(params=live), example_inputs=ids, capture=capture, align=1)
        assert slim.get_parameter("table").shape == (10, 6)
        with torch.no_grad():
            torch.testing.assert_close(slim(ids), expected, rtol=1e-9, atol=1e-12)


def test_embedding_max_norm_freezes():
    """max_norm rescales each looked-up row by its norm over the embedding dim: that space freezes."""
    analysis = _analyze(TableLookup(max_norm=1.0).eval(), (torch.randint(0, 10, (2, 5)),), "fx")
    assert not analysis.unknown_ops
    frozen = [s for s in analysis.spaces if s.width == 8]
    assert frozen and all(any("max_norm" in r for r in s.frozen) for s in frozen)


class CopyInto(nn.Module):
    """Two convs (3→8) with BNs; ``a.copy_(b)``: a takes b's values; conv 3×3 (8→4) reads a."""

    def __init__(self, into_fresh: bool = False):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3)
        self.into_fresh = into_fresh

    def forward(self, x):
        a = x.new_zeros(x.shape[0], 8, H, W) if self.into_fresh else torch.relu(self.bn_a(self.conv_a(x)))
        b = self.bn_b(self.conv_b(x))
        a.copy_(b)
        return self.head(a)


def test_copy_ties_source_and_destination():
    """copy_ makes dst's channels src's: one free space; into a fresh literal-sized tensor the source freezes."""
    model, x = CopyInto().double().eval(), torch.randn(2, 3, H, W, dtype=torch.float64)
    assert aten.copy_.default in _aten_ops(model, (x,))
    fx, ex = _assert_agree(model, (x,))
    for analysis in (fx, ex):
        a, b = (analysis.space_ids(analysis.records[n].output) for n in ("conv_a", "conv_b"))
        assert a == b and [s.width for s in analysis.spaces if not s.is_frozen] == [8]
        assert analysis.space_ids(analysis.records["head"].input) == b
    fresh = _analyze(CopyInto(into_fresh=True).double().eval(), (x,), "fx")
    assert not fresh.unknown_ops
    b = fresh.spaces[fresh.space_ids(fresh.records["conv_b"].output)[0]]
    assert b.is_frozen


def test_copy_rejuvenation_keeps_function():
    """Channels dead in b (γ = β = 0) are zero in a after the copy: removed everywhere, the outputs stay."""
    torch.manual_seed(0)
    model, x = CopyInto().double().eval(), torch.randn(2, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        model.bn_a.weight[[0, 6]] = 0  # dead in a before the copy only: alive (a's values are b's)
        model.bn_a.bias[[0, 6]] = 0
        model.bn_b.weight[[1, 3]] = 0
        model.bn_b.bias[[1, 3]] = 0
        expected = model(x)
    analysis = _analyze(model, (x,), "export")
    space = analysis.space_ids(analysis.records["conv_b"].output)[0]
    assert analysis.utilization().alive[space].tolist() == [i not in (1, 3) for i in range(8)]
    slim = nrfx.rejuvenate(model, None, nrfx.Budget(params=analysis.utilization().live_params), example_inputs=x,
                           capture="export", analysis=analysis, align=1)
    assert slim.get_parameter("head.weight").shape[1] == 6
    with torch.no_grad():
        torch.testing.assert_close(slim(x), expected, rtol=1e-9, atol=1e-12)


# -- the coverage warning -------------------------------------------------------------------------------------------
class Unknown(nn.Module):
    """conv 3→8 → an op without a rule (``torch.logcumsumexp`` along W) → conv 8→4: every space frozen, 12
    channels."""

    def __init__(self, unknown: bool = True):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.unknown = unknown

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.head(torch.logcumsumexp(y, 3) if self.unknown else y)


def test_coverage_warning_when_unknown_ops_leave_nothing_free():
    """Unknown ops leaving nothing free warn at any model size, naming the ops; the same model without them is quiet."""
    x = torch.randn(2, 3, H, W)
    with pytest.warns(NrfxWarning, match=r"no channel space is free.*torch.logcumsumexp"):
        analysis = nrfx.analyze(Unknown().eval(), x)
    assert analysis.unknown_ops and not analysis.coverage().free_channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nrfx.analyze(Unknown(unknown=False).eval(), x).coverage().free_channels == 8


def test_export_views_that_keep_the_last_dim_do_not_spell_its_width():
    """``view(x, [-1, C])`` becomes ``x.flatten(0, -2)`` and ``view(y, [a, b, C])`` ``y.view(a, b, -1)`` when C is
    the input's last size; a view that changes the last dim keeps its literals (and freezes, as before)."""

    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            flat = self.bn(self.fc(x).view(-1, 8))
            return self.head(flat.view(x.shape[0], 5, 8)), self.fc(x).view(x.shape[0], 5, 2, 4)

    model, x = Views().eval(), torch.randn(3, 5, 8)
    analysis = _analyze(model, (x,), "export")
    views = [(n.target, n.args[1:]) for n in analysis.gm.graph.nodes if n.op == "call_method"
             and n.target in ("view", "flatten", "reshape")]
    assert ("flatten", (0, 1)) in views
    assert any(target == "view" and args[-2:] == (5, -1) for target, args in views)
    assert any(target == "view" and args[-2:] == (2, 4) for target, args in views)  # last dim changed: literal
    fc = analysis.spaces[analysis.space_ids(analysis.records["fc"].output)[0]]
    assert fc.is_frozen and any("literal" in r or "mixes" in r for r in fc.frozen)  # the (2, 4) view
    for got, expected in zip(analysis.gm(x), model(x), strict=True):
        torch.testing.assert_close(got, expected)


def _grn_model(timm):
    """ConvNeXt-V2 atto in float64 with gates on its free spaces, 30 % of each gate dead, GRN γ/β random."""
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = nrfx.add_gates(model, x)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path in gated.nrfx_gates:
            gate = gated.get_submodule(path)
            gate.weight[torch.rand(gate.weight.numel(), generator=generator) < 0.3] = 0
        for module in gated.modules():
            if type(module).__name__ == "GlobalResponseNorm":  # zeros at init: make them matter
                module.weight.normal_(generator=generator)
                module.bias.normal_(generator=generator)
    return model, gated, x


def test_convnextv2_grn_hidden_dims_are_free_and_its_params_follow_them():
    """GRN's ‖x‖ over the spatial dims passes its channels, its mean over channels reads them (SumRecord), its
    per-channel γ and β take the MLP hidden space: every fc1 output space is free; params and MACs exact."""
    timm = pytest.importorskip("timm")
    model, _, x = _grn_model(timm)
    for capture in ("fx", "export"):
        analysis = _analyze(model, (x,), capture)
        assert not analysis.unknown_ops
        assert analysis.params == sum(p.numel() for p in model.parameters())
        fc1 = [r for name, r in analysis.layers("conv", "linear") if r.module and r.module.endswith("fc1")]
        assert len(fc1) == sum(len(stage.blocks) for stage in model.stages)
        for record in fc1:
            space = analysis.spaces[analysis.space_ids(record.output)[0]]
            assert not space.is_frozen
            grn = record.module.replace("fc1", "grn")
            assert analysis.param_info[f"{grn}.weight"].dims[0] is not None
    assert _analyze(model, (x,), "fx").macs == _analyze(model, (x,), "export").macs


@pytest.mark.parametrize("scheme", ["nr", "cr"])
def test_convnextv2_grn_rejuvenation_is_exact(scheme):
    """Dead hidden channels removed and the hidden dims regrown: the GRN mean sums the survivors over the original
    count, the constants GRN's β adds to removed channels fold into fc2: the function is kept at any batch."""
    timm = pytest.importorskip("timm")
    _, gated, x = _grn_model(timm)
    with torch.no_grad():
        expected = gated(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(gated, None, None, example_inputs=x, scheme=scheme)
    assert any(note.startswith("resum: 12 ") for note in new.nrfx_plan.notes)
    probe = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(new(probe), gated(probe), rtol=1e-9, atol=1e-12)


class _ChannelMean(nn.Module):
    """conv → gate → x·(‖x‖ / mean_c ‖x‖) → conv (channels first), and a sum over channels as a second output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate, self.head = nn.Conv2d(3, 16, 3, padding=1), nrfx.Gate(16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.gate(F.gelu(self.conv(x)))
        g = torch.norm(h, p=2, dim=(2, 3), keepdim=True)
        return self.head(h * (g / (g.mean(dim=1, keepdim=True) + 1e-6))), h.sum(1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_channel_mean_keeps_its_divisor_and_a_sum_its_survivors(capture):
    torch.manual_seed(0)
    model = _ChannelMean().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        model.gate.weight[torch.tensor([1, 4, 9])] = 0
        expected = model(x)
    analysis = _analyze(model, (x,), capture)
    space = analysis.spaces[analysis.space_ids(analysis.records["conv"].output)[0]] if "conv" in analysis.records \
        else next(s for s in analysis.spaces if s.width == 16)
    assert not space.is_frozen
    sums = [r for r in analysis.records.values() if type(r).__name__ == "SumRecord"]
    assert sorted((r.kind, r.count) for r in sums) == [("mean", 16), ("sum", 1)]
    for budget in (nrfx.Budget.fraction(1.0), nrfx.Budget.fraction(1.4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = nrfx.rejuvenate(model, None, budget, example_inputs=x, align=1, capture=capture)
        with torch.no_grad():
            torch.testing.assert_close(new(x), expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():  # in place, the mean is the user's code: its channels stay
        warnings.simplefilter("ignore")
        nrfx.rejuvenate(model, None, None, example_inputs=x, align=1, inplace=True, capture=capture)
    assert "sums these channels" in " ".join(model.nrfx_plan.notes) and model.conv.out_channels == 16
