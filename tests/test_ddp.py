"""Two gloo processes under DDP: identical parameters after a rejuvenation and after further steps."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nrfx.train.driver import NeuralRejuvenation, ddp_wrapper

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cnn() -> nn.Module:
    torch.manual_seed(0)  # identical initial model on every rank
    layers, channels = [], 1
    for _ in range(3):
        layers += [nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        channels = 16
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4))


def _snapshot(nr: NeuralRejuvenation) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in nr.module.named_parameters()}


def _worker(rank: int, port: int, out: str, inplace: bool) -> None:
    """Train on rank-specific data until a rejuvenation, 30 steps more; save parameter snapshots.

    In place, the driver keeps the rank's own model and optimizer objects and rebuilds the DDP wrapper.
    """
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _cnn()
        nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                example_inputs=torch.zeros(2, 1, 8, 8), interval=10, delta_lambda=3e-3,
                                seed=11, wrap=ddp_wrapper(), inplace=inplace)
        optimizer, wrapper = nr.optimizer, nr.model
        projection = torch.randn(64, 2, generator=torch.Generator().manual_seed(123))
        data = torch.Generator().manual_seed(100 + rank)  # every rank sees different batches
        snapshots, after = {}, 0
        for _ in range(3000):
            x = torch.randn(16, 1, 8, 8, generator=data)
            signs = (x.flatten(1) @ projection > 0).long()
            loss = nn.functional.cross_entropy(nr.model(x), signs[:, 0] * 2 + signs[:, 1])
            nr.optimizer.zero_grad()
            loss.backward()
            nr.step()
            if nr.rounds and "rejuvenated" not in snapshots:
                snapshots["rejuvenated"] = _snapshot(nr)
                snapshots["wrapped"] = isinstance(nr.model, nn.parallel.DistributedDataParallel)
                snapshots["same_objects"] = nr.module is model and nr.optimizer is optimizer
                snapshots["new_wrapper"] = nr.model is not wrapper and nr.model.module is nr.module
            after += bool(nr.rounds)
            if after == 30:
                break
        snapshots.update(final=_snapshot(nr), rounds=nr.rounds, history=nr.history)
        torch.save(snapshots, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("inplace", [False, True])
def test_ranks_stay_identical_through_rejuvenation(tmp_path, inplace):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), inplace), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["rounds"] >= 1 and r["wrapped"] and r["new_wrapper"] for r in ranks)
    assert all(r["same_objects"] == inplace for r in ranks)
    assert ranks[0]["history"] == ranks[1]["history"]
    for key in ("rejuvenated", "final"):
        first, second = ranks[0][key], ranks[1][key]
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), (key, name)
    assert any(a.shape != b.shape for a, b in zip(ranks[0]["final"].values(), _cnn().parameters(), strict=True))
