"""A forward that updates buffers in place (a counter, a running average): the user's buffers stay untouched
by nrfx, and the rewritten model keeps the updates (in its graph and its state dict)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import nrfx


class Counting(nn.Module):
    """conv, BN, head; counts its calls and keeps an EMA of its mean activation, both in place."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.b, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("ema", torch.ones(8))

    def forward(self, x):
        self.calls.add_(1)
        y = self.b(self.c(x)).relu()
        self.ema.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)))
        return self.h(y)


def _model() -> Counting:
    torch.manual_seed(0)
    model = Counting().double().eval()
    with torch.no_grad():
        model.b.weight[:3] = 0
        model.b.bias[:3] = 0
    return model


X = torch.randn(2, 3, 8, 8, dtype=torch.float64)


def test_analyze_and_rejuvenate_leave_the_users_buffers_alone():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nrfx.analyze(model, X)
        nrfx.rejuvenate(model, None, None, example_inputs=X, align=1)
    assert model.calls.item() == 0 and torch.equal(model.ema, torch.ones(8, dtype=torch.float64))


def test_fx_capture_refuses_a_graph_that_would_drop_the_updates():
    with pytest.raises(nrfx.TraceError, match="updates buffer"):
        nrfx.analyze(_model(), X, capture="fx")


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_the_rewritten_model_keeps_the_updates(scheme):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=X, scheme=scheme, align=1)
    assert {"calls", "ema"} <= set(new.state_dict())
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(new(X), model(X), rtol=1e-9, atol=1e-12)
    assert new.calls.item() == model.calls.item() == 2
    torch.testing.assert_close(new.ema, model.ema, rtol=1e-9, atol=1e-12)
