"""analyze and rejuvenate leave no trace on the user's modules: every tensor attribute, not only the state dict."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import nrfx


class AnchorHead(nn.Module):
    """A detection-style head that caches an anchor grid the first time it sees a feature shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 1)
        self.shape = None
        self.anchors = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != x.shape[2:]:  # a Python branch on a shape: FX makes this module a leaf
            self.shape = x.shape[2:]
            self.anchors = torch.arange(x.shape[2] * x.shape[3], dtype=x.dtype).reshape(x.shape[2:])
            self.register_buffer("grid", self.anchors.clone(), persistent=False)
        if int(x.sum() != 0):  # data-dependent: untraceable
            return self.conv(x) + self.anchors
        return self.conv(x)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = AnchorHead(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.stem(x)).relu())


def _all_attributes(model: nn.Module) -> dict[str, object]:
    """Every attribute of every module (tensors cloned), buffers and parameters included."""
    found: dict[str, object] = {}
    for name, module in model.named_modules():
        items = {**module.__dict__, **module._buffers, **module._parameters}
        for key, value in items.items():
            if key in ("_buffers", "_parameters", "_modules") or key.startswith("_forward") or key.startswith("_back"):
                continue
            found[f"{name}.{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return found


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        now = after[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(now, torch.Tensor) and not now.is_meta, key
            assert now.device == value.device and torch.equal(now, value), key
        else:
            assert now == value, key


def test_caching_leaf_is_left_as_it_was():
    model = Detector().eval()
    x = torch.randn(2, 3, 8, 8)
    before = _all_attributes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, x)
    assert "head" in analysis.auto_leaves
    _assert_same(before, _all_attributes(model))
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, analysis=analysis)
    _assert_same(before, _all_attributes(model))
    expected = model(x)  # the user's model still runs, on real tensors
    assert expected.shape == new(x).shape


def test_untouched_restores_added_and_replaced_attributes():
    from nrfx.capture.guards import untouched

    model = Detector()
    before = _all_attributes(model)
    with untouched(model):
        model.head(torch.randn(1, 8, 4, 4))
        model.head.extra = 1
    _assert_same(before, _all_attributes(model))
