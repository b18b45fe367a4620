"""Property: rejuvenation preserves the function of random architectures with random masks."""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import archs, build, repair_masks, zero_masked
from test_property_analysis import masks_for

import nrfx

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=200, **SETTINGS)
@given(st.data())
def test_rejuvenation_preserves_random_architectures(data):
    arch = data.draw(archs())
    masks = repair_masks(arch, data.draw(masks_for(arch)))
    scheme = data.draw(st.sampled_from(["nr", "cr", "ca"]))
    rescale = data.draw(st.booleans())
    fraction = data.draw(st.sampled_from([1.0, 1.5]))  # compression drops live channels: not preserving
    model = build(arch, seed=data.draw(st.integers(0, 100)), dtype=torch.float64).eval()
    zero_masked(model, masks)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, x)
        usable = {k: v for k, v in masks.items() if k in analysis.mask_sites}
        budget = nrfx.Budget.fraction(fraction, "params")
        try:
            new = nrfx.rejuvenate(model, usable, budget, example_inputs=x, scheme=scheme, rescale=rescale,
                                  analysis=analysis)
        except nrfx.BudgetError:
            return  # compression below the frozen part: the error is the documented answer
    with torch.no_grad():
        expected, got = model(x), new(x)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9 * max(1.0, expected.abs().max().item()))
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    assert sum(p.numel() for p in new.parameters()) == new.nrfx_plan.cost_after
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
