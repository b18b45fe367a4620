"""apply_plan trusts nothing in a plan: every field is checked before anything is built (PlanError names it)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import nrfx
from nrfx.errors import PlanError


class _Grouped(nn.Module):
    """stem 3→16, BN, a grouped conv 16→16 (groups 4), BN, head: a plain space and a grouped unit."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.grouped, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.b2(self.grouped(self.b1(self.stem(x)).relu())).relu()
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def made():
    torch.manual_seed(0)
    model = _Grouped().eval()
    with torch.no_grad():
        model.b1.weight[:4] = 0
        model.b1.bias[:4] = 0.3  # a constant the head-side conv folds
    warnings.simplefilter("ignore")
    new = nrfx.rejuvenate(model, None, None, example_inputs=X, align=1)
    return model, new.nrfx_plan.to_dict()


def test_a_good_plan_replays_and_round_trips_through_json(made):
    model, data = made
    plan = nrfx.Plan.from_json(json.dumps(data))
    assert plan.version == 1 and plan.to_dict() == data
    nrfx.apply_plan(model, plan, X)


def _edited(data: dict, path: tuple, value) -> dict:
    edited = copy.deepcopy(data)
    target = edited
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return edited


EDITS = [  # (path into the plan dict, new value, the field the error must name)
    (("scheme",), "xy", "scheme"), (("scheme",), None, "scheme"), (("seed",), -1, "seed"),
    (("seed",), 2**80, "seed"), (("gamma0",), -1.0, "gamma0"), (("gamma0",), float("inf"), "gamma0"),
    (("gamma0",), "__import__('os')", "gamma0"), (("budget",), -5, "budget"), (("alpha",), float("nan"), "alpha"),
    (("rescale",), "yes", "rescale"), (("capture",), "islands", "capture"), (("align",), 0, "align"),
    (("version",), 99, "version"), (("widths",), "16", "widths"), (("keep",), [], "keep"),
    (("keep", 0), [3, 3, 5], "keep[0]"), (("keep", 0), [-1, 2], "keep[0]"), (("keep", 0), [5, 2], "keep[0]"),
    (("keep", 0), [0, 10**9], "keep[0]"), (("grow",), [10**12, 0, 0, 0], "grow"),
    (("grow", 0), -3, "grow"), (("folds",), {"stem": {"0": 1.0}}, "folds"),
    (("folds",), {"nope": {"0": 1.0}}, "folds"), (("folds",), {"grouped": {"x": 1.0}}, "folds"),
    (("folds",), {"grouped": {"0": float("nan")}}, "folds"), (("input_shapes",), [[0, 3]], "input_shapes"),
    (("notes",), [1], "notes"), (("scheme",), KeyError, "missing"), (("injected",), 1, "unknown"),
]


@pytest.mark.parametrize(("path", "value", "field"), EDITS, ids=[f"{'.'.join(map(str, p))}={v!r}"[:40]
                                                                   for p, v, _ in EDITS])
def test_an_edited_plan_is_a_plan_error_naming_the_field(made, path, value, field):
    model, data = made
    edited = _edited(data, path, value)
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        nrfx.apply_plan(model, edited, X)


def test_fit_checks_against_the_model(made):
    model, data = made
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, X)
    grouped = next(s.index for s in analysis.spaces if s.block > 1 and data["keep"][s.index])
    free = {s.index for s in analysis.spaces if not s.is_frozen}
    for edit, match in [
        (lambda d: d.__setitem__("grow", [g + 400 * (s in free) for s, g in enumerate(d["grow"])]),
         "over its own budget"),  # whole groups in the tied spaces
        (lambda d: d.__setitem__("grow", [g + 40000 * (s in free) for s, g in enumerate(d["grow"])]), "over 64×"),
        (lambda d: d["grow"].__setitem__(0, d["grow"][0] + 4), "same number of groups"),
        (lambda d: d["keep"][grouped].pop(), "whole groups|same groups"),
        (lambda d: d.__setitem__("widths", [w + 1 for w in d["widths"]]), "does not fit"),
    ]:
        edited = copy.deepcopy(data)
        edit(edited)
        with pytest.raises(PlanError, match=match):
            nrfx.apply_plan(model, edited, X)


def test_plan_json_that_is_not_a_plan(made):
    for text in ("[1, 2]", "{", "null", json.dumps({"scheme": "nr"})):
        with pytest.raises(PlanError):
            nrfx.Plan.from_json(text)
