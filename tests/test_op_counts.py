"""Proof without a GPU: the aten calls one forward (and forward + backward) of a rewritten model launches.

ResNet-50, MobileNet-V3-Large (and VGG-11-BN, whose convs carry a bias) with 40 % of each norm's
channels dead, rewritten at c(A) MACs (pruned: at U(θ)), counted on the meta device at batch 64
with a dispatch mode: the S/R layers launch two convolutions and a few elementwise ops, nothing
copies a weight, and under the default ``align=8`` the widths stay tensor-core friendly.
"""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torchvision
from support import AtenCalls, zero_scales
from torch import nn

import nrfx
from nrfx.layers.srlayers import SR_LAYERS

MODELS = ["resnet50", "mobilenet_v3_large", "vgg11_bn"]  # VGG: convs with a bias before every BN
LIMITS = {"cr": 2.0, "ca": 3.0}  # total aten calls ≤ limit × the original's, inference and training


def _count(model: nn.Module, train: bool, batch: int = 64) -> collections.Counter:
    """aten calls of one forward (train: forward + backward) on the meta device."""
    meta = copy.deepcopy(model).to("meta").train(train)
    x = torch.randn(batch, 3, 224, 224, device="meta")
    with AtenCalls() as mode:
        if train:
            meta(x).sum().backward()
        else:
            with torch.no_grad():
                meta(x)
    return mode.calls


@pytest.fixture(scope="module", params=MODELS)
def variants(request):
    """(name, {variant: model}): the original and its rewrites at c(A) MACs (pruned: at U(θ))."""
    warnings.simplefilter("ignore")
    model = torchvision.models.get_model(request.param, weights=None).eval()
    zero_scales(model, 0.4, seed=1)
    x = torch.randn(1, 3, 224, 224)
    analysis = nrfx.analyze(model, x)
    live = analysis.utilization(analysis.masks_from(model)).live_macs
    built = {"original": model,
             "pruned": nrfx.rejuvenate(model, None, nrfx.Budget(macs=live), example_inputs=x, analysis=analysis)}
    for scheme in ("nr", "cr", "ca"):
        built[scheme] = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x,
                                        scheme=scheme, analysis=analysis)
    return request.param, built


def _sr_layers(model: nn.Module) -> int:
    return sum(isinstance(m, SR_LAYERS) for m in model.modules())


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_rewrites_launch_what_the_maths_needs(variants, train):
    name, built = variants
    counts = {k: _count(m, train) for k, m in built.items()}
    original = counts["original"]
    for variant, calls in counts.items():
        assert not (calls["copy_"] + calls["clone"]) or train, (name, variant, calls)  # no copy in inference
        assert calls["copy_"] + calls["clone"] == original["copy_"] + original["clone"], (name, variant)
    for variant in ("pruned", "nr"):
        assert counts[variant]["convolution"] == original["convolution"], (name, variant)
        assert _sr_layers(built[variant]) == 0
    for scheme, limit in LIMITS.items():
        split = _sr_layers(built[scheme])
        assert split > 5, (name, scheme)  # the schemes did split layers (VGG-11: 9 of 11)
        assert counts[scheme]["convolution"] <= original["convolution"] + split, (name, scheme)
        total, before = sum(counts[scheme].values()), sum(original.values())
        assert total <= limit * before, (name, scheme, total, before)


def test_widths_are_aligned_under_the_default(variants):
    name, built = variants
    for variant, model in built.items():
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        widths += [w for m in model.modules() if isinstance(m, SR_LAYERS) for w in (m.s_in, m.s_out)]  # S blocks
        share = sum(w % 8 == 0 for w in widths) / len(widths)
        assert share >= 0.95, (name, variant, share)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_s_r_layers_compile_into_as_many_graphs_as_the_original(train):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    zero_scales(model, 0.4, seed=2)
    x = torch.randn(2, 3, 32, 32)
    variants = {"original": model}
    for scheme in ("cr", "ca"):
        variants[scheme] = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x,
                                           scheme=scheme)
        assert _sr_layers(variants[scheme]) > 5
    graphs = {}
    for name, module in variants.items():
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            explained = torch._dynamo.explain(module.train(train))(x)
        graphs[name] = (explained.graph_count, explained.graph_break_count)
    torch._dynamo.reset()
    assert graphs["cr"] == graphs["ca"] == graphs["original"], graphs
