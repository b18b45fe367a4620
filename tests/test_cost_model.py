"""One cost model: c(A), the planner's cost and the report rows agree at every batch size; cr counts what runs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import nrfx


class Mixed(nn.Module):
    """A grouped conv (a MAC term without channel layouts), attention and a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.grouped(self.bn(self.stem(x)).relu())).relu()
        t = y.flatten(2).transpose(1, 2)  # (N, HW, C)
        a = F.scaled_dot_product_attention(self.q(t), self.k(t), self.v(t))
        s = torch.matmul(a, a.transpose(1, 2)).softmax(-1) @ a
        return self.head(s.mean(1))


def _macs_per_example(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2 // x.shape[0]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_budget_of_c_a_is_met_at_every_batch(batch):
    model = Mixed().eval()
    x = torch.randn(batch, 3, 6, 6)
    analysis = nrfx.analyze(model, x)
    hw = 36
    # stem, grouped conv (groups=2), q/k/v, attention (QKᵀ and AV), two matmuls, head: MACs per example
    expected = 3 * 8 * 9 * hw + 8 * 4 * 9 * hw + 3 * hw * 8 * 8 + 2 * hw * hw * 8 + 2 * hw * hw * 8 + 8 * 5
    assert analysis.macs == expected
    assert analysis.params == sum(p.numel() for p in model.parameters())
    for kind in ("params", "macs"):
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, kind), example_inputs=x, analysis=analysis)
        c_a = analysis.params if kind == "params" else analysis.macs
        assert new.nrfx_plan.cost_before == c_a >= new.nrfx_plan.cost_after
    report = analysis.report()
    assert sum(r.macs for r in report.rows) + report.other.macs == analysis.macs
    assert report.totals.macs == analysis.macs


def test_cost_is_independent_of_the_batch():
    model = Mixed().eval()
    costs = {b: nrfx.analyze(model, torch.randn(b, 3, 6, 6)) for b in (1, 2, 5)}
    assert len({a.macs for a in costs.values()}) == 1
    widths = [s.width + 1 for s in costs[1].spaces]
    assert len({a.macs_at(widths) for a in costs.values()}) == 1


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_cr_counts_the_blocks_it_computes(scheme):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[: m.weight.numel() // 3] = 0
    new = nrfx.rejuvenate(model, None, example_inputs=x, scheme=scheme)
    after = nrfx.analyze(new, x)
    assert after.effective_params == sum(p.numel() for p in new.parameters())  # stored
    assert after.effective_macs == _macs_per_example(new, x)  # what runs
    if scheme == "cr":
        assert after.effective_params < after.params and after.effective_macs < after.macs
        layers = [m for m in new.modules() if getattr(m, "scheme", None) == "cr"]
        diagonal = sum(m.weight_ss.numel() + m.weight_rr.numel() for m in layers)
        assert diagonal == sum(m.weight[: m.s_out, : m.s_in].numel() + m.weight[m.s_out:, m.s_in:].numel()
                               for m in layers)
        cross = sum(m.weight.numel() for m in layers) - diagonal
        assert after.params - after.effective_params == cross
        assert "runs  params" in after.report().summary()
    else:
        assert (after.effective_params, after.effective_macs) == (after.params, after.macs)


class SameDepthwise(nn.Conv2d):
    """EfficientNet-PyTorch's static-same conv: F.conv2d with ``self.groups`` as a literal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DepthwiseNet(nn.Module):
    def __init__(self, keyword: bool) -> None:
        super().__init__()
        self.keyword = keyword
        self.a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = SameDepthwise(8, 8, 3, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.a(x)).relu()
        if self.keyword:
            y = F.conv2d(y, self.dw.weight, self.dw.bias, padding=1, groups=self.dw.groups)
        else:
            y = self.dw(y)
        return self.head(self.bn2(y).relu())


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_functional_depthwise_groups_follow_the_new_width(keyword, scheme):
    torch.manual_seed(0)
    model = DepthwiseNet(keyword).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        model.bn.weight[:3] = 0
        model.bn.bias[:3] = 0
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.6), example_inputs=x, scheme=scheme, align=1)
    assert new.nrfx_plan.new_widths[0] > 8  # the depthwise space grew
    torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-12)
