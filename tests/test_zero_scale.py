"""A zero scale is dead: a norm whose γ are all exactly 0 is wholly dead, not wholly alive (issue 18, item 1)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import nrfx
from nrfx.analysis.masks import alive_scales


def _three_blocks() -> nn.Sequential:
    """conv-bn-relu ×3 then a head; the middle norm's γ and β are all zero (its channels output β = 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6),
                          nn.ReLU(), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(5, 2)).double().eval()
    with torch.no_grad():
        for norm in (model[1], model[7]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
            norm.running_mean.normal_()
        model[4].weight.zero_()
        model[4].bias.zero_()
    return model


def test_all_zero_scales_are_dead_in_norm_masks():
    masks = nrfx.norm_masks(_three_blocks())
    assert not masks["4"].any()
    assert masks["1"].all() and masks["7"].all()


def test_zero_scale_is_dead_at_any_threshold():
    gamma = torch.tensor([0.0, -0.0, 1e-30, 2.0, -3.0])
    assert alive_scales(gamma, 0.0).tolist() == [False, False, True, True, True]
    assert alive_scales(gamma, 0.01).tolist() == [False, False, False, True, True]
    assert alive_scales(torch.zeros(3)).tolist() == [False] * 3
    assert alive_scales(torch.zeros(0)).numel() == 0


def test_all_zero_norm_lowers_utilization_and_masks_from_agrees():
    model = _three_blocks()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    u = analysis.utilization()
    assert u.r_params < 1 and u.r_macs < 1
    assert not analysis.masks_from(model)["4"].any()
    assert analysis.report().totals.r_params == u.r_params


def test_rejuvenate_removes_the_zero_norms_channels_and_preserves_function():
    model = _three_blocks()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis)
    plan = new.nrfx_plan
    space = next(i for i, w in enumerate(plan.widths) if w == 6)
    assert len(plan.keep[space]) == 1  # every channel dead: only the strongest is kept to keep the graph whole
    assert any("every channel of space" in str(w.message) for w in caught)
    assert plan.cost_live < plan.cost_before
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-7, atol=1e-9)
