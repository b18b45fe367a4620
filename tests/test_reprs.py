"""Notebook reprs: short summaries with the key numbers, the report as an HTML table (issue 18, item 14)."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import nrfx


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18 with 40% of every BatchNorm's channels dead, its input and analysis."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[torch.rand(m.num_features) < 0.4] = 0
    x = torch.randn(1, 3, 64, 64)
    return model, x, nrfx.analyze(model, x)


def _short(text: str) -> str:
    """A repr bounded in length, on one line, with no tensor or object address in it."""
    assert len(text) < 500, len(text)
    assert "\n" not in text and "tensor(" not in text and " object at 0x" not in text
    return text


def test_analysis_repr(resnet):
    _, _, analysis = resnet
    text = _short(repr(analysis))
    u = analysis.utilization()
    assert "ResNet" in text and "1×3×64×64" in text and "(fx)" in text
    assert "11.69M params" in text and f"r(θ) params {u.r_params:.4f}" in text
    assert f"{len(analysis.spaces)} channel spaces" in text


def test_utilization_repr(resnet):
    _, _, analysis = resnet
    u = analysis.utilization()
    text = _short(repr(u))
    dead = sum(int((~m).sum()) for m in u.alive)
    assert f"r_params={u.r_params:.4f}" in text and f"r_macs={u.r_macs:.4f}" in text
    assert f"dead channels {dead:,}/" in text and dead > 0


def test_report_repr_and_html(resnet):
    _, _, analysis = resnet
    report = analysis.report()
    text = _short(repr(report))
    assert f"r(θ) params {report.totals.r_params:.4f}" in text and "c(A) 11.69M params" in text
    page = report._repr_html_()
    assert page.startswith("<table>") and page.count("<tr>") == len(report.rows) + 2  # header, rows, (other)
    assert "<td" in page and "layer1.0.conv1" in page and "r(θ)" in page


def test_report_html_escapes_names():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("a<b>", nn.Conv2d(3, 4, 1))

        def forward(self, x):
            return getattr(self, "a<b>")(x)

    page = nrfx.analyze(Odd(), torch.randn(1, 3, 4, 4)).report()._repr_html_()
    assert "<b>" not in page and "&lt;b&gt;" in page


def test_island_reprs():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, images):
            scores = self.head(self.backbone(torch.stack(images)).mean((2, 3))).squeeze(1)
            return scores if scores.max() > 0 else -scores

    analysis = nrfx.analyze(Branching().eval(), ([torch.randn(3, 8, 8) for _ in range(2)],))
    assert re.search(r"islands backbone, head; c\(A\) .* r\(θ\) params 1\.0000", _short(repr(analysis)))
    report = analysis.report()
    assert "backbone r(θ) 1.0000" in _short(repr(report))
    assert report._repr_html_().count("<table>") == 2


def test_plan_repr_is_one_short_line():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight[::3] = 0
    plan = nrfx.rejuvenate(model, None, None, example_inputs=torch.randn(1, 3, 32, 32)).nrfx_plan
    text = repr(plan)
    assert len(text) < 300 and "\n" not in text and "alpha" in text and "channels removed" in text
