"""A partial or corrupt driver checkpoint is a DriverError naming the key, and the driver is left as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import nrfx
from nrfx.train.driver import DriverError


def _driver() -> nrfx.NeuralRejuvenation:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4))
    return nrfx.NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                   example_inputs=torch.randn(2, 3, 8, 8), interval=None)


def _trained_state() -> dict:
    nr = _driver()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    for _ in range(2):
        nr.optimizer.zero_grad()
        nn.functional.cross_entropy(nr.model(x), y).backward()
        nr.step()
    return nr.state_dict()


def _corrupt(state: dict, key: str, value) -> dict:
    broken = copy.deepcopy(state)
    if value is KeyError:
        del broken[key]
    else:
        broken[key] = value
    return broken


@pytest.mark.parametrize(("key", "value"), [
    ("budget", KeyError), ("lam", math.nan), ("lam", "0.1"), ("steps", "many"), ("rounds", True),
    ("history", KeyError), ("optimizer", {"state": {}, "param_groups": []}), ("budget", {"params": None}),
    ("model", KeyError),
])
def test_bad_checkpoint_is_a_driver_error_and_changes_nothing(key, value):
    state = _trained_state()
    fresh = _driver()
    before = {k: v.clone() for k, v in fresh.module.state_dict().items()}
    optimizer, steps, lam = fresh.optimizer, fresh.steps, fresh.lam
    with pytest.raises(DriverError, match=key):
        fresh.load_state_dict(_corrupt(state, key, value))
    assert fresh.optimizer is optimizer and (fresh.steps, fresh.lam) == (steps, lam)
    assert all(torch.equal(v, before[k]) for k, v in fresh.module.state_dict().items())
    fresh.load_state_dict(state)  # the good checkpoint still loads afterwards
    assert fresh.steps == 2


def test_unsliceable_state_of_s_r_blocks_is_reported_not_skipped():
    from nrfx.layers.srlayers import SR_LAYERS
    from nrfx.rewrite.optim_state import carry_optimizer_state

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[1].weight[:8] = 0
        model[4].weight[:8] = 0
    first = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="cr", align=1)
    split = next(name for name, m in first.named_modules() if isinstance(m, SR_LAYERS))
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    for p in first.parameters():
        optimizer.state[p] = {"factored": torch.zeros(p.numel() + 1)}  # not shaped like its parameter
    with torch.no_grad():
        first.get_submodule("1" if split != "0" else "4").weight[:4] = 0
    second = nrfx.rejuvenate(first, None, None, example_inputs=x, scheme="cr", align=1)
    fresh = torch.optim.SGD(second.parameters(), lr=0.1)
    dropped = carry_optimizer_state(optimizer, fresh, first, second, second.nrfx_param_map)
    assert f"{split}.weight" in dropped
