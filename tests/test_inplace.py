"""``a += b`` stays in place where that is safe (a fresh tensor nothing else reads), else turns functional."""

from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from support import kill_channels
from torch import nn

import nrfx
from nrfx.capture.trace import trace


class Block(nn.Module):
    """conv → bn, then one of several in-place updates."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.kind == "residual":  # torchvision's BasicBlock: the norm's output, read once
            out += x
            return out
        if self.kind == "input":  # the caller's tensor
            x += 1
            return out + x
        if self.kind == "relu":  # relu keeps its output for backward
            y = torch.relu(out)
            y *= 2
            return y
        b = out * 2  # "reread": the target is read by another node too
        out -= 1
        return out + b


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize(("kind", "inplace", "functional"), [
    ("residual", operator.iadd, operator.add),
    ("input", operator.iadd, operator.add),
    ("relu", operator.imul, operator.mul),
    ("reread", operator.isub, operator.sub),
])
def test_inplace_kept_only_where_safe(kind, inplace, functional):
    model = Block(kind).eval()
    gm = trace(model).gm
    targets = _targets(gm)
    if kind == "residual":
        assert inplace in targets and functional not in targets
    else:
        assert inplace not in targets and functional in targets
    x = torch.randn(2, 4, 5, 5)
    before = x.clone()
    got = gm(x)
    assert torch.equal(x, before), "the graph module wrote into its input"
    expected = model(x.clone())
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("scheme", ["nr", "ca"])
def test_rejuvenated_resnet_keeps_residual_inplace_and_trains(scheme):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    kill_channels(model, nrfx.analyze(model, x), 0.4, 0)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme)
    assert sum(n.target is operator.iadd for n in new.graph.nodes) == 8  # one per BasicBlock
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)
    new.train()
    new(x).square().mean().backward()
    assert all(p.grad is not None for p in new.parameters() if p.requires_grad)
