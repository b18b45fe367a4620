"""On a CUDA device: the driver, rejuvenate, the S/R layers and the paper benchmark keep device and dtype.

Marked ``cuda``; skipped where no CUDA device is present (``pytest -m cuda`` selects them).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from support import EXAMPLE, Task, small_cnn, zero_scales
from torch import nn

import nrfx
from nrfx.train.driver import NeuralRejuvenation

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parent.parent


def _cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _train(nr: NeuralRejuvenation, steps: int, device: torch.device) -> None:
    task = Task()
    for _ in range(steps):
        x, y = task.batch()
        loss = nn.functional.cross_entropy(nr.model(x.to(device)), y.to(device))
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()


def _on(module: nn.Module, device: torch.device) -> bool:
    return all(t.device == device for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_driver_rejuvenates_and_trains_on_cuda(scheme):
    device = _cuda()
    model = small_cnn().to(device)
    nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                            example_inputs=EXAMPLE.to(device), interval=None, target=0.9, lam=1e-3, scheme=scheme)
    assert all(m is None or m.device == device for _, _, m in nr._stage.norms)
    _train(nr, 3, device)
    zero_scales(nr.module)
    assert nr.check()["event"] == "rejuvenate"
    assert _on(nr.module, device)
    assert all(v.device == device for state in nr.optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim())
    _train(nr, 3, device)  # the penalty (foreach) and the carried momentum on the device
    assert 0.0 < nr.utilization() <= 1.0


def test_penalty_on_cuda_is_lambda_sign_gamma():
    device = _cuda()
    model = small_cnn().to(device)
    nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=1.0), example_inputs=EXAMPLE.to(device),
                            interval=None, lam=0.25)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.weight.detach().clone() for m in norms]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    nr.step()
    for m, old in zip(norms, before, strict=True):
        assert torch.equal(m.weight.detach(), old - 0.25 * torch.sign(old))


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_rejuvenate_on_cuda_matches_cpu(scheme):
    model = small_cnn()
    zero_scales(model)
    cpu = nrfx.rejuvenate(copy.deepcopy(model), None, None, example_inputs=EXAMPLE, scheme=scheme, seed=3)
    gpu = nrfx.rejuvenate(copy.deepcopy(model).to(_cuda()), None, None, example_inputs=EXAMPLE.to(_cuda()),
                          scheme=scheme, seed=3)
    assert gpu.nrfx_plan.new_widths == cpu.nrfx_plan.new_widths
    assert _on(gpu, _cuda())
    x = torch.randn(4, 1, 8, 8)
    for mode in (False, True):  # eval (tiled S/R forward) and train (differentiable S/R forward)
        reference = copy.deepcopy(cpu).train(mode)
        moved = copy.deepcopy(cpu).to(_cuda()).train(mode)  # the same weights: the device must not change it
        with torch.no_grad():
            torch.testing.assert_close(moved(x.to(_cuda())).cpu(), reference(x), rtol=1e-4, atol=1e-4)
            out = gpu.train(mode)(x.to(_cuda()))
        assert out.device.type == "cuda" and out.shape == reference(x).shape and torch.isfinite(out).all()


def test_paper_benchmark_quick_on_cuda(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality_paper", "--quick", "--device", "cuda",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "quality_paper.json").read_text())
    assert data["device"].startswith("cuda") and all(r["rounds"] == 1 for r in data["runs"] if r["arm"] == "nr-cr")


class _ConvLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(2, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.rnn = nn.LSTM(16, 8, num_layers=2, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.front(x).permute(2, 0, 1))
        return out


@pytest.mark.parametrize("inplace", [False, True])
def test_a_rewritten_lstm_keeps_one_cudnn_weight_chunk(inplace):
    """The resized recurrent layer runs cuDNN on compacted weights: no "not part of single contiguous chunk"."""
    torch.manual_seed(0)
    model = _ConvLSTM().to(_cuda()).eval()
    x = torch.randn(3, 2, 6, device=_cuda())
    zero_scales(model, 0.5)
    with torch.no_grad():
        expected = model(x)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme="cr", align=8, inplace=inplace)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with torch.no_grad():
            got = new(x)
    assert new.get_submodule("rnn").weight_ih_l0.shape[1] == new.get_submodule("front.0").out_channels
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
