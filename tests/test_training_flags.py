"""Dropout-like calls that read ``self.training`` keep following ``.train()``/``.eval()`` after a rewrite.

FX traces in eval mode, so ``F.dropout(x, p, self.training)``, torchvision's ``stochastic_depth`` and timm's
``drop_path`` would be recorded with ``training=False`` and never drop again; the tracer makes them read the
calling module's flag when the graph runs (``nrfx.capture.trace``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from support import zero_scales
from torch import nn

import nrfx


def _timm():
    return pytest.importorskip("timm")


class Head(nn.Module):
    """conv-bn, then functional dropouts: one reads the module's flag; one has p = 0, one is forced off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        y = F.dropout(y, 0.5, self.training) + F.dropout(y, 0.0, self.training) + F.dropout(y, 0.5, training=True)
        return self.fc(y)


def _dropped(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two runs with different seeds differ (something random is applied)."""
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    return not torch.equal(first, model(x))


def test_a_functional_dropout_follows_the_rewritten_models_mode():
    model = Head().eval()
    x = torch.randn(4, 3, 6, 6)
    analysis = nrfx.analyze(model, x)
    calls = [n for n in analysis.gm.graph.nodes if n.target is F.dropout]
    assert [n.args[2].op if len(n.args) > 2 else n.kwargs["training"] for n in calls] == ["get_attr", False, True]
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(2.0), example_inputs=x, analysis=analysis)
    assert sum(new.nrfx_plan.grow) > 0
    assert _dropped(new.eval(), x) and _dropped(model.eval(), x)  # training=True stays on, as in the original


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_only_the_flag_read_from_the_module_turns_off_in_eval_mode(traced_in):
    class Flagged(Head):
        def forward(self, x):
            return self.fc(F.dropout(self.bn(self.conv(x)).mean((2, 3)), 0.5, self.training))

    model = Flagged().train(traced_in == "train")  # the driver analyses and rewrites a model in train mode
    x = torch.randn(4, 3, 6, 6)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(2.0), example_inputs=x)
    assert sum(new.nrfx_plan.grow) > 0
    assert not _dropped(new.eval(), x)  # traced in train mode, a baked True dropped in eval mode too
    assert _dropped(new.train(), x)  # traced in eval mode, a baked False never dropped
    assert not _dropped(new.eval(), x)


@pytest.mark.parametrize("build", [lambda: torchvision.models.efficientnet_b0(weights=None),
                                   lambda: _timm().create_model("resnet18", drop_path_rate=0.3, zero_init_last=False)],
                         ids=["torchvision_stochastic_depth", "timm_drop_path"])
@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_stochastic_depth_draws_as_in_the_original_when_training(build, traced_in):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build().double().eval()
    for module in model.modules():  # no dropout on resized channels: its mask would be drawn at another width
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    zero_scales(model, 0.4, seed=2, shifts=True)  # dead channels give exact zeros in train mode too
    x = torch.randn(4, 3, 48, 48, dtype=torch.double)
    model.train(traced_in == "train")
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x[:2], scheme="cr")
    assert sum(new.nrfx_plan.grow) > 0
    with torch.no_grad():
        expected = model.eval()(x)  # eval mode: running statistics, so a random-init net's outputs may be tiny
        torch.testing.assert_close(new.eval()(x), expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    assert not _dropped(new.eval(), x)  # exact: any drop in eval mode shows, however small the outputs
    outputs = []
    for net in (model.train(), new.train()):
        torch.manual_seed(7)  # the same row masks in the same order: stochastic depth draws one value per example
        outputs.append(net(x))
    assert outputs[0].abs().max() > 1e-3  # train mode: batch statistics keep the outputs in range
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    assert _dropped(new, x)  # (train mode: each call also moves the norms' running statistics)


def test_a_flag_left_at_its_default_is_the_callers_choice():
    timm_drop = pytest.importorskip("timm.layers.drop")

    class Defaults(Head):
        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return self.fc(timm_drop.drop_path(y, 0.5))  # training defaults to False: never drops

    analysis = nrfx.analyze(Defaults().eval(), torch.randn(4, 3, 6, 6))
    assert not any(n.op == "get_attr" and n.target == "training" for n in analysis.gm.graph.nodes)
