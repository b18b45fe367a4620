"""nrfx.integrations.lightning: Neural Rejuvenation inside a Lightning Trainer, in place, with checkpoint resume.

A small CNN (conv-bn-relu ×2) on synthetic data, half of the first norm's γ killed so that r(θ)
falls below a high target at the first check: the rejuvenation happens mid-run, training goes on
with the same optimizer object, and a checkpoint saved afterwards resumes into a fresh instance.
The same on two gloo processes under ``strategy="ddp"`` (a script run in a subprocess, since
Lightning re-launches the script for rank 1).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import nrfx

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from nrfx.integrations.lightning import NeuralRejuvenationCallback  # noqa: E402
from nrfx.rewrite.rejuvenate import replays_plans  # noqa: E402

pytestmark = [pytest.mark.third_party, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::nrfx.NrfxWarning")]

EXAMPLE = torch.zeros(1, 3, 8, 8)
SETTINGS = dict(example_inputs=EXAMPLE, target=0.9, lam=1e-2, delta_lambda=0.0, align=1, seed=0)


class Net(pl.LightningModule):
    """conv-bn-relu ×2, pool, linear; half of the first norm dead; StepLR per optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
        with torch.no_grad():
            self.net[1].weight[:8] = 0
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        self.opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.9)
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}


def loader() -> torch.utils.data.DataLoader:
    """Four batches of 8 random 8×8 images, 4 classes (the same on every call)."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    data = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(data, batch_size=8)


def trainer(tmp_path, callback, max_steps: int, logger=False, **options) -> pl.Trainer:
    """A one-CPU Trainer, quiet, checkpoints under tmp_path."""
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=[callback],
                      enable_checkpointing=True, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **options)


def shapes(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's shape and its module type: the architecture."""
    types_ = {name: type(m).__name__ for name, m in module.named_modules()}
    return {k: (tuple(v.shape), types_.get(k.rpartition(".")[0], "")) for k, v in module.state_dict().items()}


def assert_optimizer_holds_model(model: Net) -> None:
    """The optimizer holds exactly the model's parameters, and its momentum is shaped like them."""
    held = [p for group in model.opt.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(list(model.parameters()))
    for p in model.parameters():
        buffer = model.opt.state.get(p, {}).get("momentum_buffer")
        assert buffer is None or buffer.shape == p.shape


@pytest.mark.parametrize("module", [None, "net"])
def test_rejuvenates_mid_run_then_resumes_into_a_fresh_module(tmp_path, module):
    options = dict(every_n_steps=3, restart_schedule=True, module=module, **SETTINGS)
    model, callback = Net(), NeuralRejuvenationCallback(**options)
    before = shapes(model)
    fit = trainer(tmp_path, callback, 8, logger=CSVLogger(tmp_path / "logs", name="run"))
    fit.fit(model, loader())

    assert [(r["step"], r["event"]) for r in callback.history] == [(3, "rejuvenate"), (6, "check")]
    assert callback.nr.rounds == 1 and callback.nr.module is (model.net if module else model)
    assert ("net.nrfx_plans" if module else "nrfx_plans") in model.state_dict()
    assert fit.optimizers[0] is model.opt and model.net[1].weight.shape != (16,)  # resized in place
    assert shapes(model) != before and len(model.losses) == 8 and all(map(math.isfinite, model.losses))
    assert_optimizer_holds_model(model)
    assert sum(len(s) for s in model.opt.state.values()) > 0  # momentum carried, not dropped
    assert model.sched.last_epoch < fit.global_step  # restart_schedule: the schedule counts from the rejuvenation
    assert model.opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.9 ** model.sched.last_epoch)
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    assert [float(r["nrfx/rounds"]) for r in rows if r.get("nrfx/r")] == [1.0, 1.0]

    ckpt = tmp_path / "after.ckpt"
    fit.save_checkpoint(ckpt)
    reloaded = Net()
    replays_plans(reloaded.net if module else reloaded)  # the plans sit under the rejuvenated module's prefix
    reloaded.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))),
                           model.eval()(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))))

    fresh, resumed = Net(), NeuralRejuvenationCallback(**options)
    again = trainer(tmp_path, resumed, 12)
    again.fit(fresh, loader(), ckpt_path=ckpt)
    assert shapes(fresh) == shapes(model) and fresh.net[1].weight.shape == model.net[1].weight.shape
    assert resumed.nr.rounds == 1 and [r["step"] for r in resumed.history] == [3, 6, 9, 12]
    assert len(fresh.losses) == 4 and all(map(math.isfinite, fresh.losses))
    assert_optimizer_holds_model(fresh)


def test_checks_at_epoch_ends_by_default(tmp_path):
    model, callback = Net(), NeuralRejuvenationCallback(module="net", **{**SETTINGS, "target": 0.3})
    trainer(tmp_path, callback, 8).fit(model, loader())
    assert callback.nr.module is model.net
    assert [(r["step"], r["event"]) for r in callback.history] == [(4, "check"), (8, "check")]
    assert callback.history[0]["r"] < 1.0 and callback.nr.rounds == 0


def test_checks_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    every_step = NeuralRejuvenationCallback(every_n_steps=1, **{**SETTINGS, "target": 0.3})
    trainer(tmp_path, every_step, 4, accumulate_grad_batches=2).fit(Net(), loader())
    assert [r["step"] for r in every_step.history] == [1, 2, 3, 4]
    both = NeuralRejuvenationCallback(every_n_steps=3, check_on_epoch_end=True, **{**SETTINGS, "target": 0.3})
    trainer(tmp_path, both, 4, accumulate_grad_batches=2).fit(Net(), loader())
    assert [r["step"] for r in both.history] == [2, 3, 4]  # epoch ends at 2 and 4, every 3 steps at 3


def averaging(kind: str) -> pl.Callback:
    """Lightning's weight-averaging callbacks: an EMA from the first step, SWA from the second epoch."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    return EMAWeightAveraging(decay=0.5) if kind == "ema" else StochasticWeightAveraging(swa_lrs=0.01,
                                                                                         swa_epoch_start=1)


def averaged_copy(callback: pl.Callback) -> nn.Module:
    """The copy of the LightningModule an averaging callback keeps."""
    average = callback._average_model
    return average.module if isinstance(average, torch.optim.swa_utils.AveragedModel) else average


@pytest.mark.parametrize("averaging_first", [True, False])
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_weight_averaging_callbacks_get_each_round_and_resume(tmp_path, monkeypatch, kind, averaging_first):
    """Their averaged copy pairs its tensors with the model's one to one (updates, validation swaps): the round
    the model gets is replayed on the copy's own weights, whichever callback comes first."""
    if not hasattr(pl.callbacks, "WeightAveraging"):
        pytest.skip("Lightning before 2.5 has no WeightAveraging")
    from nrfx.integrations._common import Runner

    replays, replay = [], Runner.replay_round

    def spy(runner, copy):
        before = {k: v.clone() for k, v in copy.state_dict().items()}
        replay(runner, copy)
        replays.append((before, {k: v.clone() for k, v in copy.state_dict().items()}, copy.nrfx_param_map))

    monkeypatch.setattr(Runner, "replay_round", spy)

    def run(max_steps, ckpt=None):
        model, nr, average = Net(), NeuralRejuvenationCallback(every_n_steps=2, **SETTINGS), averaging(kind)
        callbacks = [average, nr] if averaging_first else [nr, average]
        fit = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=4, logger=False,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                         val_check_interval=3)
        fit.fit(model, loader(), loader(), ckpt_path=ckpt)
        return fit, model, nr, averaged_copy(average)

    fit, model, nr, copy = run(6)
    assert nr.nr.rounds == 1 and model.net[1].weight.shape != (16,)
    assert shapes(copy) == shapes(model)
    pairs = zip([*model.parameters(), *model.buffers()], [*copy.parameters(), *copy.buffers()], strict=True)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)
    assert copy.state_dict()["nrfx_plans"].numel() > 0  # the copy saves its round too
    ((before, after, maps),) = replays[:1]
    survivors = maps["net.0.weight"].dims[0]  # the first conv's output channels: kept ones carry the copy's values
    kept = survivors.kept
    assert 0 < len(kept) < after["net.0.weight"].shape[0]
    assert torch.equal(after["net.0.weight"][kept], before["net.0.weight"][survivors.source[kept]])
    assert len(model.losses) == 6 and all(map(math.isfinite, model.losses))
    fit.save_checkpoint(tmp_path / "averaged.ckpt")
    _, fresh, resumed, fresh_copy = run(8, tmp_path / "averaged.ckpt")
    assert resumed.nr.rounds == 1 and shapes(fresh) == shapes(model) == shapes(fresh_copy)
    assert len(fresh.losses) == 2 and all(map(math.isfinite, fresh.losses))


@pytest.mark.parametrize("scheme", ["nr", "ca"])
def test_a_compiled_module_recompiles_after_the_round_and_trains_as_eager(tmp_path, scheme):
    """trainer.fit(torch.compile(module)): Lightning compiles the module it trains; the in-place round changes
    parameter shapes and classes under it, dynamo's guards see that and recompile: the losses are the eager run's."""
    losses, graphs = {}, {}
    for compiled, target in ((False, 0.9), (True, 0.9), (True, 0.01)):  # target 0.01: no round
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = Net()
        callback = NeuralRejuvenationCallback(every_n_steps=2, scheme=scheme, **{**SETTINGS, "target": target})
        trainer(tmp_path, callback, 6).fit(torch.compile(model, backend="eager") if compiled else model, loader())
        assert callback.nr.rounds == (target > 0.5) and (model.net[1].weight.shape != (16,)) == (target > 0.5)
        losses[compiled, target] = model.losses
        graphs[compiled, target] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs[True, 0.9] > graphs[True, 0.01] > 0  # the round made dynamo compile the new shapes
    losses = {compiled: losses[compiled, 0.9] for compiled in (False, True)}
    assert len(losses[True]) == 6
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)


DDP_SCRIPT = textwrap.dedent("""
    # Lightning strategy="ddp" re-runs this script as rank 1 (LOCAL_RANK=1); each rank trains on its own data.
    import json, math, os, sys, warnings
    sys.path.insert(0, {tests!r})
    warnings.simplefilter("ignore")
    import torch
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from torch.nn.parallel import DistributedDataParallel
    from test_integrations_lightning import SETTINGS, Net, NeuralRejuvenationCallback, shapes

    class Tracked(Net):
        def __init__(self):
            super().__init__()
            self.wrappers = []

        def training_step(self, batch, batch_idx):
            wrapper = self.trainer.strategy.model
            self.wrappers.append(id(wrapper) if isinstance(wrapper, DistributedDataParallel) else None)
            return super().training_step(batch, batch_idx)

    def run(max_steps, ckpt=None):
        rank = int(os.environ.get("LOCAL_RANK", 0))
        g = torch.Generator().manual_seed(rank)
        images, labels = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        data = torch.utils.data.TensorDataset(images, labels)
        model, callback = Tracked(), NeuralRejuvenationCallback(every_n_steps=3, **SETTINGS)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                             callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=".", use_distributed_sampler=False)
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt)
        return trainer, model, callback

    digest = lambda model: float(sum(p.double().sum() for p in model.parameters()))
    trainer, model, callback = run(8)
    trainer.save_checkpoint("ddp.ckpt")
    _, fresh, resumed = run(12, "ddp.ckpt")
    json.dump({{"events": [(r["step"], r["event"]) for r in callback.history], "digest": digest(model),
               "width": model.net[1].weight.numel(), "wrappers": model.wrappers,
               "finite": all(map(math.isfinite, model.losses + fresh.losses)),
               "resumed": [r["step"] for r in resumed.history], "same_shapes": shapes(fresh) == shapes(model),
               "digest_resumed": digest(fresh)}}, open(f"rank{{trainer.global_rank}}.json", "w"))
""")


def test_ddp_on_two_gloo_processes_rejuvenates_identically_and_resumes(tmp_path):
    """strategy="ddp": rank 0 plans, rank 1 replays, the callback re-wraps the module; ranks stay identical."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["events"] == [[3, "rejuvenate"], [6, "check"]] and rank["width"] != 16 and rank["finite"]
        wrappers = rank["wrappers"]  # one DDP wrapper before the rejuvenation after step 3, a new one after it
        assert None not in wrappers and len(set(wrappers[:3])) == len(set(wrappers[3:])) == 1
        assert wrappers[0] != wrappers[3]
        assert rank["resumed"] == [3, 6, 9, 12] and rank["same_shapes"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # different data per rank: only synchronised grads keep this
    assert ranks[0]["digest_resumed"] == ranks[1]["digest_resumed"]


def test_unsupported_multi_process_strategies_are_refused_at_setup_with_the_way_out():
    callback = NeuralRejuvenationCallback(**SETTINGS)
    spawned = types.SimpleNamespace(world_size=2, strategy=types.SimpleNamespace())
    with pytest.raises(nrfx.DriverError, match=r'strategy="ddp".*ddp_wrapper'):
        callback.setup(spawned, Net(), "fit")


def test_bad_settings_fail_at_construction_or_setup():
    with pytest.raises(nrfx.DriverError, match="every_n_steps"):
        NeuralRejuvenationCallback(every_n_steps=0, **SETTINGS)
    with pytest.raises(nrfx.DriverError, match="never be checked"):
        NeuralRejuvenationCallback(check_on_epoch_end=False, **SETTINGS)
    with pytest.raises(nrfx.DriverError, match="target"):
        NeuralRejuvenationCallback(**{**SETTINGS, "target": 1.5})
    one = types.SimpleNamespace(world_size=1, strategy=None)
    with pytest.raises(nrfx.DriverError, match=r"children are \['net'\]"):
        NeuralRejuvenationCallback(module="body", **SETTINGS).setup(one, Net(), "fit")
