"""nrfx.capture.aten: aten ops written as torch-level calls, each checked on a tiny exported module.

Every module here is captured with ``capture="export"``; its parameters and MACs are computed
by hand, the fx capture of the same module must agree, no aten op may be left untranslated, and
rejuvenation (dead channels; widening) must keep the function in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from support import kill_per_norm
from torch import nn

import nrfx
from nrfx.capture.aten import TORCH_LEVEL

aten = torch.ops.aten


def _analyze(model: nn.Module, x: torch.Tensor, capture: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nrfx.analyze(model, x, capture=capture)


def _aten_ops(model: nn.Module, x: torch.Tensor) -> set:
    """The aten overloads torch.export records for the module (to check the test exercises them)."""
    program = torch.export.export(model.eval(), (x,), strict=False)
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def assert_rejuvenation_keeps_function(model: nn.Module, x: torch.Tensor) -> None:
    """Widening at 1.3 × c(A) (one channel costs 12% here: align=1) and removing dead channels keep the outputs."""
    with torch.no_grad():
        expected = model(x)
    wide = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=x, capture="export", align=1)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(wide(x), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(wide(torch.cat([x, x])), torch.cat([expected, expected]), rtol=1e-9, atol=1e-12)
    analysis = _analyze(model, x, "export")
    assert kill_per_norm(model, analysis, 0.5, seed=1) > 0
    analysis = _analyze(model, x, "export")
    with torch.no_grad():
        expected = model(x)
    slim = nrfx.rejuvenate(model, None, None, example_inputs=x, capture="export", analysis=analysis, align=1)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), expected, rtol=1e-9, atol=1e-12)


class PadCastConstants(nn.Module):
    """conv 1×1 (3→8) → reflect pad → to / type_as → BN → × constant + filled scalar → ReLU → conv 3×3 (8→4).

    Exports aten.pad, to.device, to.dtype, type_as, lift_fresh_copy + detach_, new_zeros + fill_.Scalar.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = F.pad(self.conv(x), (1, 1, 1, 1), mode="reflect")
        y = y.to(x.device, x.dtype).to(x.dtype, copy=True).type_as(x)
        shift = y.new_zeros(())
        shift.fill_(0.5)
        y = self.bn(y) * torch.tensor(2.0, dtype=x.dtype) + shift
        return self.head(torch.relu(y))


class KeywordCastsAndIndex(nn.Module):
    """conv 1×1 (3→8) → BN → ReLU → ``.to(device=)`` → constant pad → conv 3×3 (8→4) + ``table[idx]`` bias.

    Exports aten.to.dtype_layout (keyword-only cast), constant pad through aten.pad, new_ones /
    new_full, and aten.index.Tensor on a parameter table (a relative-position-bias pattern).
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 3)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("idx", torch.tensor([4, 0, 2, 1]))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).to(device=x.device)
        y = F.pad(y, (1, 1, 1, 1), mode="constant", value=0.0)
        scale = y.new_ones(()) + y.new_full((), 1.0)
        bias = self.table[self.idx][:, 0].view(1, 4, 1, 1)
        return self.head(y) * scale + bias


# hand-counted: params and MACs per example at 3×8×8 (conv 1×1 on 8×8, pad to 10×10, conv 3×3 back to 8×8)
CONV_PARAMS = (3 * 8 + 8) + 2 * 8 + (8 * 4 * 9 + 4)
CONV_MACS = 8 * 3 * 64 + 4 * 8 * 9 * 64
CASES = {
    "pad_cast_constants": (PadCastConstants, CONV_PARAMS, {aten.pad.default, aten.to.device, aten.to.dtype,
                                                           aten.type_as.default, aten.lift_fresh_copy.default,
                                                           aten.detach_.default, aten.new_zeros.default,
                                                           aten.fill_.Scalar}),
    "keyword_casts_index": (KeywordCastsAndIndex, CONV_PARAMS + 20, {aten.to.dtype_layout, aten.pad.default,
                                                                     aten.new_ones.default, aten.new_full.default,
                                                                     aten.index.Tensor}),
}


@pytest.mark.parametrize("name", CASES)
def test_translated_ops_cost_and_spaces(name: str):
    """Hand-counted params and MACs; the 8-wide space stays free; nothing left untranslated; fx agrees."""
    cls, params, ops = CASES[name]
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert ops <= _aten_ops(model, x)
    assert all(TORCH_LEVEL.for_function(op) is not None for op in ops)
    analysis = _analyze(model, x, "export")
    assert analysis.capture == "export"
    assert not analysis.unknown_ops
    assert not any("without a torch-level rule" in note for note in analysis.capture_notes)
    assert analysis.params == params
    bn_macs = analysis.macs - CONV_MACS  # BatchNorm's per-element cost, whatever the cost model says: as in fx
    fx = _analyze(model, x, "fx")
    assert (fx.params, fx.macs) == (analysis.params, analysis.macs)
    assert bn_macs in (0, 8 * 100, 2 * 8 * 100, 8 * 64, 2 * 8 * 64)
    free = [s.width for s in analysis.spaces if not s.is_frozen]
    assert free == [8]
    assert [s.width for s in fx.spaces if not s.is_frozen] == free


@pytest.mark.parametrize("name", CASES)
def test_translated_ops_rejuvenation_keeps_function(name: str):
    torch.manual_seed(0)
    model = CASES[name][0]().double().eval()
    assert_rejuvenation_keeps_function(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))


class RmsNormOverChannels(nn.Module):
    """conv 1×1 (3→8) → BN → ReLU → conv 1×1 (8→6) → BN → ReLU → conv 1×1 (6→8) → RMS norm over the 8 channels
    (channels last, a weight) → conv 3×3 (8→4).  Exports aten.rms_norm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.mid, self.bn_mid, self.out = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 8, 1)
        self.scale = nn.Parameter(torch.rand(8))
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.out(torch.relu(self.bn_mid(self.mid(y))))
        y = F.rms_norm(y.permute(0, 2, 3, 1), (8,), self.scale, 1e-6).permute(0, 3, 1, 2)
        return self.head(y)


def test_rms_norm_is_translated_and_freezes_only_what_it_normalises():
    """aten.rms_norm is F.rms_norm: the 8 channels it normalises freeze (their statistics couple them), the block
    before it (8 and 6 wide) stays free, and the export capture agrees with fx on params, MACs and spaces."""
    torch.manual_seed(0)
    model = RmsNormOverChannels().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert aten.rms_norm.default in _aten_ops(model, x)
    exported, fx = _analyze(model, x, "export"), _analyze(model, x, "fx")
    assert exported.capture == "export" and not exported.unknown_ops
    assert exported.params == (3 * 8 + 8) + 2 * 8 + (8 * 6 + 6) + 2 * 6 + (6 * 8 + 8) + 8 + (8 * 4 * 9 + 4)
    assert (exported.params, exported.macs) == (fx.params, fx.macs)
    spaces = lambda a: [(s.width, s.is_frozen) for s in a.spaces]  # noqa: E731
    assert spaces(exported) == spaces(fx) == [(8, False), (6, False), (8, True), (4, True)]
    assert_rejuvenation_keeps_function(model, x)


def test_index_with_none_is_a_full_slice():
    """aten.index(x, [None, i]) is x[:, i]: the translated graph computes what the model does."""

    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("idx", torch.tensor([2, 0, 1, 1]))

        def forward(self, x):
            return x[:, self.idx] * 2

    model, x = Gather(), torch.randn(2, 3, 5)
    assert aten.index.Tensor in _aten_ops(model, x)
    analysis = _analyze(model, x, "export")
    assert not analysis.unknown_ops
    torch.testing.assert_close(analysis.gm(x), model(x))
