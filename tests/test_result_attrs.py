"""Results keep what nrfx attached to them through copy.deepcopy and torch.save (issue 18, item 4)."""

from __future__ import annotations

import copy
import io

import torch
import torch.fx
from torch import nn

import nrfx
from nrfx.rewrite.results import attach


def _cnn() -> nn.Sequential:
    """conv-bn-relu ×2 and a head, with two dead channels in the first norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2)).eval()
    with torch.no_grad():
        model[1].weight[:2] = 0
        model[1].bias[:2] = 0
    return model


def _same_maps(a: dict, b: dict) -> bool:
    """The same param names with equal maps: every dim maps the same source channels (the copies are new objects)."""
    def dims(pmap) -> list[tuple[int, list[int]]]:
        return [(d.dim, d.source.tolist()) for d in pmap.dims]

    return a.keys() == b.keys() and bool(a) and all(dims(a[k]) == dims(b[k]) for k in a)


def test_deepcopy_keeps_plan_and_param_map():
    x = torch.randn(2, 3, 8, 8)
    new = nrfx.rejuvenate(_cnn(), None, None, example_inputs=x)
    clone = copy.deepcopy(new)
    assert isinstance(clone, torch.fx.GraphModule)
    assert clone.nrfx_plan == new.nrfx_plan and clone.nrfx_plan.to_json() == new.nrfx_plan.to_json()
    assert _same_maps(clone.nrfx_param_map, new.nrfx_param_map)
    assert copy.deepcopy(clone).nrfx_plan == new.nrfx_plan  # and a copy of the copy
    torch.testing.assert_close(clone(x), new(x))


def test_torch_save_keeps_plan_and_param_map():
    new = nrfx.rejuvenate(_cnn(), None, None, example_inputs=torch.randn(2, 3, 8, 8))
    buffer = io.BytesIO()
    torch.save(new, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.nrfx_plan == new.nrfx_plan
    assert _same_maps(loaded.nrfx_param_map, new.nrfx_param_map)


def test_deepcopy_keeps_gates_of_add_and_fold():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    gated = nrfx.add_gates(model, torch.randn(2, 4))
    assert gated.nrfx_gates and copy.deepcopy(gated).nrfx_gates == gated.nrfx_gates
    folded = nrfx.fold_gates(gated, torch.randn(2, 4))
    assert copy.deepcopy(folded).nrfx_gates == folded.nrfx_gates == ()


def test_attach_records_the_latest_value():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    attach(gm, nrfx_gates=("a",))
    attach(gm, nrfx_gates=("b",), nrfx_plan=None)
    clone = copy.deepcopy(gm)
    assert clone.nrfx_gates == ("b",) and clone.nrfx_plan is None


class _Branching(nn.Module):
    """A root neither fx nor torch.export captures (a branch on values) around two capturable parts."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, images: list[torch.Tensor]):
        scores = self.head(self.backbone(torch.stack(images)).mean((2, 3))).squeeze(1)
        return scores if scores.max() > 0 else -scores


def test_deepcopy_keeps_island_plans():
    model = _Branching().eval()
    with torch.no_grad():
        model.backbone[1].weight[:3] = 0
    images = [torch.randn(3, 8, 8) for _ in range(4)]
    new = nrfx.rejuvenate(model, None, None, example_inputs=(images,))
    clone = copy.deepcopy(new)
    assert set(clone.nrfx_plans) == {"backbone", "head"}
    assert clone.nrfx_plans == new.nrfx_plans
    for path, plan in new.nrfx_plans.items():
        assert clone.get_submodule(path).nrfx_plan == plan
