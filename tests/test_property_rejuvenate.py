"""Property: rejuvenation preserves the function of random architectures with random masks."""

from __future__ import annotations

import itertools
import math
import warnings

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from models import archs, build, masks_for, repair_masks, zero_masked
from support import assert_aligned
from torch import nn

import nrfx
from nrfx.plan.maps import DimMap, ParamMap
from nrfx.rewrite.tensors import copy_block

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class TwoInputs(nn.Module):
    """Two inputs, a dict of outputs: two random nets, or one net called on both (weights shared)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"first": self.first(x), "second": self.second(y)}


def _draw_model(data, io: str):
    """(model, masks keyed by its module names, inputs) for one, two or one shared random net."""
    nets, masks = [], {}
    for prefix in ("first", "second")[: 1 if io == "one" else 2 if io == "two" else 1]:
        arch = data.draw(archs())
        net_masks = repair_masks(arch, data.draw(masks_for(arch)))
        net = build(arch, seed=data.draw(st.integers(0, 100)), dtype=torch.float64).eval()
        zero_masked(net, net_masks)
        nets.append(net)
        masks |= {(k if io == "one" else f"{prefix}.{k}"): v for k, v in net_masks.items()}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    if io == "one":
        return nets[0], masks, (x,)
    model = TwoInputs(nets[0], nets[-1]).eval()  # "shared": the same net twice
    return model, masks, (x, torch.randn(2, 3, 16, 16, dtype=torch.float64))


@settings(max_examples=200, **SETTINGS)
@given(st.data())
def test_rejuvenation_preserves_random_architectures(data):
    io = data.draw(st.sampled_from(["one", "one", "two", "shared"]))
    model, masks, inputs = _draw_model(data, io)
    event(f"inputs: {io}")
    scheme = data.draw(st.sampled_from(["nr", "cr", "ca"]))
    rescale = data.draw(st.booleans())
    fraction = data.draw(st.sampled_from([1.0, 1.5]))  # compression drops live channels: not preserving
    align = data.draw(st.sampled_from([1, 2, 4, 8]))
    residual = data.draw(st.sampled_from(["rejuvenate", "keep"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, inputs)
        usable = {k: v for k, v in masks.items() if k in analysis.mask_sites}
        budget = nrfx.Budget.fraction(fraction, "params")
        try:
            new = nrfx.rejuvenate(model, usable, budget, example_inputs=inputs, scheme=scheme, rescale=rescale,
                                  analysis=analysis, align=align, residual=residual)
        except nrfx.BudgetError:
            event("budget below the frozen part")
            return  # compression below the frozen part: the error is the documented answer
    with torch.no_grad():
        expected, got = model(*inputs), new(*inputs)
    values = list(expected.values()) if isinstance(expected, dict) else [expected]
    scale = max([1.0] + [v.abs().max().item() for v in values])
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9 * scale)
    assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    stored = sum(p.numel() for p in new.parameters())  # cr stores no cross blocks
    assert stored == new.nrfx_plan.cost_after if scheme != "cr" else stored <= new.nrfx_plan.cost_after
    assert_aligned(analysis, new.nrfx_plan)
    if residual == "keep":
        for space in (s for s in analysis.spaces if s.summed):
            event("a residual stream kept")
            assert new.nrfx_plan.keep[space.index] == list(range(space.width)) and not new.nrfx_plan.grow[space.index]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@st.composite
def _param_maps(draw):
    """(old tensor, ParamMap): rank 1–4, a random ascending set of mapped dims (adjacent or not), each new slot of
    a mapped dim an old index (each at most once, any order) or -1 (rejuvenated)."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    dims = sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1)))
    maps, new_shape = [], list(shape)
    for d in dims:
        kept = draw(st.permutations(range(shape[d])))[:draw(st.integers(0, shape[d]))]
        slots = draw(st.permutations(kept + [-1] * draw(st.integers(0, 3))))
        maps.append(DimMap(d, torch.tensor(slots, dtype=torch.long)))
        new_shape[d] = len(slots)
    old = torch.arange(1, math.prod(shape) + 1, dtype=torch.float64).reshape(shape)
    return old, ParamMap("p", tuple(shape), tuple(new_shape), tuple(maps))


@settings(max_examples=300, **SETTINGS)
@given(_param_maps())
def test_copy_block_puts_each_old_entry_where_the_map_says(case):
    """An entry of the new tensor is the old entry its mapped slots name (all S), the fresh entry (all R), else 0."""
    old, pmap = case
    fresh = -torch.arange(1, math.prod(pmap.new_shape) + 1, dtype=torch.float64).reshape(pmap.new_shape)
    new = torch.zeros(pmap.new_shape, dtype=torch.float64)
    copy_block(new, fresh, pmap, rejuvenated=True)
    copy_block(new, old, pmap, rejuvenated=False)
    sources = {m.dim: m.source.tolist() for m in pmap.dims}
    for index in itertools.product(*(range(n) for n in pmap.new_shape)):
        picked = [sources[d][i] if d in sources else i for d, i in enumerate(index)]
        mapped = [picked[d] for d in sources]
        want = old[tuple(picked)] if min(mapped) >= 0 else fresh[index] if max(mapped) < 0 else 0.0
        assert new[index] == want, (index, picked)
