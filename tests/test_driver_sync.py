"""A driver step between checks: no host synchronisation, and an L1 penalty of a constant number of aten calls."""

from __future__ import annotations

import pytest
import torch
from support import AtenCalls
from torch import nn

from nrfx.train.driver import NeuralRejuvenation

EXAMPLE = torch.zeros(2, 1, 8, 8)
LAM = 1e-3
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Blocks(nn.Module):
    """conv-bn-relu × ``blocks``; the first norm also scales the (frozen) input channel: partly monitored."""

    def __init__(self, blocks: int, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(blocks)
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width + 1)
        convs, norms, channels = [], [], width + 1
        for _ in range(blocks - 1):
            convs.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            norms.append(nn.BatchNorm2d(width))
            channels = width
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem_bn(torch.cat([self.stem(x), x], 1)))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            y = torch.relu(norm(conv(y)))
        return self.head(y.mean((2, 3)))


def driver(blocks: int, lr: float = 0.05) -> NeuralRejuvenation:
    """A driver whose checks never come (interval 10⁶), no progress bar, a fixed λ, plain foreach SGD."""
    return NeuralRejuvenation(Blocks(blocks), lambda p: torch.optim.SGD(p, lr=lr, foreach=True),
                              example_inputs=EXAMPLE, interval=10**6, delta_lambda=0.0, lam=LAM, progress=False)


def backward(nr: NeuralRejuvenation, seed: int = 0) -> None:
    """Fresh grads from one batch."""
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    nr.optimizer.zero_grad()
    nr.model(x).square().mean().backward()


def recorded(call) -> list[str]:
    """The aten ops that ``call()`` issues."""
    with AtenCalls() as recorder:
        call()
    return recorder.ops


def expected_grads(nr: NeuralRejuvenation) -> dict[str, torch.Tensor | None]:
    """Rule: grad + λ·sign(γ)·mask, mask ones where all the norm's channels are free."""
    return {name: None if g.grad is None else g.grad + LAM * (g.detach().sign() * (1.0 if m is None else m))
            for name, g, m in nr._stage.norms}


def grads(nr: NeuralRejuvenation) -> dict[str, torch.Tensor | None]:
    return {name: None if g.grad is None else g.grad.clone() for name, g, _ in nr._stage.norms}


def assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in got:
        assert (got[name] is None) == (want[name] is None), name
        assert got[name] is None or torch.equal(got[name], want[name]), name


def test_fixture_has_partly_monitored_norms():
    for blocks in (3, 9):
        norms = driver(blocks)._stage.norms
        assert len(norms) == blocks
        assert [m is not None for _, _, m in norms] == [True] + [False] * (blocks - 1)


@pytest.mark.parametrize("blocks", [3, 9])
def test_step_between_checks_never_syncs(blocks):
    nr = driver(blocks)
    backward(nr)
    ops = recorded(nr.step)
    assert nr.steps == 1 and not nr.history  # no check ran
    assert ops and not SYNCS & set(ops), sorted(SYNCS & set(ops))


def test_step_costs_the_same_number_of_aten_calls_whatever_the_norm_count():
    counts = {}
    for blocks in (3, 9):
        nr = driver(blocks)
        backward(nr)
        step = recorded(nr.step)
        backward(nr, seed=1)
        optimizer = recorded(nr.optimizer.step)
        backward(nr, seed=2)
        penalty = recorded(nr.penalize)
        assert len(step) == len(optimizer) + len(penalty)  # step adds nothing but the penalty
        assert len(penalty) <= 3 and all(op.startswith("aten::_foreach_") for op in penalty)
        counts[blocks] = (len(step) - len(optimizer), sorted(penalty))
    assert counts[3] == counts[9]


def test_penalty_is_lambda_sign_gamma_mask():
    nr = driver(5, lr=0.0)
    backward(nr)
    before, want = grads(nr), expected_grads(nr)
    nr.step()
    assert_grads_equal(grads(nr), want)
    stem = nr._stage.norms[0][1].grad  # channels 0-3 free, channel 4 (the input's) frozen: no penalty there
    assert torch.equal(stem[4:], before["stem_bn"][4:]) and not torch.equal(stem[:4], before["stem_bn"][:4])


def test_penalty_skips_scales_without_grad():
    nr = driver(5, lr=0.0)
    backward(nr)
    nr._stage.norms[0][1].grad = None  # the partly monitored norm
    nr._stage.norms[2][1].grad = None
    want = expected_grads(nr)
    nr.step()
    assert_grads_equal(grads(nr), want)


def test_penalty_follows_a_rejuvenation():
    nr = driver(4, lr=0.0)
    nr.target = 0.9
    with torch.no_grad():
        for norm in nr.module.norms:
            norm.weight[: norm.num_features // 2] = 0.0
    assert nr.check()["event"] == "rejuvenate"
    penalty = nr._stage.penalty
    assert {id(g) for g in penalty.gammas} == {id(g) for _, g, _ in nr._stage.norms}
    assert {id(g) for g in penalty.gammas} <= {id(p) for p in nr.module.parameters()}
    backward(nr)
    want = expected_grads(nr)
    assert not SYNCS & set(recorded(nr.step))
    assert_grads_equal(grads(nr), want)
