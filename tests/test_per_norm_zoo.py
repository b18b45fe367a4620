"""Dead channels drawn independently per norm: a zero at one norm's input is a constant at the next.

A channel killed by one norm of a space (γ = β = 0) is zero only until the next norm on that
space reads it: that norm emits β − γ·μ/σ (eval) there.  The rejuvenated model must keep such
channels (or fold their constants exactly): every scheme ± rescale keeps the function.  Three models
here with every variant; every other torchvision model with one variant in tests/test_torchvision_zoo.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from support import assert_preserved, kill_per_norm, norms_per_space, zoo_input_size

import nrfx

FAST = ["densenet121", "resnet18", "efficientnet_b0"]


def _per_norm(name: str, batch: int = 2, seed: int = 0):
    """A float64 eval model with per-norm dead channels, its input and analysis (None: < 2 norms per space)."""
    warnings.simplefilter("ignore")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    size = zoo_input_size(name)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    if norms_per_space(model, analysis) < 2:
        return None
    assert kill_per_norm(model, analysis, 0.3, seed) > 0
    return model, x, analysis


def test_densenet_stem_dead_channels_are_kept():
    """The regression: DenseNet's stem norm kills channels that every dense layer's norm1 reads."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    kill_per_norm(model, analysis, 0.0, 0)  # randomise every norm, kill nothing ...
    with torch.no_grad():
        model.features.norm0.weight[:8] = 0  # ... then only the stem's first 8 channels
        model.features.norm0.bias[:8] = 0
    stem = analysis.space_ids(analysis.records["features_norm0"].output)[0]
    assert bool(analysis.alive()[stem][:8].all())  # later norms emit constants: alive
    assert_preserved(model, x, analysis, [("nr", False), ("cr", True)])


@pytest.mark.parametrize("name", FAST)
def test_per_norm_dead_preserved_fast(name):
    prepared = _per_norm(name, batch=3)
    assert prepared is not None, f"{name} has no space with two norms"
    assert_preserved(*prepared)


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "resnet26d", "efficientvim_m1"])
def test_per_norm_dead_preserved_timm(name):
    """timm's BatchNormAct2d fuses an activation (hardswish here): rescaling it would not be exact.
    EfficientViM's state-space mixer runs a conv1d with a channel space on its length dim (``h @ c``)."""
    timm = pytest.importorskip("timm")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).double().eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    assert kill_per_norm(model, analysis, 0.3, 1) > 0
    assert_preserved(model, x, analysis)
