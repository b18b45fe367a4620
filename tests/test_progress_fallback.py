"""progress=True works with the core dependencies alone: plain text when tqdm is missing (issue 18, item 11)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import nrfx
from nrfx.train.driver import DriverError, NeuralRejuvenation
from nrfx.train.history import Progress, resolve_kind

EXAMPLE = torch.zeros(2, 1, 8, 8)


def _cnn() -> nn.Module:
    """conv-bn-relu ×2, pool, linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01)


def _steps(nr: NeuralRejuvenation, n: int) -> None:
    """n plain training steps on random data."""
    for _ in range(n):
        loss = nr.model(torch.randn(4, 1, 8, 8)).square().mean()
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()


@pytest.fixture
def no_tqdm(monkeypatch):
    """tqdm (and rich) cannot be imported, as on a plain install."""
    for name in ("tqdm", "tqdm.auto", "rich", "rich.progress"):
        monkeypatch.setitem(sys.modules, name, None)


def test_progress_true_falls_back_to_text_without_tqdm(no_tqdm, capsys):
    nr = NeuralRejuvenation(_cnn(), _sgd, example_inputs=EXAMPLE, interval=2, progress=True, total=4)
    assert nr._progress.kind == "text"
    _steps(nr, 4)
    assert nr._progress.bar.n == 4
    err = capsys.readouterr().err
    assert "nrfx step 2/4: r=" in err and "nrfx step 4/4: r=" in err and "λ=" in err
    nr.close()
    assert nr._progress is None


def test_explicit_tqdm_without_it_names_the_extra(no_tqdm):
    with pytest.raises(nrfx.NrfxError, match=r"nrfx\[progress\]"):
        resolve_kind("tqdm")
    with pytest.raises(nrfx.NrfxError, match="pip install rich"):
        Progress("rich", 3)


def test_progress_true_uses_tqdm_when_installed():
    pytest.importorskip("tqdm")
    assert resolve_kind("auto") == "tqdm"


def test_text_progress_by_name_and_unknown_kind(capsys):
    nr = NeuralRejuvenation(_cnn(), _sgd, example_inputs=EXAMPLE, interval=1, progress="text")
    _steps(nr, 1)
    assert "nrfx step 1: r=" in capsys.readouterr().err
    with pytest.raises(DriverError, match="'text'"):
        NeuralRejuvenation(_cnn(), _sgd, example_inputs=EXAMPLE, progress="bar")
