"""Residual streams: the analysis marks every space where an add joins two activations, and
``residual="keep"`` (the paper's ResNet setting) leaves them whole while the rest grows by one α."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torchvision
from support import zero_scales
from torch import nn

import nrfx
from nrfx.cli import main
from nrfx.plan.check import check_plan_fits


class Streams(nn.Module):
    """conv a → stream (8) + block → conv b; a parameter added, an SE product and a cat beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.inner, self.bn1 = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.back, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.side, self.bn3 = nn.Conv2d(8, 5, 1, bias=False), nn.BatchNorm2d(5)
        self.shift = nn.Parameter(torch.randn(1, 5, 1, 1))
        self.se = nn.Conv2d(5, 5, 1)
        self.other, self.bn4 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(9, 3, 1)

    def forward(self, x):
        stream = torch.relu(self.bn0(self.stem(x)))
        stream = stream + self.bn2(self.back(torch.relu(self.bn1(self.inner(stream)))))  # a residual add
        side = self.bn3(self.side(stream)) + self.shift  # a parameter added: no stream
        side = side * torch.sigmoid(self.se(side.mean((2, 3), keepdim=True)))  # a product: no stream
        return self.head(torch.cat([side, self.bn4(self.other(stream))], 1))  # a cat: no stream


def _summed_widths(analysis) -> list[int]:
    return sorted(s.width for s in analysis.spaces if s.summed)


def test_only_an_add_of_two_activations_marks_a_stream():
    model = Streams().eval()
    analysis = nrfx.analyze(model, torch.randn(2, 3, 8, 8))
    assert _summed_widths(analysis) == [8]  # the stream; not the shifted (5), gated (5), cat'ed (4) or inner (6)
    (stream,) = [s for s in analysis.spaces if s.summed]
    assert not stream.is_frozen


class Joined(nn.Module):
    """Two BN'd convs (8) joined by ``join``, then a head conv."""

    def __init__(self, join) -> None:
        super().__init__()
        self.join = join
        self.a, self.bn_a = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.join(self.bn_a(self.a(x)), self.bn_b(self.b(x))))


@pytest.mark.parametrize(("join", "stream"), [
    (torch.add, True), (torch.hypot, True), (torch.fmax, True), (lambda p, q: p.lerp(q, 0.5), False),
    (torch.atan2, False), (torch.logaddexp, False), (lambda p, q: p * (p > q), False), (torch.mul, False)])
def test_a_stream_is_a_join_zero_only_where_all_operands_are(join, stream):
    """hypot / fmax join like an add (zero only where both are); a comparison, atan2, logaddexp, lerp (rules
    that keep no zeros) or a product tie the two spaces without making a stream."""
    analysis = nrfx.analyze(Joined(join).eval(), torch.randn(2, 3, 4, 4))
    assert not analysis.unknown_ops
    assert _summed_widths(analysis) == ([8] if stream else [])
    assert [s.width for s in analysis.spaces if not s.is_frozen] == [8]


@pytest.mark.parametrize(("name", "widths"), [("resnet18", [64, 128, 256, 512]),
                                              ("mobilenet_v2", [24, 32, 64, 96, 160]),
                                              ("vgg11_bn", []), ("densenet121", [])])
def test_torchvision_streams_are_the_main_streams(name, widths):
    warnings.simplefilter("ignore")
    model = torchvision.models.get_model(name, weights=None).eval()
    assert _summed_widths(nrfx.analyze(model, torch.randn(1, 3, 64, 64))) == widths


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_keep_leaves_every_stream_whole_and_grows_the_rest_more(scheme):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().double()
    zero_scales(model, 0.4, seed=3, shifts=True)  # drawn per norm: a few stream channels die everywhere
    x = torch.randn(3, 3, 48, 48, dtype=torch.double)
    analysis = nrfx.analyze(model, x[:1])
    budget = nrfx.Budget.fraction(1.0, "macs")
    plans = {}
    for residual in ("rejuvenate", "keep"):
        new = nrfx.rejuvenate(model, None, budget, example_inputs=x[:1], scheme=scheme, residual=residual,
                              analysis=analysis)
        with torch.no_grad():
            torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)
        plans[residual] = plan = new.nrfx_plan
        assert plan.residual == residual and plan.cost_after <= plan.budget
        assert nrfx.Plan.from_json(plan.to_json()) == plan
    keep, grow = plans["keep"], plans["rejuvenate"]
    streams = [s.index for s in analysis.spaces if s.summed]
    assert any(len(grow.keep[s]) < analysis.spaces[s].width for s in streams)  # rejuvenate drops dead ones
    for s in streams:
        assert keep.keep[s] == list(range(analysis.spaces[s].width)) and keep.grow[s] == 0
    assert keep.alpha > grow.alpha  # the budget the streams no longer take goes to the other layers
    replayed = nrfx.apply_plan(model, keep, example_inputs=x[:1])
    with torch.no_grad():
        torch.testing.assert_close(replayed(x), model(x), rtol=1e-9, atol=1e-9)


def test_a_replayed_plan_that_changes_a_kept_stream_is_refused():
    model = Streams().eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = nrfx.analyze(model, x)
    plan = nrfx.rejuvenate(model, None, example_inputs=x, residual="keep", analysis=analysis).nrfx_plan
    (stream,) = [s.index for s in analysis.spaces if s.summed]
    data = plan.to_dict()
    data["keep"][stream] = data["keep"][stream][:-1]
    data["grow"][stream] = 1
    with pytest.raises(nrfx.PlanError, match=rf"space {stream} is a residual stream"):
        check_plan_fits(nrfx.Plan.from_dict(data), analysis)
    data["residual"] = "rejuvenate"  # the same widths are fine for a plan that rejuvenates streams
    check_plan_fits(nrfx.Plan.from_dict(data), analysis)
    old = plan.to_dict()
    del old["residual"]  # a plan written before the option reads as it was built
    assert nrfx.Plan.from_dict(old).residual == "rejuvenate"


def test_a_bad_residual_option_names_both_choices():
    model = Streams().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(nrfx.PlanError, match=r"'rejuvenate'.*'keep'"):
        nrfx.rejuvenate(model, None, example_inputs=x, residual="fixed")
    with pytest.raises(nrfx.DriverError, match="residual must be"):
        nrfx.NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.1), example_inputs=x, residual=True)
    data = nrfx.rejuvenate(model, None, example_inputs=x).nrfx_plan.to_dict()
    with pytest.raises(nrfx.PlanError, match="residual"):
        nrfx.Plan.from_dict({**data, "residual": "grow"})


def test_the_cli_keeps_streams_on_request(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["rejuvenate", "torchvision.models:resnet18", "--input-size", "3", "32", "32", "--residual", "keep",
                 "--json", str(out)]) == 0
    plan = json.loads(out.read_text())["plan"]
    assert plan["residual"] == "keep"
    model = torchvision.models.resnet18(weights=None).eval()
    streams = [s for s in nrfx.analyze(model, torch.randn(1, 3, 32, 32)).spaces if s.summed]
    assert len(streams) == 4
    for s in streams:
        assert plan["keep"][s.index] == list(range(s.width)) and plan["grow"][s.index] == 0
