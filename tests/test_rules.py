"""Per-rule unit tests: spaces, ties, frozen spaces, c(A) and U(θ) against closed forms on tiny models.

Every expected number is written from the layer sizes (weights Cout·Cin·K, MACs per example
= weight elements · output positions); none is copied from nrfx.  Masks are dicts
{module name: BoolTensor (True = alive)}.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SCHEMES, assert_aligned, assert_kept_exactly, kill_per_norm

try:  # timm's no-trace functions, called by their global names as timm's own blocks call them
    from timm.models.gcvit import window_reverse as gcvit_window_reverse
    from timm.models.maxxvit import grid_partition, grid_reverse, window_partition
    from timm.models.nest import blockify, deblockify
    from timm.models.swin_transformer import window_reverse as swin_window_reverse
except ImportError:
    blockify = None
from torch import nn

import nrfx

B = 2  # batch of every example input: nrfx reports MACs per example


# -- helpers -------------------------------------------------------------------------------------------------
def analyze(model: nn.Module, *shapes: tuple[int, ...]) -> nrfx.Analysis:
    torch.manual_seed(0)
    return nrfx.analyze(model, tuple(torch.randn(*s) for s in shapes))


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def alive(width: int, dead: tuple[int, ...] = ()) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[list(dead)] = False
    return mask


def ids(a: nrfx.Analysis, param: str, dim: int) -> list[int] | None:
    """Space ids of one dim of a parameter (None: the dim carries no channel space)."""
    layout = a.param_info[param].dims[dim]
    return None if layout is None else a.space_ids(layout)


def out_ids(a, name):
    return ids(a, f"{name}.weight", 0)


def in_ids(a, name):
    return ids(a, f"{name}.weight", 1)


def frozen(a: nrfx.Analysis, space_ids: list[int]) -> list[bool]:
    return [a.spaces[s].is_frozen for s in space_ids]


def reasons(a: nrfx.Analysis, space_ids: list[int]) -> str:
    return " ".join(r for s in space_ids for r in a.spaces[s].frozen)


def conv_out(n: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """Output length of a convolution along one dim."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def check_costs(a, model, macs, masks, live_params, live_macs):
    assert a.params == numel(model)
    assert a.macs == macs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "mask for .* is ignored", nrfx.NrfxWarning)  # masks on frozen spaces
        u = a.utilization(masks)
    assert (u.params, u.macs) == (a.params, a.macs)
    assert u.live_params == live_params
    assert u.live_macs == live_macs
    return u


# -- conv / batch norm ---------------------------------------------------------------------------------------
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

CONV_CASES = [
    (1, dict(kernel_size=3), (11,)),
    (1, dict(kernel_size=5, stride=2, padding=2, padding_mode="reflect"), (12,)),
    (1, dict(kernel_size=3, padding=1, padding_mode="circular", bias=False), (9,)),
    (2, dict(kernel_size=3, stride=2, padding=2, dilation=2), (17, 15)),
    (2, dict(kernel_size=(3, 1), padding=(1, 0), padding_mode="circular", bias=False), (9, 7)),
    (2, dict(kernel_size=3, padding=1, padding_mode="reflect"), (6, 5)),
    (2, dict(kernel_size=1, bias=False), (5, 6)),
    (3, dict(kernel_size=3, stride=(1, 2, 2), padding=1), (4, 6, 6)),
    (3, dict(kernel_size=2, padding=1, padding_mode="reflect", dilation=2), (3, 4, 5)),
]


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


@pytest.mark.parametrize("nd,kw,spatial", CONV_CASES)
def test_conv_bn_relu_conv(nd, kw, spatial):
    cin, c, cout = 3, 6, 4
    model = nn.Sequential(_CONV[nd](cin, c, **kw), _BN[nd](c), nn.ReLU(), _CONV[nd](c, cout, 1))
    a = analyze(model, (B, cin, *spatial))
    k = _tuple(kw["kernel_size"], nd)
    s, p, d = (_tuple(kw.get(n, dflt), nd) for n, dflt in (("stride", 1), ("padding", 0), ("dilation", 1)))
    out = [conv_out(spatial[i], k[i], s[i], p[i], d[i]) for i in range(nd)]
    K, P = math.prod(k), math.prod(out)
    bias = int(kw.get("bias", True))

    def params(w):  # conv0 (+bias) + bn γβ + conv3 (+bias)
        return w * cin * K + w * bias + 2 * w + cout * w + cout

    assert a.params == params(c)
    masks = {"1": alive(c, (1, 4))}
    macs, live_macs = c * cin * K * P + cout * c * P, (c - 2) * cin * K * P + cout * (c - 2) * P
    check_costs(a, model, macs, masks, params(c - 2), live_macs)
    # spaces: conv0 out == bn == conv3 in (one free space); conv3 out reaches the output (frozen)
    (s0,) = out_ids(a, "0")
    assert ids(a, "1.weight", 0) == [s0] and in_ids(a, "3") == [s0]
    assert a.spaces[s0].width == c and not a.spaces[s0].is_frozen
    assert frozen(a, out_ids(a, "3")) == [True]
    assert in_ids(a, "0") is None  # the image channels are not a space
    assert len(a.spaces) == 2
    assert a.param_info["1.running_mean"].buffer and not a.param_info["1.weight"].buffer
    assert a.mask_sites["1"] == c and a.mask_sites["0"] == c


def test_conv_records_name_the_module_and_layouts():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1))
    a = analyze(model, (B, 3, 8, 8))
    recs = {r.module: r for r in a.records.values() if r.kind != "slice" and r.module is not None}
    assert recs["0"].kind == "conv" and recs["0"].input is None and recs["0"].groups == 1
    assert recs["1"].kind == "norm"
    assert a.space_ids(recs["0"].output) == a.space_ids(recs["1"].input) == a.space_ids(recs["2"].input)
    assert not recs["2"].transposed


def test_conv_mask_keyed_by_the_conv_itself():
    model = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False))
    a = analyze(model, (B, 3, 5, 5))
    P = 25
    check_costs(a, model, 6 * 3 * P + 4 * 6 * P, {"0": alive(6, (0,))}, 5 * 3 + 4 * 5, 5 * 3 * P + 4 * 5 * P)


def test_depthwise_conv_keeps_the_space():
    c, P = 6, 8 * 8
    model = nn.Sequential(
        nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 4, 1),
    )
    a = analyze(model, (B, 3, 8, 8))

    def params(w):
        return (3 * w + w) + 2 * w + (9 * w + w) + 2 * w + (4 * w + 4)

    # the depthwise conv reads bn1's zeros {0,1}, conv6 reads bn4's zeros {1,2}: only channel 1 is dead
    masks = {"1": alive(c, (0, 1)), "4": alive(c, (1, 2))}
    check_costs(a, model, 3 * c * P + 9 * c * P + 4 * c * P, masks, params(c - 1), (3 + 9 + 4) * (c - 1) * P)
    (s0,) = out_ids(a, "0")
    assert in_ids(a, "3") is None  # depthwise weight (C, 1, k, k): only dim 0 carries the space
    assert out_ids(a, "3") == [s0] and in_ids(a, "6") == [s0]
    assert not a.spaces[s0].is_frozen


def test_grouped_conv_ties_its_sides_group_by_group():
    """groups=4: 2 input channels per group (8 → blocks of 2), 3 output channels per group (12 → blocks of 3)."""
    P = 6 * 6
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12),
        nn.Conv2d(12, 4, 1),
    )
    a = analyze(model, (B, 3, 6, 6))
    macs = 8 * 3 * P + 12 * (8 // 4) * 9 * P + 4 * 12 * P
    rec = next(r for r in a.records.values() if getattr(r, "module", None) == "2")
    (s_in,), (s_out,) = a.space_ids(rec.input), a.space_ids(rec.output)
    assert [s_in] == out_ids(a, "0") and [s_out] == in_ids(a, "4") and in_ids(a, "2") is None
    assert frozen(a, [s_in, s_out]) == [False, False]
    assert (a.spaces[s_in].block, a.spaces[s_out].block) == (2, 3)
    assert a.spaces[s_in].unit == a.spaces[s_out].unit  # one planning unit
    # group 0 dead on both sides (channels 0-1 in, 0-2 out); group 1 half dead in, alive out: kept whole
    masks = {"1": alive(8, (0, 1, 2)), "3": alive(12, (0, 1, 2, 5))}
    live_params = (3 * 6 + 6) + 2 * 6 + (9 * 9 * 2 + 9) + 2 * 9 + (4 * 9 + 4)
    live_macs = 6 * 3 * P + 9 * 2 * 9 * P + 4 * 9 * P
    u = check_costs(a, model, macs, masks, live_params, live_macs)
    assert u.alive[s_in].tolist() == [False] * 2 + [True] * 6
    assert u.alive[s_out].tolist() == [False] * 3 + [True] * 9


def test_grouped_conv_over_the_input_freezes_two_group_structures_move_in_the_coarser():
    """Over the image (a plain dim) its output freezes; one space read in groups of 2 and of 4 channels moves
    in groups of 4 (the gcd of the block counts), and a dead coarse group leaves both convs exactly."""
    first = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))
    a = analyze(first, (B, 4, 6, 6))
    assert frozen(a, out_ids(a, "0")) == [True] and "over a plain dim" in reasons(a, out_ids(a, "0"))

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
            self.g2, self.g4 = nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=4)
            self.bn2, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            y = self.bn(self.stem(x))
            return self.head(self.bn2(self.g2(y) + self.g4(y)))

    torch.manual_seed(0)
    model = TwoReaders().double().eval()
    a = nrfx.analyze(model, torch.randn(B, 3, 4, 4, dtype=torch.float64))
    stem = out_ids(a, "stem")
    assert frozen(a, stem) == [False] and a.spaces[stem[0]].block == 4
    assert a.spaces[out_ids(a, "g4")[0]].block == 4  # g4's 4 groups of 2 move two at a time
    with torch.no_grad():
        model.bn.weight[4:6] = 0  # half a coarse group dead: kept; a whole one dead: removed
        model.bn.bias[4:6] = 0
        for bn in (model.bn, model.bn2):
            bn.weight[0:4] = 0
            bn.bias[0:4] = 0
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0), example_inputs=(x[:B],), align=1)
    assert new.nrfx_plan.keep[stem[0]] == [4, 5, 6, 7]
    assert new.get_submodule("g4").groups == new.get_submodule("g4").out_channels // 2
    torch.testing.assert_close(new(x), model(x), rtol=0, atol=1e-12)


def test_conv_transpose2d():
    h, cin, c, cout = 5, 3, 8, 4
    model = nn.Sequential(
        nn.Conv2d(cin, c, 1), nn.BatchNorm2d(c),
        nn.ConvTranspose2d(c, cout, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(cout),
        nn.Conv2d(cout, 2, 1),
    )
    a = analyze(model, (B, cin, h, h))
    ho = (h - 1) * 2 - 2 * 1 + 3 + 1  # = 10
    # transposed conv: every input position meets every weight element
    macs = c * cin * h * h + c * cout * 9 * h * h + 2 * cout * ho * ho

    def params(w, v):
        return (cin * w + w) + 2 * w + (w * v * 9 + v) + 2 * v + (2 * v + 2)

    masks = {"1": alive(c, (0, 7)), "3": alive(cout, (2,))}
    live_macs = (c - 2) * cin * h * h + (c - 2) * (cout - 1) * 9 * h * h + 2 * (cout - 1) * ho * ho
    check_costs(a, model, macs, masks, params(c - 2, cout - 1), live_macs)
    # ConvTranspose weight is (in, out, k, k)
    assert ids(a, "2.weight", 0) == out_ids(a, "0")
    assert ids(a, "2.weight", 1) == ids(a, "3.weight", 0) == in_ids(a, "4")
    rec = next(r for r in a.records.values() if getattr(r, "module", None) == "2")
    assert rec.transposed


# -- linear --------------------------------------------------------------------------------------------------
def test_linear_2d_with_batchnorm1d():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    a = analyze(model, (4, 6))

    def params(w):
        return (6 * w + w) + 2 * w + (3 * w + 3)

    check_costs(a, model, 6 * 8 + 8 * 3, {"1": alive(8, (0, 3, 5))}, params(5), 6 * 5 + 5 * 3)
    assert out_ids(a, "0") == in_ids(a, "3") == ids(a, "1.weight", 0)
    assert frozen(a, out_ids(a, "3")) == [True]


def test_linear_on_3d_input_counts_every_token():
    t = 7
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    a = analyze(model, (B, t, 6))

    def params(w):
        return (6 * w + w) + (3 * w + 3)

    check_costs(a, model, t * (6 * 8 + 8 * 3), {"0": alive(8, (2, 3))}, params(6), t * (6 * 6 + 6 * 3))
    assert out_ids(a, "0") == in_ids(a, "2")
    assert not frozen(a, out_ids(a, "0"))[0]


# -- norms ---------------------------------------------------------------------------------------------------
class Between(nn.Module):
    """conv1x1(3→6) → bn → ``op`` → head(6→4); head is a 1×1 conv or a linear on the last dim."""

    def __init__(self, op, head: str = "conv", norm: nn.Module | None = None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6) if norm is None else norm
        if isinstance(op, nn.Module):
            self.op = op
        else:
            self.fn = op
        self.head = nn.Conv2d(6, 4, 1) if head == "conv" else nn.Linear(6, 4)

    def forward(self, x):
        y = self.bn(self.c1(x))
        y = self.op(y) if hasattr(self, "op") else self.fn(y)
        return self.head(y)


def between_costs(w: int, p_in: int, p_out: int, norm_params: int = 12) -> tuple[int, int]:
    """(params, MACs) of Between at width w (of 6): c1 3w+w, norm 2w per channel, head 4w+4."""
    return 3 * w + w + norm_params * w // 6 + 4 * w + 4, 3 * w * p_in + 4 * w * p_out


@pytest.mark.parametrize("norm", [nn.LayerNorm([6, 5, 5])], ids=["LayerNorm"])
def test_coupling_norms_freeze_the_space(norm):  # GroupNorm resizes in whole groups: tests/test_grouped.py
    model = Between(nn.ReLU(), norm=norm)
    a = analyze(model, (B, 3, 5, 5))
    norm_params = sum(p.numel() for p in norm.parameters())
    params = 3 * 6 + 6 + norm_params + 4 * 6 + 4
    macs = 3 * 6 * 25 + 4 * 6 * 25
    check_costs(a, model, macs, {"c1": alive(6, (0, 1, 2))}, params, macs)
    (s,) = out_ids(a, "c1")
    assert in_ids(a, "head") == [s] and a.spaces[s].is_frozen
    assert "statistics couple the channels" in reasons(a, [s])
    assert "bn" not in a.mask_sites  # not a per-channel norm: not a mask site


@pytest.mark.parametrize("trailing,frozen", [(3, True), (2, False)], ids=["shape[1:]", "shape[-2:]"])
def test_a_functional_layer_norm_given_a_tensors_shape_freezes_what_it_normalises(trailing, frozen):
    """``F.layer_norm(y, y.shape[-k:])`` (the normalised shape read from a tensor, a node in the graph; it crashed
    the rule): the channels freeze where the norm reads them, and stay free where it normalises the spatial dims
    only."""
    model = Between(lambda y: F.layer_norm(y, y.shape[-trailing:]))
    a = analyze(model, (B, 3, 5, 5))
    (s,) = out_ids(a, "c1")
    assert a.spaces[s].is_frozen == frozen and not a.unknown_ops


SHAPE_DERIVED = {  # arguments a forward reads from a tensor's shape: nodes in the fx graph, not numbers
    "cat dim": lambda m, y: torch.cat([y, y * 2], dim=y.dim() - 3),
    "sum dims": lambda m, y: y.mean(dim=(y.dim() - 2, y.dim() - 1), keepdim=True),
    "softmax dim": lambda m, y: y.softmax(dim=y.dim() - 1),
    "permute dims": lambda m, y: y.permute(0, y.dim() - 3, y.dim() - 1, y.dim() - 2),
    "transpose dims": lambda m, y: y.transpose(y.dim() - 2, y.dim() - 1),
    "split dim": lambda m, y: torch.cat(torch.split(y, 3, dim=y.dim() - 3)[::-1], 1),
    "roll dims": lambda m, y: torch.roll(y, 1, dims=(y.dim() - 1,)),
    "normalize dim": lambda m, y: F.normalize(y, dim=y.dim() - 3),
    "pad amounts": lambda m, y: F.pad(y, y.shape[-2:])[..., :5, :5],
    "pixel_shuffle factor": lambda m, y: F.pixel_unshuffle(F.pixel_shuffle(y[:, :4], y.shape[-1] // 2), 2),
    "conv groups": lambda m, y: F.conv2d(y, m.depthwise, groups=y.shape[1]),
    "expand broadcast": lambda m, y: m.one(y).expand(-1, y.shape[1], -1, -1) * y,
}


class ShapeDerived(nn.Module):
    """conv → BN → ``op(self, y)`` → conv head, the op reading dims or sizes from ``y``'s shape."""

    def __init__(self, op) -> None:
        super().__init__()
        self.c1, self.bn, self.op, self.head = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), op, nn.LazyConv2d(4, 1)
        self.depthwise, self.one = nn.Parameter(torch.randn(6, 1, 1, 1)), nn.Conv2d(6, 1, 1)

    def forward(self, x):
        y = self.op(self, self.bn(self.c1(x)))
        return self.head(y).mean((2, 3))


@pytest.mark.parametrize("scheme", ["nr", "ca"])
@pytest.mark.parametrize("case", list(SHAPE_DERIVED))
def test_dims_and_sizes_read_from_a_shape_analyse_and_rejuvenate_exactly(case, scheme):
    """A dim index read as ``y.dim() - 1`` is the number it was on the example; a size read from a shape (a pad, a
    shuffle factor, conv groups, an expand that broadcasts one channel) may follow a width, so what it touches
    freezes.  Each crashed its rule ("this is a bug in nrfx") or, the expand, the rewritten model."""
    torch.manual_seed(0)
    model = ShapeDerived(SHAPE_DERIVED[case]).double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model(x)  # the lazy head takes its width
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "fx"  # the nodes are fx's (export gives the numbers)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=x, scheme=scheme, align=1,
                          constants="keep", analysis=analysis)
    other = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(other), model(other), rtol=1e-10, atol=1e-12)


def test_layernorm_on_linear_features_freezes():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    a = analyze(model, (B, 6))
    assert a.params == numel(model)
    assert a.spaces[out_ids(a, "0")[0]].is_frozen
    with pytest.warns(nrfx.NrfxWarning, match="frozen"):
        u = a.utilization({"0": alive(8, (1,))})
    assert u.live_params == a.params


@pytest.mark.parametrize("nd", [1, 2])
def test_instance_norm_is_per_channel(nd):
    norm = nn.InstanceNorm1d(6, affine=True) if nd == 1 else nn.InstanceNorm2d(6, affine=True)
    conv = nn.Conv1d if nd == 1 else nn.Conv2d
    model = nn.Sequential(conv(3, 6, 1), norm, nn.ReLU(), conv(6, 4, 1))
    shape = (B, 3, 9) if nd == 1 else (B, 3, 4, 5)
    P = math.prod(shape[2:])

    def params(w):
        return 4 * w + 2 * w + 4 * w + 4

    a = analyze(model, shape)
    check_costs(a, model, 3 * 6 * P + 4 * 6 * P, {"1": alive(6, (2, 3, 4))}, params(3), 3 * 3 * P + 4 * 3 * P)
    assert out_ids(a, "0") == ids(a, "1.weight", 0) == in_ids(a, "3")


def test_norm_masks_read_gamma():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0, 0.001, 0.5, 0.0, 0.03]))
    masks = nrfx.norm_masks(model)  # |γ| >= 0.01 · 2
    assert masks["1"].tolist() == [True, True, False, True, False, True]
    a = analyze(model, (B, 3, 4, 4))
    u = a.utilization()  # masks read from γ at analysis time
    assert u.live_params == (3 * 4 + 4) + 2 * 4 + (4 * 4 + 4)
    assert u.live_macs == (3 * 4 + 4 * 4) * 16


# -- channel-wise ops ----------------------------------------------------------------------------------------
ZERO_KEEPING = [
    nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.RReLU(), nn.GELU(), nn.SiLU(), nn.Tanh(), nn.Hardswish(), nn.ELU(),
    nn.Dropout(0.5), nn.Dropout2d(0.3), nn.Identity(),
    F.relu, torch.relu, F.gelu, F.silu, lambda y: y.relu(), lambda y: F.relu(y, inplace=True),
    lambda y: y.clamp(min=0), lambda y: F.dropout(y, 0.2, training=False), lambda y: -y,
]
ZERO_BREAKING = [nn.Sigmoid(), nn.Softplus(), nn.Hardsigmoid(), torch.sigmoid, lambda y: y.sigmoid(), torch.exp]


def _op_id(op):
    return type(op).__name__ if isinstance(op, nn.Module) else getattr(op, "__name__", "fn")


@pytest.mark.parametrize("op", ZERO_KEEPING + ZERO_BREAKING, ids=[_op_id(o) for o in ZERO_KEEPING + ZERO_BREAKING])
def test_activations_share_the_space_and_keep_zeros_iff_f0_is_0(op):
    model = Between(op)
    a = analyze(model, (B, 3, 4, 4))
    live = 4 if any(op is o for o in ZERO_KEEPING) else 6
    _, macs = between_costs(6, 16, 16)
    live_params, live_macs = between_costs(live, 16, 16)
    check_costs(a, model, macs, {"bn": alive(6, (1, 4))}, live_params, live_macs)
    assert out_ids(a, "c1") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "c1"))[0]


SPATIAL_OPS = [  # (op, input H×W, output H×W)
    (nn.MaxPool2d(2), (8, 8), (4, 4)),
    (nn.AvgPool2d(3, stride=2, padding=1), (7, 9), (4, 5)),
    (nn.AdaptiveAvgPool2d(2), (7, 9), (2, 2)),
    (nn.AdaptiveMaxPool2d((1, 3)), (6, 6), (1, 3)),
    (lambda y: F.max_pool2d(y, 3, stride=2), (9, 9), (4, 4)),
    (lambda y: F.avg_pool2d(y, kernel_size=2), (8, 6), (4, 3)),
    (lambda y: F.adaptive_avg_pool2d(y, 1), (5, 5), (1, 1)),
    (lambda y: F.interpolate(y, scale_factor=2, mode="nearest"), (3, 4), (6, 8)),
    (lambda y: F.interpolate(y, size=(5, 7), mode="bilinear", align_corners=False), (3, 4), (5, 7)),
    (nn.Upsample(scale_factor=2, mode="bilinear"), (3, 3), (6, 6)),
    (lambda y: F.pad(y, (1, 1, 2, 0)), (4, 4), (6, 6)),
    (lambda y: F.pad(y, (1, 2, 1, 2), mode="reflect"), (4, 4), (7, 7)),
    (nn.ZeroPad2d((0, 1, 2, 3)), (4, 4), (9, 5)),
    (nn.ReflectionPad2d((1, 2, 0, 1)), (4, 4), (5, 7)),
    (nn.ReplicationPad2d(2), (3, 4), (7, 8)),
    (nn.CircularPad2d(1), (4, 4), (6, 6)),
    (nn.ConstantPad2d((1, 0, 0, 2), 0.0), (4, 4), (6, 5)),
]


@pytest.mark.parametrize("op,hw,out_hw", SPATIAL_OPS, ids=[f"{_op_id(o)}{i}" for i, (o, *_) in enumerate(SPATIAL_OPS)])
def test_pooling_resizing_padding_pass_the_space(op, hw, out_hw):
    model = Between(op)
    a = analyze(model, (B, 3, *hw))
    p_in, p_out = math.prod(hw), math.prod(out_hw)
    _, macs = between_costs(6, p_in, p_out)
    live_params, live_macs = between_costs(4, p_in, p_out)
    check_costs(a, model, macs, {"bn": alive(6, (0, 5))}, live_params, live_macs)
    assert out_ids(a, "c1") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "c1"))[0]


@pytest.mark.parametrize("op", [lambda y: F.pad(y, (1, 1, 1, 1), value=1.0), nn.ConstantPad2d(1, 1.0)],
                         ids=["F.pad", "ConstantPad2d"])
def test_pad_with_a_nonzero_value_loses_zeros(op):
    model = Between(op)
    a = analyze(model, (B, 3, 4, 4))
    _, macs = between_costs(6, 16, 36)
    check_costs(a, model, macs, {"bn": alive(6, (0, 5))}, a.params, macs)
    assert not frozen(a, out_ids(a, "c1"))[0]  # the space passes; its dead channels are no longer zero


class Unpooled(nn.Module):
    """conv-bn-relu → max pool with indices → conv-bn-relu → max unpool by those indices → head (SegNet)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool, self.unpool = nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)
        self.functional = functional

    def forward(self, x):
        y = self.enc(x)
        if self.functional:
            pooled, indices = F.max_pool2d(y, 2, return_indices=True)
            return self.head(F.max_unpool2d(self.mid(pooled), indices, 2, output_size=y.shape[-2:]))
        pooled, indices = self.pool(y)
        return self.head(self.unpool(self.mid(pooled), indices, output_size=y.size()))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_an_unpooling_ties_its_input_to_the_pooled_channels(functional, scheme):
    """Channel c of the unpooled tensor is scattered by channel c of the pooling's indices: the encoder's and the
    middle's spaces are one (rewritten apart, the channels would be scattered by another channel's positions)."""
    torch.manual_seed(0)
    model = Unpooled(functional).double().eval()
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert out_ids(a, "enc.0") == out_ids(a, "mid.0") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "enc.0"))[0]
    with torch.no_grad():
        for norm in (model.enc[1], model.mid[1]):
            norm.weight[[2, 5]] = 0
            norm.bias[[2, 5]] = 0
    expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme, align=1)
    torch.testing.assert_close(new(x), expected)
    assert len(new.nrfx_plan.keep[out_ids(a, "enc.0")[0]]) == 6


class GluHead(nn.Module):
    """conv1x1(3→12) → bn(12) → GLU over the channels → head(6→4)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.c1, self.bn, self.glu, self.head = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12), nn.GLU(1), nn.Conv2d(6, 4, 1)
        self.functional = functional

    def forward(self, x):
        y = self.bn(self.c1(x))
        return self.head(F.glu(y, 1) if self.functional else self.glu(y))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.GLU", "F.glu"])
def test_glu_ties_its_halves_and_is_zero_where_the_first_half_is(functional):
    model = GluHead(functional)
    a = analyze(model, (B, 3, 4, 4))
    (space,) = [s for s in a.spaces if not s.is_frozen]
    assert space.width == 6 and in_ids(a, "head") == [a.spaces.index(space)]
    assert ids(a, "c1.weight", 0) == [a.spaces.index(space)] * 2  # rows [0, 6) and [6, 12): one space, twice

    def params(w):
        return (3 * 2 * w + 2 * w) + 2 * 2 * w + (4 * w + 4)

    def macs(w):
        return 16 * (3 * 2 * w + 4 * w)

    check_costs(a, model, macs(6), {"bn": alive(12, (1, 4))}, params(4), macs(4))  # a · σ(b) = 0 where a = 0
    check_costs(a, model, macs(6), {"bn": alive(12, (7, 10))}, params(6), macs(6))  # σ(0) = ½: alive


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_glu_rejuvenates_its_halves_together(scheme):
    torch.manual_seed(0)
    model = GluHead(False).double().eval()
    x = torch.randn(B, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model.bn.weight[[1, 4]] = 0
        model.bn.bias[[1, 4]] = 0
    expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme, align=1)
    torch.testing.assert_close(new(x), expected)
    assert len(new.nrfx_plan.keep[0]) == 4 and new.get_submodule("c1").out_channels % 2 == 0


@pytest.mark.parametrize("op", [nn.Softmax2d(), nn.Softmax(dim=None), nn.Softmin(0), lambda y: F.softmax(y)],
                         ids=["Softmax2d", "Softmax-dim-None", "Softmin", "F.softmax-dim-None"])
def test_a_softmax_over_an_unbatched_input_freezes_its_channels(op):
    """Softmax2d normalises dim -3 and a softmax without ``dim`` torch's legacy dim (0 for a 3-d input): on an
    unbatched C×H×W input both are the channels, so widening them would change every output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), op if isinstance(op, nn.Module) else _Fn(op),
                          nn.Conv2d(8, 4, 1)).double().eval()
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = nrfx.analyze(model, x)
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=x, align=1, analysis=a)
    assert "softmax over channels" in reasons(a, out_ids(a, "0"))
    torch.testing.assert_close(new(x), model(x))


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_pad_along_channels_freezes():
    model = Between(lambda y: F.pad(y, (0, 0, 0, 0, 1, 1))[:, 1:7])
    a = analyze(model, (B, 3, 4, 4))
    assert a.spaces[out_ids(a, "c1")[0]].is_frozen
    assert "padding along channels" in reasons(a, out_ids(a, "c1"))


# -- binary ops ----------------------------------------------------------------------------------------------
def _iadd(a, b):
    a += b
    return a


def _isub(a, b):
    a -= b
    return a


def _imul(a, b):
    a *= b
    return a


def _idiv(a, b):
    a /= b
    return a


BINARY = {  # form -> (fn, zero rule): add/sub zero where both are, mul where either is, div where the first is
    "a+b": (lambda a, b: a + b, "and"),
    "a-b": (lambda a, b: a - b, "and"),
    "a.add(b)": (lambda a, b: a.add(b), "and"),
    "a.sub(b)": (lambda a, b: a.sub(b), "and"),
    "torch.add": (lambda a, b: torch.add(a, b), "and"),
    "torch.sub": (lambda a, b: torch.sub(a, b), "and"),
    "a+=b": (_iadd, "and"),
    "a-=b": (_isub, "and"),
    "a.add_(b)": (lambda a, b: a.add_(b), "and"),
    "torch.maximum": (lambda a, b: torch.maximum(a, b), "and"),
    "a*b": (lambda a, b: a * b, "or"),
    "a.mul(b)": (lambda a, b: a.mul(b), "or"),
    "torch.mul": (lambda a, b: torch.mul(a, b), "or"),
    "a*=b": (_imul, "or"),
    "a.mul_(b)": (lambda a, b: a.mul_(b), "or"),
    "a/b": (lambda a, b: a / b, "first"),
    "a.div(b)": (lambda a, b: a.div(b), "first"),
    "torch.div": (lambda a, b: torch.div(a, b), "first"),
    "a/=b": (_idiv, "first"),
}


class TwoBranches(nn.Module):
    """a = bn1(conv1x1(x)), b = bn2(conv3x3(x)) (both 6 wide), y = op(a, b), head conv1x1(6→4)."""

    def __init__(self, op):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)
        self.fn = op

    def forward(self, x):
        return self.head(self.fn(self.b1(self.c1(x)), self.b2(self.c2(x))))


@pytest.mark.parametrize("form", list(BINARY))
def test_binary_ops_tie_operands(form):
    fn, rule = BINARY[form]
    model = TwoBranches(fn)
    a = analyze(model, (B, 3, 5, 5))
    P = 25

    def params(w):
        return (3 * w + w) + 2 * w + (27 * w + w) + 2 * w + (4 * w + 4)

    def macs(w):
        return (3 * w + 27 * w + 4 * w) * P

    live = {"and": 5, "or": 3, "first": 4}[rule]  # dead: b1 {0,1}, b2 {1,2}
    check_costs(a, model, macs(6), {"b1": alive(6, (0, 1)), "b2": alive(6, (1, 2))}, params(live), macs(live))
    assert out_ids(a, "c1") == out_ids(a, "c2") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "c1"))[0]


class InPlaceKeepsName(nn.Module):
    """y.add_(z) whose result is not used: the head reads ``y`` after the in-place add."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.b1(self.c1(x))
        y.add_(self.b2(self.c2(x)))
        return self.head(y)


def test_in_place_method_result_unused_still_counts_both_operands():
    model = InPlaceKeepsName()
    a = analyze(model, (B, 3, 4, 4))
    P = 16
    # y after add_ is zero only where both b1 and b2 are: dead = {1}
    masks = {"b1": alive(6, (0, 1)), "b2": alive(6, (1, 2))}
    live = 5
    params = 2 * (4 * live + 2 * live) + 4 * live + 4
    check_costs(a, model, (3 + 3 + 4) * 6 * P, masks, params, (3 + 3 + 4) * live * P)


# -- broadcasting --------------------------------------------------------------------------------------------
class SEGate(nn.Module):
    """x * sigmoid(fc2(relu(fc1(pool(x))))) with 1×1 convs: the gate's C ties to x's C."""

    def __init__(self, c=8, r=2):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s)


def test_se_gate_ties_the_channel_dim():
    model = SEGate()
    a = analyze(model, (B, 3, 6, 6))
    P = 36

    def params(w):
        return (3 * w + w) + 2 * w + (2 * w + 2) + (2 * w + w) + (4 * w + 4)

    def macs(w):
        return 3 * w * P + 2 * w + 2 * w + 4 * w * P

    # channel 3 is zero into fc1 (pooled) and into head (x * s): dead
    check_costs(a, model, macs(8), {"bn": alive(8, (3,))}, params(7), macs(7))
    (s,) = out_ids(a, "c1")
    assert in_ids(a, "fc1") == out_ids(a, "fc2") == in_ids(a, "head") == [s]
    assert not a.spaces[s].is_frozen
    assert out_ids(a, "fc1") != [s] and not frozen(a, out_ids(a, "fc1"))[0]


class SpatialGate(nn.Module):
    """x * sigmoid(conv(x → 1 channel)): a [B,1,H,W] operand does not tie x's channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.att = nn.Conv2d(8, 1, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        return self.head(x * torch.sigmoid(self.att(x)) * 2.0)


def test_size_one_channel_operand_does_not_tie():
    model = SpatialGate()
    a = analyze(model, (B, 3, 5, 5))
    P = 25

    def params(w):
        return 4 * w + 2 * w + (9 * w + 1) + (4 * w + 4)

    check_costs(a, model, (3 * 8 + 9 * 8 + 4 * 8) * P, {"bn": alive(8, (0, 7))}, params(6), (3 + 9 + 4) * 6 * P)
    (s,) = out_ids(a, "c1")
    assert in_ids(a, "att") == in_ids(a, "head") == [s]
    assert out_ids(a, "att") != [s]
    assert not a.spaces[s].is_frozen


# -- cat / split ---------------------------------------------------------------------------------------------
class CatBranches(nn.Module):
    """y = cat([bn1(conv(x)) : 3, bn2(conv(x)) : 5], 1) → ``tail(self, y)``."""

    def __init__(self, tail, heads=((8, 4),)):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        for i, (cin, cout) in enumerate(heads):
            self.add_module(f"h{i}", nn.Conv2d(cin, cout, 1))
        self.tail = tail

    def forward(self, x):
        y = torch.cat([self.b1(self.c1(x)), self.b2(self.c2(x))], 1)
        return self.tail(self, y)


def test_cat_output_is_the_list_of_input_spaces():
    model = CatBranches(lambda m, y: m.h0(y))
    a = analyze(model, (B, 3, 4, 4))
    P = 16
    sa, sb = out_ids(a, "c1"), out_ids(a, "c2")
    assert in_ids(a, "h0") == sa + sb and sa != sb
    assert [a.spaces[s].width for s in sa + sb] == [3, 5]

    def params(wa, wb):
        return (4 * wa + 2 * wa) + (28 * wb + 2 * wb) + (4 * (wa + wb) + 4)

    def macs(wa, wb):
        return (3 * wa + 27 * wb + 4 * (wa + wb)) * P

    masks = {"b1": alive(3, (0,)), "b2": alive(5, (2, 4))}
    check_costs(a, model, macs(3, 5), masks, params(2, 3), macs(2, 3))


def _split_tails():
    def pair(p, q):
        return p, q

    return {
        "torch.split": lambda y: torch.split(y, [4, 4], 1),
        "y.split": lambda y: y.split(4, dim=1),
        "y.chunk": lambda y: y.chunk(2, 1),
        "torch.chunk": lambda y: torch.chunk(y, 2, dim=1),
        "torch.tensor_split": lambda y: torch.tensor_split(y, [4], dim=1),
        "getitem": lambda y: pair(y[:, :4], y[:, 4:]),
        "getitem-ellipsis": lambda y: pair(y[:, 0:4, ...], y[:, -4:]),
        "narrow": lambda y: pair(y.narrow(1, 0, 4), torch.narrow(y, 1, 4, 4)),
    }


@pytest.mark.parametrize("form", list(_split_tails()))
def test_split_cuts_across_the_concat_border(form):
    cut = _split_tails()[form]

    def tail(m, y):
        p, q = cut(y)
        return m.h0(p) + m.h1(q)

    model = CatBranches(tail, heads=((4, 2), (4, 2)))
    a = analyze(model, (B, 3, 4, 4))
    P = 16
    # y = [A:3 | B:5]; p = [A | B[0:1]], q = B[1:5]: B is cut in two spaces
    (sa,), (sb0, sb1) = out_ids(a, "c1"), out_ids(a, "c2")
    assert [a.spaces[s].width for s in (sa, sb0, sb1)] == [3, 1, 4]
    assert in_ids(a, "h0") == [sa, sb0] and in_ids(a, "h1") == [sb1]
    assert ids(a, "b2.weight", 0) == [sb0, sb1]
    assert not any(frozen(a, [sa, sb0, sb1]))
    # h0 and h1 outputs meet in the (frozen) model output
    assert out_ids(a, "h0") == out_ids(a, "h1")

    def params(wa, wb0, wb1):
        wb = wb0 + wb1
        return (4 * wa + 2 * wa) + (28 * wb + 2 * wb) + (2 * (wa + wb0) + 2) + (2 * wb1 + 2)

    def macs(wa, wb0, wb1):
        return (3 * wa + 27 * (wb0 + wb1) + 2 * (wa + wb0) + 2 * wb1) * P

    # b1 dead {0}: A has 2; b2 dead {0, 3}: B[0:1] has 0, B[1:5] has 3
    masks = {"b1": alive(3, (0,)), "b2": alive(5, (0, 3))}
    check_costs(a, model, macs(3, 1, 4), masks, params(2, 0, 3), macs(2, 0, 3))


def test_getitem_slice_inside_both_atoms():
    # y[:, 2:6] = [A[2:3] | B[0:3]]; the rest of y is read by nothing (so counts alive)
    model = CatBranches(lambda m, y: m.h0(y[:, 2:6]), heads=((4, 2),))
    a = analyze(model, (B, 3, 4, 4))
    P = 16
    sa, sb = out_ids(a, "c1"), out_ids(a, "c2")
    assert [a.spaces[s].width for s in sa] == [2, 1] and [a.spaces[s].width for s in sb] == [3, 2]
    assert in_ids(a, "h0") == [sa[1], sb[0]]
    # b1 dead {0, 2}: only 2 is read (dead); 0 is read by nothing (alive). b2 dead {1, 4}: 1 dead, 4 unread.
    masks = {"b1": alive(3, (0, 2)), "b2": alive(5, (1, 4))}
    wa, wb = 2, 4
    params = (4 * wa + 2 * wa) + (28 * wb + 2 * wb) + (2 * 2 + 2)
    macs = (3 * wa + 27 * wb + 2 * 2) * P
    check_costs(a, model, (3 * 3 + 27 * 5 + 2 * 4) * P, masks, params, macs)


def test_split_pieces_added_back_tie_the_halves():
    # p + q ties the two halves of y channel by channel: A[0:3]+B[0:1] ~ B[1:5]
    def tail(m, y):
        p, q = y.split(4, 1)
        return m.h0(p + q)

    model = CatBranches(tail, heads=((4, 2),))
    a = analyze(model, (B, 3, 4, 4))
    sa, sb = out_ids(a, "c1"), out_ids(a, "c2")
    assert a.params == numel(model)
    # B = [b0:1 | b1:3 | b2:1] with A ~ b1 and b0 ~ b2
    assert [a.spaces[s].width for s in sa] == [3]
    assert [a.spaces[s].width for s in sb] == [1, 3, 1]
    assert sb[1] == sa[0] and sb[0] == sb[2]
    assert in_ids(a, "h0") == [*sa, sb[0]]


# -- flatten / view / permute --------------------------------------------------------------------------------
class FlattenHead(nn.Module):
    """conv3x3 s2 (3→6) → bn → relu → ``flat`` → linear(6·4·4 → 5): channel c is a block of 16 features."""

    def __init__(self, flat, fc_in=6 * 16):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.flat = flat if isinstance(flat, nn.Module) else None
        self.fn = None if isinstance(flat, nn.Module) else flat
        self.fc = nn.Linear(fc_in, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.c1(x)))
        y = self.flat(y) if self.flat is not None else self.fn(y)
        return self.fc(y)


FLATTENS = {
    "torch.flatten": (lambda y: torch.flatten(y, 1), False),
    "y.flatten": (lambda y: y.flatten(1), False),
    "nn.Flatten": (nn.Flatten(), False),
    "view(size(0),-1)": (lambda y: y.view(y.size(0), -1), False),
    "reshape(shape[0],-1)": (lambda y: y.reshape(y.shape[0], -1), False),
    "view(B,-1)": (lambda y: y.view(B, -1), False),
    "view(-1,96) literal": (lambda y: y.view(-1, 96), True),
    "reshape(B,96) literal": (lambda y: y.reshape(B, 96), True),
}


@pytest.mark.parametrize("form", list(FLATTENS))
def test_flatten_channel_blocks_into_linear(form):
    flat, literal = FLATTENS[form]
    model = FlattenHead(flat)
    a = analyze(model, (B, 3, 8, 8))
    hw = 4 * 4

    def params(w):
        return (27 * w + w) + 2 * w + (5 * w * hw + 5)

    def macs(w):
        return 27 * w * hw + 5 * w * hw

    live = 6 if literal else 5
    check_costs(a, model, macs(6), {"bn": alive(6, (2,))}, params(live), macs(live))
    (s,) = out_ids(a, "c1")
    assert in_ids(a, "fc") == [s]
    assert a.param_info["fc.weight"].dims[1].inner == hw
    assert a.spaces[s].is_frozen == literal
    if literal:
        assert "literal" in reasons(a, [s])


def test_view_with_literal_channel_count_freezes():
    model = FlattenHead(lambda y: y.view(B, 6, 16).mean(2), fc_in=6)
    a = analyze(model, (B, 3, 8, 8))
    assert a.params == numel(model)
    assert a.spaces[out_ids(a, "c1")[0]].is_frozen


@pytest.mark.parametrize("move", [
    lambda y: y.permute(0, 2, 3, 1),
    lambda y: torch.permute(y, (0, 2, 3, 1)),
    lambda y: y.transpose(1, 3),
    lambda y: torch.transpose(y, 1, -1),
    lambda y: y.flatten(2).transpose(1, 2),
], ids=["permute", "torch.permute", "transpose", "torch.transpose", "flatten(2).transpose"])
def test_permute_transpose_move_the_space(move):
    model = Between(move, head="linear")
    a = analyze(model, (B, 3, 3, 5))
    P = 15
    _, macs = between_costs(6, P, P)
    live_params, live_macs = between_costs(3, P, P)
    check_costs(a, model, macs, {"bn": alive(6, (0, 2, 4))}, live_params, live_macs)
    assert out_ids(a, "c1") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "c1"))[0]


# -- reductions ----------------------------------------------------------------------------------------------
SPATIAL_REDUCTIONS = [
    lambda y: y.mean((2, 3)),
    lambda y: torch.mean(y, dim=[2, 3]),
    lambda y: y.sum(dim=(-2, -1)),
    lambda y: y.amax(dim=(2, 3)),
    lambda y: torch.amax(y, (2, 3)),
    lambda y: y.mean(3).mean(2),
    lambda y: y.mean((2, 3), keepdim=True).flatten(1),
    lambda y: torch.t(y.mean((2, 3))).t(),  # (B, C) -> (C, B) -> (B, C): t swaps the two dims and back
]


@pytest.mark.parametrize("reduce", SPATIAL_REDUCTIONS, ids=[f"r{i}" for i in range(len(SPATIAL_REDUCTIONS))])
def test_reductions_over_spatial_dims_pass_the_space(reduce):
    model = Between(lambda y: reduce(F.relu(y)), head="linear")
    a = analyze(model, (B, 3, 4, 5))
    _, macs = between_costs(6, 20, 1)
    live_params, live_macs = between_costs(5, 20, 1)
    check_costs(a, model, macs, {"bn": alive(6, (3,))}, live_params, live_macs)
    assert out_ids(a, "c1") == in_ids(a, "head")
    assert not frozen(a, out_ids(a, "c1"))[0]


class _Reduced(nn.Module):
    """conv → bn → a reduction over channels → a 1-channel conv."""

    def __init__(self, reduce):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(1, 4, 1)
        self.reduce = reduce

    def forward(self, x):
        return self.head(self.reduce(self.bn(self.c1(x))))


@pytest.mark.parametrize(("reduce", "count"), [
    (lambda y: y.mean(1, keepdim=True), 6),
    (lambda y: y.sum(dim=1, keepdim=True), 1),
    (lambda y: torch.mean(y, 1, True), 6),
], ids=["mean", "sum", "torch.mean"])
def test_a_channel_sum_or_mean_reads_its_channels(reduce, count):
    """A plain sum/mean over one channel dim consumes the channels (a dead one is dead there) and records its
    original count; the space stays free (the rewrite sums the survivors: tests/test_aten_gaps.py)."""
    model = _Reduced(reduce)
    a = analyze(model, (B, 3, 4, 4))
    macs = (3 * 6 + 4) * 16
    check_costs(a, model, macs, {"bn": alive(6, (0,))}, a.params - (3 + 1 + 2), (3 * 5 + 4) * 16)
    assert not any(frozen(a, out_ids(a, "c1")))
    (record,) = [r for r in a.records.values() if type(r).__name__ == "SumRecord"]
    assert record.count == count and record.kind == ("sum" if count == 1 else "mean")


@pytest.mark.parametrize("reduce", [
    lambda y: torch.amax(y, 1, keepdim=True),
    lambda y: F.softmax(y, dim=1)[:, :1],
    lambda y: y.std(1, keepdim=True),
], ids=["amax", "softmax", "std"])
def test_reductions_over_channels_freeze(reduce):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
            self.head = nn.Conv2d(1, 4, 1)

        def forward(self, x):
            return self.head(reduce(self.bn(self.c1(x))))

    model = M()
    a = analyze(model, (B, 3, 4, 4))
    macs = (3 * 6 + 4) * 16
    check_costs(a, model, macs, {"bn": alive(6, (0,))}, a.params, macs)
    spaces = out_ids(a, "c1")  # the softmax case slices the (frozen) space in two
    assert all(frozen(a, spaces))
    assert "over channels" in reasons(a, spaces)


# -- attention -----------------------------------------------------------------------------------------------
def test_multihead_attention_opened_macs_and_free_embedding():
    """A self-attention nn.MultiheadAttention is opened (capture/mha): the same MACs, and the stream it reads is free
    (two dead input channels cost 2 rows of ``inp`` and 2 columns of each of q, k, v in ``in_proj_weight``)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            y = self.inp(x)
            return self.out(self.mha(y, y, y, need_weights=False)[0])

    t, e = 5, 8
    model = M()
    a = analyze(model, (B, t, 6))
    mha = 3 * t * e * e + 2 * t * t * e + t * e * e  # q/k/v projections, q·kᵀ and attn·v, out projection
    macs = t * 6 * e + mha + t * e * 3
    check_costs(a, model, macs, {"inp": alive(8, (0, 1))}, a.params - 2 * (6 + 1) - 2 * 3 * e,
                macs - 2 * t * 6 - 2 * 3 * t * e)
    assert a.params == 6 * 8 + 8 + (3 * e * e + 3 * e) + (e * e + e) + 8 * 3 + 3
    assert not a.spaces[out_ids(a, "inp")[0]].is_frozen


def test_scaled_dot_product_attention():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 10)
            self.out = nn.Linear(10, 3)

        def forward(self, x):
            return self.out(F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x)))

    t = 5
    model = M()
    a = analyze(model, (B, t, 6))

    def costs(dv):
        params = 2 * (6 * 8 + 8) + (6 * dv + dv) + (3 * dv + 3)
        macs = t * 6 * (8 + 8 + dv) + t * t * (8 + dv) + t * dv * 3
        return params, macs

    params, macs = costs(10)
    assert a.params == params
    live_params, live_macs = costs(8)
    # q/k head dims are frozen (the 1/√d scale): masks there change nothing; v's dim flows to out
    masks = {"v": alive(10, (0, 9)), "q": alive(8, (1,))}
    check_costs(a, model, macs, masks, live_params, live_macs)
    assert out_ids(a, "q") == out_ids(a, "k") and a.spaces[out_ids(a, "q")[0]].is_frozen
    assert out_ids(a, "v") == in_ids(a, "out") and not a.spaces[out_ids(a, "v")[0]].is_frozen


# -- weight sharing and functional layers --------------------------------------------------------------------
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.c(self.bn0(self.c0(x)))
        return self.head(self.c(F.relu(y)))


def test_module_called_twice_counts_params_once_macs_twice():
    model = Shared()
    a = analyze(model, (B, 3, 5, 5))
    P = 25

    def params(w):
        return (3 * w + w) + 2 * w + (9 * w * w + w) + (2 * w + 2)

    def macs(w):
        return 3 * w * P + 2 * 9 * w * w * P + 2 * w * P

    assert a.params == params(4)
    # bn0 dead {1} alone: the second call of c reads c's own output (alive) -> nothing dead
    check_costs(a, model, macs(4), {"bn0": alive(4, (1,))}, params(4), macs(4))
    # also dead at c's output: zero at all three readers -> dead
    check_costs(a, model, macs(4), {"bn0": alive(4, (1,)), "c": alive(4, (1,))}, params(3), macs(3))
    (s,) = out_ids(a, "c0")
    assert in_ids(a, "c") == out_ids(a, "c") == in_ids(a, "head") == [s]
    assert not a.spaces[s].is_frozen


class Functional(nn.Module):
    """F.conv2d / F.batch_norm-free / F.linear on bare nn.Parameters."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.b = nn.Parameter(torch.zeros(6))
        self.bn = nn.BatchNorm2d(6)
        self.fc_w = nn.Parameter(torch.randn(5, 6))
        self.fc_b = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        y = F.relu(self.bn(F.conv2d(x, self.w, self.b, stride=2, padding=1)))
        return F.linear(y.mean((2, 3)), self.fc_w, self.fc_b)


def test_functional_conv_and_linear_on_parameters():
    model = Functional()
    a = analyze(model, (B, 3, 8, 8))
    P = 4 * 4

    def params(w):
        return 27 * w + w + 2 * w + 5 * w + 5

    check_costs(a, model, 27 * 6 * P + 5 * 6, {"bn": alive(6, (0, 5))}, params(4), 27 * 4 * P + 5 * 4)
    (s,) = ids(a, "w", 0)
    assert ids(a, "b", 0) == ids(a, "bn.weight", 0) == ids(a, "fc_w", 1) == [s]
    assert ids(a, "w", 1) is None
    assert not a.spaces[s].is_frozen


def test_functional_linear_called_twice_ties_and_counts_twice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))
            self.inp = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            y = F.relu(self.inp(x))
            return self.out(F.linear(F.linear(y, self.w), self.w))

    model = M()
    a = analyze(model, (B, 4))
    check_costs(a, model, 4 * 6 + 2 * 36 + 12, {"inp": alive(6, (5,))}, a.params, 4 * 6 + 2 * 36 + 12)
    assert ids(a, "w", 0) == ids(a, "w", 1) == out_ids(a, "inp") == in_ids(a, "out")


def test_conv_mask_behind_a_norm_warns_and_keeps_the_channels():
    """A conv's zero channels leave its BatchNorm as constants: the mask cannot kill them, and says so."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    a = analyze(model, (B, 3, 4, 4))
    with pytest.warns(nrfx.NrfxWarning, match="key the mask by the norm"):
        u = a.utilization({"0": alive(4, (1,))})
    assert bool(u.alive[0].all())
    u = a.utilization({"1": alive(4, (1,))})  # keyed by the norm: dead
    assert u.alive[0].tolist() == [True, False, True, True]


# -- channels on a dim that is not the layer's channel dim -----------------------------------------------------
_C, _L = 16, 12  # a space of 16 channels moved onto the length dim of a (B, 12, 16) tensor


class _Functional(nn.Module):
    """A functional op on the moved tensor, its parameters shaped for the 12 'channels' of dim 1."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.weight, self.bias = nn.Parameter(torch.rand(_L) + 0.5), nn.Parameter(torch.randn(_L))
        self.register_buffer("mean", torch.randn(_L))
        self.register_buffer("var", torch.rand(_L) + 0.5)

    def forward(self, t):
        if self.op == "batch_norm":
            return F.batch_norm(t, self.mean, self.var, self.weight, self.bias)
        return F.group_norm(t, 3, self.weight, self.bias)


MIXING = {  # a layer whose kernel or statistics span the dims after its channel dim
    "conv1d_k1": lambda: nn.Conv1d(_L, _L, 1), "conv1d_k3": lambda: nn.Conv1d(_L, _L, 3, padding=1),
    "conv_transpose1d": lambda: nn.ConvTranspose1d(_L, _L, 1), "batch_norm1d": lambda: nn.BatchNorm1d(_L),
    "instance_norm1d": lambda: nn.InstanceNorm1d(_L, affine=True), "group_norm": lambda: nn.GroupNorm(3, _L),
    "F.batch_norm": lambda: _Functional("batch_norm"), "F.group_norm": lambda: _Functional("group_norm"),
}


class _Moved(nn.Module):
    """conv-bn-relu makes a 16-channel space; ``op`` runs with it on its length dim; a conv reads it back."""

    def __init__(self, op: nn.Module, transpose: bool = True):
        super().__init__()
        self.c1, self.bn, self.op, self.transpose = nn.Conv1d(4, _C, 1, bias=False), nn.BatchNorm1d(_C), op, transpose
        self.c2, self.head = nn.Conv1d(_C, 7, 1), nn.Linear(7, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))  # (B, 16, 12)
        y = self.op(y.transpose(1, 2)).transpose(1, 2) if self.transpose else self.op(y)
        return self.head(self.c2(y).mean(-1))


def _moved(op: nn.Module, transpose: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """The float64 eval model with 6 of the 16 channels dead (γ = β = 0), and a batch-3 input."""
    torch.manual_seed(0)
    model = _Moved(op, transpose).double().eval()
    with torch.no_grad():
        model.bn.weight[:6] = 0
        model.bn.bias[:6] = 0
        model.bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(3, 4, _L, dtype=torch.float64)


def _rejuvenations_keep_the_function(model: nn.Module, x: torch.Tensor, a: nrfx.Analysis) -> None:
    """Pruned (at U(θ)) and grown (1.3 × c(A)) under every scheme: the outputs stay those of the model."""
    with torch.no_grad():
        expected = model(x)
    live = a.utilization(a.masks_from(model)).live_params
    for budget in (nrfx.Budget(params=live), nrfx.Budget.fraction(1.3)):
        for scheme in ("nr", "cr", "ca"):
            new = nrfx.rejuvenate(model, None, budget, example_inputs=x, scheme=scheme, align=1, analysis=a)
            with torch.no_grad():
                torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12, msg=f"{scheme} {budget}")


@pytest.mark.parametrize("name", list(MIXING))
def test_channels_on_a_dim_that_a_layer_mixes_freeze(name):
    """A conv's spatial dims and a norm's statistics dims mix positions: a space found there freezes (the
    regression: the rule dropped it, and the rewrite failed, or GroupNorm's statistics changed silently)."""
    model, x = _moved(MIXING[name]())
    a = nrfx.analyze(model, x)
    (space,) = out_ids(a, "c1")
    assert frozen(a, [space]) == [True]
    assert "channels on dim 2 of" in reasons(a, [space])
    _rejuvenations_keep_the_function(model, x, a)


@pytest.mark.parametrize("functional", [False, True], ids=["Linear", "F.linear"])
def test_a_linear_passes_channels_on_its_leading_dims(functional):
    """Each row of a linear is computed on its own (MLP-Mixer's token mixing): a space on a leading dim
    flows through, resizable, and scales the linear's MACs (the regression: the rule dropped it)."""
    weight = nn.Parameter(torch.randn(_L, _L))

    class Token(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, t):
            return F.linear(t, self.weight)

    model, x = _moved(Token() if functional else nn.Linear(_L, _L, bias=False), transpose=False)
    a = nrfx.analyze(model, x)
    (space,) = in_ids(a, "c2")
    assert out_ids(a, "c1") == [space] and frozen(a, [space]) == [False]
    assert a.utilization(a.masks_from(model)).alive[space].tolist() == [False] * 6 + [True] * 10
    macs = 4 * _C * _L + _L * _L * _C + _C * 7 * _L + 7 * 5  # c1, token mixing, c2, head (per example)
    live_macs = 4 * 10 * _L + _L * _L * 10 + 10 * 7 * _L + 7 * 5
    check_costs(a, model, macs, {"bn": alive(_C, tuple(range(6)))}, a.params - 6 * (4 + 2 + 7), live_macs)
    _rejuvenations_keep_the_function(model, x, a)


class _OneChannelGate(nn.Module):
    """x · σ(one channel): a 1-channel conv's map (CBAM's spatial attention) or the last channel of a split
    (FocalNet's ``gates[:, focal_level:]``), broadcast against a wider space."""

    def __init__(self, sliced: bool):
        super().__init__()
        self.sliced = sliced
        self.c1, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.f, self.bnf = nn.Conv2d(8, 8 + 3 if sliced else 1, 1, bias=False), nn.BatchNorm2d(8 + 3 if sliced else 1)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        f = self.bnf(self.f(x))
        if self.sliced:
            ctx, gates = torch.split(f, (8, 3), 1)
            return self.c2(ctx * torch.sigmoid(gates[:, 2:])).mean((2, 3))
        return self.c2(x * torch.sigmoid(f)).mean((2, 3))


@pytest.mark.parametrize("sliced", [False, True], ids=["one_channel_conv", "open_ended_slice"])
def test_one_channel_broadcast_against_many_freezes(sliced):
    """The regression: a size-1 channel dim that broadcasts was skipped, so its space was resized (grown
    past one channel, or pruned to none) and the rewritten product no longer broadcast."""
    torch.manual_seed(0)
    model = _OneChannelGate(sliced).double().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bnf):
            bn.weight.uniform_(0.5, 1.5)
            bn.weight[:3] = 0  # dead: three of bn1's channels, and (sliced) three of the split's channels
            bn.bias[:3] = 0
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    *_, space = out_ids(a, "f")  # sliced: the gates' channels are a space of their own
    assert frozen(a, [space]) == [True] and "a single channel broadcast against a wider dim" in reasons(a, [space])
    assert frozen(a, out_ids(a, "c1")) == [False]
    _rejuvenations_keep_the_function(model, x, a)


# -- ops along the channel dim whose output is not the channels ------------------------------------------------
class _AlongChannels(nn.Module):
    """conv-bn-relu (16 channels, 5 dead), one op along the channel dim, then a conv reading its result."""

    def __init__(self, op, width: int, bound: bool = False):
        super().__init__()
        self.op = op
        self.c1, self.bn = nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.head = nn.Conv2d(width, 6, 1), nn.Linear(6, 3)
        self.cap = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5) if bound else None

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = y.clamp(max=self.cap) if self.cap is not None else self.op(y)
        return self.head(self.c2(y).mean((2, 3)))


ALONG = {  # op, width it gives, whether the 16-channel space stays free
    "strided_slice": (lambda y: y[:, ::2], 8, False),
    "diff": (lambda y: torch.diff(y, dim=1), 15, False),
    "pad": (lambda y: F.pad(y, (0, 0, 0, 0, 1, 1)), 18, False),
    "cat_of_computed_tuple": (lambda y: torch.cat(y.chunk(2, 1)[::-1], 1), 16, True),
    "stack_of_unbind": (lambda y: torch.stack(y.unbind(1), 1), 16, False),
    "clamp_computed_bound": (lambda y: y.clamp(min=torch.zeros(1, 16, 1, 1, dtype=y.dtype)), 16, False),
}


@pytest.mark.parametrize("name", [*ALONG, "clamp_parameter_bound"])
def test_ops_along_channels_freeze_or_follow_and_keep_the_function(name):
    """The regressions: a strided slice, diff or pad along channels kept the 16 channels on a dim of 8, 15 or 18
    entries (the rewrite indexed out of bounds); cat/stack of a tuple computed in the graph crashed the analysis;
    a tensor bound of clamp was ignored (the rewrite failed).  Now each freezes, or follows the width."""
    op, width, free = ALONG.get(name, (None, 16, True))
    torch.manual_seed(0)
    model = _AlongChannels(op, width, bound=name == "clamp_parameter_bound").double().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.weight[[0, 3, 5, 8, 13]] = 0
        model.bn.bias[[0, 3, 5, 8, 13]] = 0
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not a.unknown_ops
    assert frozen(a, out_ids(a, "c1")) == [not free] * len(out_ids(a, "c1"))
    if name == "clamp_parameter_bound":
        assert ids(a, "cap", 1) == out_ids(a, "c1")  # the bound is resized with the channels
    _rejuvenations_keep_the_function(model, x, a)


# -- pixel shuffle ---------------------------------------------------------------------------------------------
class Shuffled(nn.Module):
    """conv1x1(3→k·r²) → bn → PixelShuffle(r) → head(k→5), or with ``unshuffle`` conv1x1(3→k) → bn →
    PixelUnshuffle(r) → head(k·r²→5)."""

    def __init__(self, k: int, r: int, unshuffle: bool, functional: bool) -> None:
        super().__init__()
        wide = k * r * r
        self.c1 = nn.Conv2d(3, k if unshuffle else wide, 1)
        self.bn = nn.BatchNorm2d(self.c1.out_channels)
        self.head = nn.Conv2d(wide if unshuffle else k, 5, 1)
        self.op = (F.pixel_unshuffle if unshuffle else F.pixel_shuffle) if functional else \
            (nn.PixelUnshuffle(r) if unshuffle else nn.PixelShuffle(r))
        self.r = r

    def forward(self, x):
        y = self.bn(self.c1(x))
        return self.head(self.op(y) if isinstance(self.op, nn.Module) else self.op(y, self.r))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
def test_a_pixel_shuffle_moves_channels_in_blocks_of_r_squared(functional):
    """Output channel c of PixelShuffle(2) is input channels [4c, 4c + 4): the two spaces are one planning unit
    (blocks of 4 and of 1), and an output channel is dead only where its whole block is."""
    model = Shuffled(4, 2, unshuffle=False, functional=functional)
    a = analyze(model, (B, 3, 4, 4))
    (wide,), (narrow,) = out_ids(a, "c1"), in_ids(a, "head")
    assert (a.spaces[wide].width, a.spaces[wide].block, a.spaces[narrow].width, a.spaces[narrow].block) == (16, 4, 4, 1)
    assert a.spaces[wide].unit == a.spaces[narrow].unit and not frozen(a, [wide, narrow]) == [True, True]

    def params(w):  # w live output channels: c1 3·4w + 4w, bn 2·4w, head 5w + 5
        return 12 * w + 4 * w + 8 * w + 5 * w + 5

    def macs(w):
        return 12 * w * 16 + 5 * w * 64

    check_costs(a, model, macs(4), {"bn": alive(16, (0, 1, 2, 3, 9))}, params(3), macs(3))  # block 0 dead
    check_costs(a, model, macs(4), {"bn": alive(16, (1, 6, 11, 12))}, params(4), macs(4))  # no whole block


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
def test_a_pixel_unshuffle_moves_each_channel_into_r_squared(functional):
    model = Shuffled(4, 2, unshuffle=True, functional=functional)
    a = analyze(model, (B, 3, 4, 4))
    (narrow,), (wide,) = out_ids(a, "c1"), in_ids(a, "head")
    assert (a.spaces[narrow].width, a.spaces[narrow].block, a.spaces[wide].width, a.spaces[wide].block) == (4, 1, 16, 4)
    assert a.spaces[wide].unit == a.spaces[narrow].unit and frozen(a, [wide, narrow]) == [False, False]

    def params(w):  # c1 3w + w, bn 2w, head 5·4w + 5
        return 3 * w + w + 2 * w + 20 * w + 5

    def macs(w):
        return 3 * w * 16 + 20 * w * 4

    check_costs(a, model, macs(4), {"bn": alive(4, (2,))}, params(3), macs(3))


class ShuffleDecoder(nn.Module):
    """An EDSR-style upsampler (conv(c→4c) → bn → relu → PixelShuffle(2)) between conv-bn-relu blocks, then a
    PixelUnshuffle(2) back down into the head."""

    def __init__(self, functional: bool, c: int = 8) -> None:
        super().__init__()
        self.functional = functional
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU())
        self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.mid = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.head = nn.Conv2d(4 * c, 5, 1)

    def forward(self, x):
        y = self.up(self.stem(x))
        y = self.mid(F.pixel_shuffle(y, 2) if self.functional else self.shuffle(y))
        return self.head(F.pixel_unshuffle(y, 2) if self.functional else self.unshuffle(y))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_pixel_shuffle_decoder_is_rejuvenated_block_by_block(functional, scheme):
    """Dead channels drawn per norm (β ≠ 0): the upsampler loses and adds whole blocks of 4, exactly."""
    torch.manual_seed(0)
    model = ShuffleDecoder(functional).double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not a.unknown_ops and not any(s.is_frozen for s in a.spaces[:-1])
    kill_per_norm(model, a, 0.4, seed=1, constants=True)
    with torch.no_grad():
        model.up[1].weight[:4] = 0  # one whole block of the upsampler dead (β = 0: nothing to keep it for)
        model.up[1].bias[:4] = 0
    new = assert_kept_exactly(model, x, schemes=(scheme,))
    assert 0 not in new.nrfx_plan.keep[out_ids(a, "up.0")[0]]
    assert new.get_submodule("up.0").out_channels == 4 * new.get_submodule("mid.0").in_channels


@pytest.mark.parametrize("same", [True, False], ids=["one-value", "per-position"])
def test_a_shuffled_constant_folds_only_when_it_is_one_value(same):
    """A dead block emitting relu(β): after the shuffle each of its output channel's r×r positions carries one
    of the r² constants; one value folds into the head's bias, different ones do not (warned, measured)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.PixelShuffle(2),
                          nn.Conv2d(4, 5, 1)).double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model[1].weight[:4] = 0
        model[1].bias[:4] = 0.7 if same else torch.tensor([0.7, 0.2, 0.9, 0.4], dtype=torch.float64)
    expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="nr", align=1)
    folds = [w for w in caught if "cannot absorb exactly" in str(w.message)]
    if same:
        assert not folds
        torch.testing.assert_close(new(x), expected)
    else:
        assert len(folds) == 1 and (new(x) - expected).abs().max() > 0.1
        kept = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="nr", align=1, constants="keep")
        torch.testing.assert_close(kept(x), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 4), r=st.integers(1, 3), unshuffle_first=st.booleans(), scheme=st.sampled_from(SCHEMES),
       align=st.sampled_from([1, 2, 4, 8]), fraction=st.sampled_from([1.0, 1.5]), batch=st.integers(1, 3),
       block=st.booleans(), inplace=st.booleans(), seed=st.integers(0, 1000))
def test_property_pixel_shuffles_keep_the_function(k, r, unshuffle_first, scheme, align, fraction, batch, block,
                                                   inplace, seed):
    """Random shuffle / unshuffle pairs between conv-bn-relu layers, dead channels per norm (single or whole
    blocks of r², β ≠ 0): every scheme, alignment, budget and batch keeps the function within budget."""
    torch.manual_seed(seed)
    wide, ops = k * r * r, (nn.PixelUnshuffle(r), nn.PixelShuffle(r))
    first, second = ops if unshuffle_first else ops[::-1]
    a_in, a_out, b_out = (k, wide, k) if unshuffle_first else (wide, k, wide)
    model = nn.Sequential(nn.Conv2d(3, a_in, 1), nn.BatchNorm2d(a_in), nn.ReLU(), first,
                          nn.Conv2d(a_out, a_out, 3, padding=1), nn.BatchNorm2d(a_out), nn.ReLU(), second,
                          nn.Conv2d(b_out, 5, 1)).double().eval()
    x = torch.randn(batch, 3, 2 * r, 2 * r, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not a.unknown_ops
    kill_per_norm(model, a, 0.5, seed=seed, constants=True)
    if block:  # a whole block of r² dead in each wide norm
        with torch.no_grad():
            for norm in (m for m in model if isinstance(m, nn.BatchNorm2d) and m.num_features == wide):
                start = r * r * (seed % k)
                norm.weight[start:start + r * r] = 0
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(fraction), example_inputs=x, scheme=scheme[0],
                              rescale=scheme[1],
                              align=align, constants="keep", analysis=a, inplace=inplace)
    torch.testing.assert_close(new(x), expected, rtol=1e-9, atol=1e-12)
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    assert_aligned(a, new.nrfx_plan)


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
def test_pixel_shuffles_under_export_are_analysed_as_under_fx(functional):
    """torch.export records ``aten.pixel_shuffle`` / ``pixel_unshuffle`` (translated back) or the module calls
    (raised back): the same spaces, blocks, params and MACs as fx, and the rewrite keeps the function."""
    torch.manual_seed(0)
    model = ShuffleDecoder(functional).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    fx, ex = nrfx.analyze(model, x), nrfx.analyze(model, x, capture="export")
    assert ex.capture == "export" and not ex.unknown_ops
    assert sorted((s.width, s.block, s.is_frozen) for s in fx.spaces) == \
        sorted((s.width, s.block, s.is_frozen) for s in ex.spaces)
    assert (fx.params, fx.macs) == (ex.params, ex.macs)
    kill_per_norm(model, ex, 0.4, seed=2)
    expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="cr", align=1, analysis=ex)
    torch.testing.assert_close(new(x), expected)


class Patches(nn.Module):
    """conv-bn → 2×2 patches unfolded into the channel dim by reshape / permute (each channel 4 features) →
    relu → PixelShuffle(2) folds them back → head (a hand-written space-to-depth and its inverse)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.head = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        y = self.bn(self.c1(x))
        b, h, w = y.shape[0], y.shape[2], y.shape[3]
        y = y.reshape(b, -1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, -1, h // 2, w // 2)
        return self.head(F.pixel_shuffle(torch.relu(y), 2))


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_pixel_shuffle_folds_unfolded_patches_back_into_their_channels(scheme):
    """Channels whose features are whole r×r patches come out of the shuffle as the same channels: one free space."""
    torch.manual_seed(0)
    model = Patches().double().eval()
    x = torch.randn(3, 3, 6, 8, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert out_ids(a, "c1") == in_ids(a, "head") and not frozen(a, out_ids(a, "c1"))[0]
    kill_per_norm(model, a, 0.5, seed=1, constants=True)
    new = assert_kept_exactly(model, x, schemes=(scheme,), budgets=(None, nrfx.Budget.fraction(1.5)))
    assert new.get_submodule("c1").out_channels > 6


# -- unfold / fold ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("functional", [False, True], ids=["nn.Unfold", "F.unfold"])
def test_unfold_makes_each_channel_a_block_of_its_taps(functional):
    """conv1x1(3→6) → bn → unfold 3×3 (padding 1) → linear(54→4) per position: channel c is features
    [9c, 9c + 9) of the linear, as after a flatten."""
    class Unfolded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn, self.lin = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Linear(54, 4)
            self.unfold = nn.Unfold(3, padding=1)

        def forward(self, x):
            y = self.bn(self.c1(x))
            patches = F.unfold(y, 3, padding=1) if functional else self.unfold(y)
            return self.lin(patches.transpose(1, 2))

    model = Unfolded()
    a = analyze(model, (B, 3, 4, 5))
    assert out_ids(a, "c1") == in_ids(a, "lin") and not frozen(a, out_ids(a, "c1"))[0]

    def params(w):
        return 3 * w + w + 2 * w + 9 * w * 4 + 4

    def macs(w):
        return 20 * (3 * w + 9 * w * 4)

    check_costs(a, model, macs(6), {"bn": alive(6, (0, 5))}, params(4), macs(4))


class Patched(nn.Module):
    """conv-bn-relu → a 3×3 conv written as unfold + linear → bn-relu → 2×2 patches unfolded and folded back →
    a 1×3 box filter by sliding windows (``Tensor.unfold``) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.lin, self.unfold = nn.Linear(6 * 9, 8), nn.Unfold(3, padding=1)
        self.c2, self.bn2 = nn.Conv2d(8, 20, 1), nn.BatchNorm2d(20)
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        b, h, w = y.shape[0], y.shape[2], y.shape[3]
        z = self.lin(self.unfold(y).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        z = torch.relu(self.bn2(self.c2(z)))
        z = F.fold(F.unfold(z, 2, stride=2), (h, w), 2, stride=2)
        return self.head(F.pad(z, (1, 1)).unfold(3, 3, 1).sum(-1)[:, :5])


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_unfold_fold_and_sliding_windows_keep_the_spaces_free_and_the_function(scheme):
    torch.manual_seed(0)
    model = Patched().double().eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    fx, ex = nrfx.analyze(model, x), nrfx.analyze(model, x, capture="export")
    assert not fx.unknown_ops and not ex.unknown_ops and (fx.params, fx.macs) == (ex.params, ex.macs)
    assert sorted((s.width, s.is_frozen) for s in fx.spaces) == sorted((s.width, s.is_frozen) for s in ex.spaces)
    assert [s.is_frozen for s in fx.spaces].count(True) == 1  # the output only
    kill_per_norm(model, fx, 0.4, seed=1, constants=True)
    assert_kept_exactly(model, x, schemes=(scheme,), budgets=(None, nrfx.Budget.fraction(1.5)))


def test_sliding_windows_along_channels_freeze():
    model = Between(lambda y: y.unfold(1, 2, 2).sum(-1).repeat(1, 2, 1, 1))
    a = analyze(model, (B, 3, 4, 4))
    assert "sliding windows along channels" in reasons(a, out_ids(a, "c1"))


# -- embedding bags --------------------------------------------------------------------------------------------
class Bag(nn.Module):
    """EmbeddingBag(50, 12) over bags given by offsets → linear(12→8) → bn → relu → linear(8→3)."""

    def __init__(self, mode: str, weighted: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 12, mode=mode)
        self.mlp = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.weighted = weighted

    def forward(self, idx, offsets):
        weights = idx.to(self.bag.weight.dtype) / 50 if self.weighted else None
        return self.mlp(self.bag(idx, offsets, per_sample_weights=weights))


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("mean", False), ("max", False), ("sum", True)])
def test_an_embedding_bag_produces_its_embedding_space(mode, weighted):
    """The table's columns are a space of their own (as nn.Embedding's): widened, graph and in place, exactly."""
    torch.manual_seed(0)
    model = Bag(mode, weighted).double().eval()
    args = (torch.randint(0, 50, (10,)), torch.tensor([0, 3, 7]))
    a = nrfx.analyze(model, args)
    assert not a.unknown_ops and ids(a, "bag.weight", 1) == in_ids(a, "mlp.0")
    assert not frozen(a, in_ids(a, "mlp.0"))[0] and a.params == numel(model)
    expected = model(*args)
    for scheme in ("nr", "cr", "ca"):
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=args, scheme=scheme, align=4,
                              analysis=a)
        torch.testing.assert_close(new(*args), expected)
    nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=args, align=4, inplace=True)
    assert model.bag.embedding_dim == model.bag.weight.shape[1] > 12
    torch.testing.assert_close(model(*args), expected)


@pytest.mark.parametrize("table", [nn.Embedding, nn.EmbeddingBag])
def test_an_embedding_with_max_norm_freezes_and_its_table_is_left_as_it_was(table):
    """max_norm rescales each row read by its norm over the embedding dim: widening it would change every row
    (it did, silently: 0.31); torch renormalises the table in place, and nrfx's runs put it back."""
    torch.manual_seed(0)
    model = nn.Sequential(table(20, 6, max_norm=1.0), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        model[0].weight.mul_(3)
    before = model[0].weight.detach().clone()
    x = torch.randint(0, 20, (4, 5))
    for capture in ("fx", "export"):
        a = nrfx.analyze(model, x, capture=capture)
        assert "max_norm" in reasons(a, ids(a, "0.weight", 1))
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=x, align=1)
    assert torch.equal(model[0].weight, before)
    expected = model(x)
    torch.testing.assert_close(new(x), expected)


# -- channel counts read as numbers ----------------------------------------------------------------------------
class DWMlp(nn.Module):
    """pvt_v2's MLP: fc1, then ``(B, N, C) → (B, C, H, W)`` by a view sized by C read from the shape, a depthwise
    conv, back to tokens, fc2 into the stream.  ``use``: how the hidden count is read and used."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
        self.dw, self.bn = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.head = nn.Linear(8, 3)
        self.use = use

    def forward(self, x):
        y = self.stem(x)
        b, c0, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        hidden = self.fc1(t)
        c = hidden.size(2) if self.use == "size" else hidden.shape[2]
        z = torch.relu(self.bn(self.dw(hidden.transpose(1, 2).view(b, c, h, w)))).flatten(2).transpose(1, 2)
        z = z / math.sqrt(h * w)  # arithmetic on spatial sizes (fx wraps math's functions): no channels
        if self.use == "arithmetic":
            z = z * (c // 2)
        if self.use == "math":
            z = z * math.ceil(c / 5)
        return self.head((t + self.fc2(z)).mean(1).reshape(b, c0))


@pytest.mark.parametrize("use", ["shape", "size", "arithmetic", "math"])
def test_a_channel_count_that_only_sizes_views_of_its_channels_stays_free(use):
    """``b, c, h, w = x.shape`` then ``view(b, c, h, w)``: the graph reads c again when it runs, so the space is
    free (it froze: "channel count read as a number"); a count used in arithmetic (``c // 2``, ``math.ceil``)
    still freezes, naming both the read and the use; ``math.sqrt`` of spatial sizes is no unknown op."""
    torch.manual_seed(0)
    model = DWMlp(use).double().eval()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not a.unknown_ops
    (hidden,), (stem,) = out_ids(a, "fc1"), out_ids(a, "stem.0")
    assert not a.spaces[stem].is_frozen
    if use in ("arithmetic", "math"):
        assert "channel count read as a number" in reasons(a, [hidden]) and "used by" in reasons(a, [hidden])
    else:
        assert not a.spaces[hidden].is_frozen
    kill_per_norm(model, a, 0.4, seed=2, constants=True)
    assert_kept_exactly(model, x, schemes=("nr", "cr", "ca"), budgets=(None, nrfx.Budget.fraction(1.5)), align=4,
                        analysis=a, others=(torch.randn(2, 3, 7, 6, dtype=torch.float64),))


class CountAcross(nn.Module):
    """Two convs concatenated; the second's output is viewed with the channel count read from the first's: the code
    says the two widths are equal, so they are one space."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        ya, yb = self.a(x), self.b(x)
        n, c = ya.shape[0], ya.shape[1]
        return self.head(torch.cat([ya, yb.reshape(n, c, -1).view(n, c, x.shape[2], x.shape[3])], 1))


def test_a_channel_count_read_from_one_tensor_ties_the_view_of_another():
    torch.manual_seed(0)
    model = CountAcross().double().eval()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert out_ids(a, "a") == out_ids(a, "b") and not frozen(a, out_ids(a, "a"))[0]
    assert in_ids(a, "head") == out_ids(a, "a") * 2
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.5), example_inputs=x, align=1, analysis=a)
    torch.testing.assert_close(new(x), model(x))
    assert new.get_submodule("b").out_channels > 6


# -- timm layers -----------------------------------------------------------------------------------------------
class TimmBlock(nn.Module):
    """conv → timm BatchNormAct2d with timm's own GELU → conv → timm DropPath in a residual → head."""

    def __init__(self) -> None:
        super().__init__()
        layers = pytest.importorskip("timm.layers")
        from timm.layers.activations import GELU

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.c1, self.bn = nn.Conv2d(8, 12, 3, padding=1), layers.BatchNormAct2d(12, act_layer=GELU)
        self.c2, self.drop = nn.Conv2d(12, 8, 1), layers.DropPath(0.2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(y + self.drop(self.c2(self.bn(self.c1(y)))))


def test_timm_activations_inside_norm_act_and_drop_path_pass_channels():
    """Both were unknown to nrfx: timm's GELU inside BatchNormAct2d froze its space, the functional drop_path of
    stochastic depth froze the residual stream (a fifth of timm's swin, focalnet, nest, nextvit channels)."""
    torch.manual_seed(0)
    model = TimmBlock().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not a.unknown_ops and [s.is_frozen for s in a.spaces].count(True) == 1  # the output
    kill_per_norm(model, a, 0.4, seed=1)
    expected = model(x)
    for scheme in ("nr", "cr", "ca"):
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=x, scheme=scheme, align=4,
                              analysis=a)
        torch.testing.assert_close(new(x), expected)
    new.train()
    assert new(x).shape == expected.shape  # stochastic depth draws per sample in training


class Windowed(nn.Module):
    """conv → BN → channels-last windows (timm's partition) → linear 8 → 12 per token → timm's reverse (a no-trace
    function: called by its global name, as timm's blocks do, fx keeps it one node) → NCHW → BN → head conv."""

    def __init__(self, reverse: str) -> None:
        super().__init__()
        self.reverse = reverse
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
        self.fc, self.bn, self.head = nn.Linear(8, 12), nn.BatchNorm2d(12), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y, h, w = self.stem(x).permute(0, 2, 3, 1), 4, 4
        if self.reverse == "deblockify":
            z = deblockify(torch.relu(self.fc(blockify(y, 2))), 2)
        elif self.reverse == "grid_reverse":
            z = grid_reverse(torch.relu(self.fc(grid_partition(y, [2, 2]))), [2, 2], [h, w])
        elif self.reverse == "swin":
            z = swin_window_reverse(torch.relu(self.fc(window_partition(y, [2, 2]))), (2, 2), h, w)
        else:
            z = gcvit_window_reverse(torch.relu(self.fc(window_partition(y, [2, 2]))), (2, 2), (h, w))
        return self.head(self.bn(z.permute(0, 3, 1, 2)))


@pytest.mark.parametrize("reverse", ["swin", "gcvit", "grid_reverse", "deblockify"])
def test_timm_window_reverse_passes_its_channels(reverse):
    """timm's window_reverse / grid_reverse / deblockify (no-trace functions: unknown ops freezing the windows'
    channels) move positions only; the channel dim passes, and the function is kept."""
    if blockify is None:
        pytest.skip("timm is not installed")
    torch.manual_seed(0)
    model = Windowed(reverse).double().eval()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    leaves = [n for n in a.gm.graph.nodes if getattr(n.target, "__name__", "") in ("window_reverse", "grid_reverse",
                                                                                     "deblockify")]
    assert a.capture == "fx" and not a.unknown_ops and len(leaves) == 1
    assert not frozen(a, out_ids(a, "fc"))[0] and a.spaces[out_ids(a, "fc")[0]].width == 12
    kill_per_norm(model, a, 0.4, seed=3, constants=True)
    assert_kept_exactly(model, x, schemes=("nr", "cr", "ca"), budgets=(None, nrfx.Budget.fraction(1.5)), align=4,
                        analysis=a)


class StdConvs(nn.Module):
    """timm StdConv2d (3→8) → BN → plain conv (8→12) → BN → ScaledStdConv2d (12→6, a per-channel gain) → BN → head:
    NF-Net's weight-standardised convs."""

    def __init__(self) -> None:
        super().__init__()
        std_conv = pytest.importorskip("timm.layers.std_conv")
        self.std, self.bn1 = std_conv.StdConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.plain, self.bn2 = nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12)
        self.scaled, self.bn3 = std_conv.ScaledStdConv2d(12, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn2(self.plain(torch.relu(self.bn1(self.std(x))))))
        return self.head(torch.relu(self.bn3(self.scaled(y))))


def test_timm_weight_standardised_convs_free_their_outputs():
    """StdConv2d / ScaledStdConv2d were traced into (a conv with a computed weight: an unknown op freezing both
    sides); kept whole, their outputs are free (gain resized with them), their inputs frozen (standardised over)."""
    torch.manual_seed(0)
    model = StdConvs().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert a.capture == "fx" and not a.unknown_ops
    assert sorted(s.width for s in a.spaces if not s.is_frozen) == [6, 8]
    assert "ScaledStdConv2d standardises its weight" in reasons(a, in_ids(a, "scaled"))
    kill_per_norm(model, a, 0.4, seed=5, constants=True)
    new = assert_kept_exactly(model, x, schemes=("nr", "cr", "ca"), budgets=(None, nrfx.Budget.fraction(1.3)),
                              align=1, analysis=a)
    assert new.get_submodule("scaled").gain.shape[0] == new.get_submodule("scaled").out_channels


class CountViews(nn.Module):
    """conv-bn-relu (c channels) → tokens → ``steps`` views sized by c read as ``x.shape[i]`` / ``x.size(i)`` →
    back to a map → [a second conv's output viewed with the same count and added] → head."""

    def __init__(self, c: int, steps: tuple[str, ...], second: bool, read: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.other = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)) if second else None
        self.head = nn.Conv2d(c, 4, 1)
        self.steps, self.read = steps, read

    def _count(self, t, dim):
        return t.size(dim) if self.read == "size" else t.shape[dim]

    def forward(self, x):
        y = self.body(x)
        b, h, w = y.shape[0], y.shape[2], y.shape[3]
        c = self._count(y, 1)
        for step in self.steps:
            if step == "tokens":  # (b, c, h, w) → (b, h·w, c) → back, the count sizing the way back
                y = y.flatten(2).transpose(1, 2).transpose(1, 2).reshape(b, c, h, w)
            elif step == "rows":  # (b, c, h·w) and back
                y = y.reshape(b, c, -1).view(b, c, h, w)
            elif step == "recount":  # read the count again from a later tensor
                y = torch.relu(y).view(b, self._count(y, 1), h, w)
        if self.other is not None:
            y = y + self.other(x).reshape(b, c, h * w).view(b, c, h, w)
        return self.head(y)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(2, 12), steps=st.lists(st.sampled_from(["tokens", "rows", "recount"]), max_size=3),
       second=st.booleans(), read=st.sampled_from(["shape", "size"]), scheme=st.sampled_from(SCHEMES),
       align=st.sampled_from([1, 2, 4, 8]), fraction=st.sampled_from([1.0, 1.5]), batch=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_property_views_sized_by_channel_counts_keep_the_function(c, steps, second, read, scheme, align, fraction,
                                                                   batch, seed):
    """Counts read from shapes and used only to size views of their channels leave the space free, and every
    scheme, alignment and budget keeps the function, also on inputs of another size (the count is read again)."""
    torch.manual_seed(seed)
    model = CountViews(c, tuple(steps), second, read).double().eval()
    x = torch.randn(batch, 3, 4, 5, dtype=torch.float64)
    a = nrfx.analyze(model, x)
    assert not frozen(a, out_ids(a, "body.0"))[0]
    kill_per_norm(model, a, 0.4, seed=seed, constants=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(fraction), example_inputs=x, scheme=scheme[0],
                              rescale=scheme[1], align=align, constants="keep", analysis=a)
    for inputs in (x, torch.randn(2, 3, 6, 3, dtype=torch.float64)):
        torch.testing.assert_close(new(inputs), model(inputs), rtol=1e-9, atol=1e-12)
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget


class RowGather(nn.Module):
    """A computed (tokens, channels) table read by an index buffer (Swin V2's bias table), then a per-channel op."""

    def __init__(self, rows: tuple[int, ...], by_dims: int = 1) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(3, 6), nn.Linear(6, 2)
        self.register_buffer("index", torch.tensor(rows).view(by_dims, -1))

    def forward(self, z):
        table = torch.relu(self.fc(z))  # (tokens, 6)
        return self.out(table[self.index])  # (by_dims, rows / by_dims, 6) -> (…, 2)


@pytest.mark.parametrize("by_dims", [1, 2])
def test_rows_gathered_by_an_index_tensor_pass_their_channels(by_dims):
    """x[i] with an integer tensor i picks rows of dim 0: the channels on the other dims pass (fc's outputs stay free
    and keep their zeros: a dead channel of fc is dead in every row read); an index tensor with a slice of the
    channels still freezes them."""
    model = RowGather((4, 0, 0, 2), by_dims).eval()
    z = torch.randn(5, 3)
    a = nrfx.analyze(model, z)
    assert not any(frozen(a, out_ids(a, "fc"))) and a.space_ids(a.records["out"].input) == out_ids(a, "fc")
    gated = nrfx.add_gates(model, z)
    gate = gated.get_submodule(gated.nrfx_gates[0])
    with torch.no_grad():
        gate.weight[2] = 0.0  # channel 2 of fc dead in every row the index reads
    for budget in (None, nrfx.Budget.fraction(1.5)):
        new = nrfx.rejuvenate(gated, None, budget, example_inputs=z, align=1)
        torch.testing.assert_close(new(z), gated(z))
    assert nrfx.rejuvenate(gated, None, None, example_inputs=z, align=1).nrfx_plan.cost_live < a.params

    class Masked(RowGather):
        def forward(self, z):
            return self.out(torch.nn.functional.pad(torch.relu(self.fc(z))[self.index.flatten(), 1:], (1, 0)))

    masked = nrfx.analyze(Masked((4, 0, 0, 2)).eval(), z)
    assert all(frozen(masked, out_ids(masked, "fc")))
    assert "advanced indexing" in reasons(masked, out_ids(masked, "fc"))
