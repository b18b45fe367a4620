"""nrfx.integrations.transformers: Neural Rejuvenation inside a Hugging Face Trainer, in place, with resume.

A tiny BERT classifier (2 layers, width 32) given liveliness gates by ``nrfx.add_gates`` (its MLP
and pooler spaces have no norm scale), half of the first MLP's gate killed so that r(θ) (0.94) falls
below a high target (0.95) at the first check: the callback rejuvenates the gated model in place mid-run, training
goes on with the Trainer's own optimizer, and a checkpoint written afterwards resumes into a fresh
instance (``trainer.train(resume_from_checkpoint=...)``) with the resized shapes and the driver's progress.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from torch import nn

import nrfx

transformers = pytest.importorskip("transformers")
from nrfx.integrations._common import PROGRESS_FILE  # noqa: E402
from nrfx.integrations.transformers import NeuralRejuvenationCallback  # noqa: E402

pytestmark = [pytest.mark.third_party, pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::nrfx.NrfxWarning")]

IDS = torch.zeros(2, 8, dtype=torch.long)
SETTINGS = dict(example_inputs=(), example_kwargs={"input_ids": IDS}, module="net", target=0.95, lam=1e-2,
                delta_lambda=0.0, align=1, seed=0, every_n_steps=2)
FIRST_GATE = "bert.encoder.layer.0.intermediate.dense_gate"


class Classifier(nn.Module):
    """A gated tiny BERT (``net``) and its loss: the Trainer reads ``loss`` from the output dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=100, num_labels=2)
        bert = transformers.BertForSequenceClassification(config)
        self.net = nrfx.add_gates(bert, (), example_kwargs={"input_ids": IDS})
        with torch.no_grad():
            self.net.get_submodule(FIRST_GATE).weight[:32] = 0
        self.losses: list[float] = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(input_ids=input_ids).logits
        loss = nn.functional.cross_entropy(logits, labels)
        self.losses.append(loss.item())
        return {"loss": loss, "logits": logits}


class Data(torch.utils.data.Dataset):
    """32 random token sequences of length 8 with random binary labels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(0, 100, (32, 8), generator=g), torch.randint(0, 2, (32,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def trainer(model: nn.Module, callback, out, max_steps: int) -> transformers.Trainer:
    """A CPU Trainer, quiet, a checkpoint every 4 steps under ``out``."""
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-2, seed=0,
        save_strategy="steps", save_steps=4, logging_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[callback])


def shapes(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor's shape and its module type: the architecture."""
    types_ = {name: type(m).__name__ for name, m in module.named_modules()}
    return {k: (tuple(v.shape), types_.get(k.rpartition(".")[0], "")) for k, v in module.state_dict().items()}


def assert_optimizer_holds_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """The optimizer holds exactly the model's parameters, and its Adam moments are shaped like them."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} and len(held) == len(list(model.parameters()))
    state = optimizer.state
    moments = [(p, state[p]["exp_avg"]) for p in model.parameters() if "exp_avg" in state.get(p, {})]
    assert moments and all(m.shape == p.shape for p, m in moments)


def test_rejuvenates_mid_run_then_resumes_into_a_fresh_model(tmp_path):
    model, callback = Classifier(), NeuralRejuvenationCallback(**SETTINGS)
    before = shapes(model)
    run = trainer(model, callback, tmp_path, 6)
    run.train()

    assert [(r["step"], r["event"]) for r in callback.history] == [(2, "rejuvenate"), (4, "check"), (6, "check")]
    optimizer = callback.nr.optimizer
    assert run.optimizer.optimizer is optimizer and callback.nr.module is model.net  # the Trainer's own objects
    assert shapes(model) != before and model.net.get_submodule(FIRST_GATE).weight.shape != (64,)
    assert len(model.losses) == 6 and all(map(math.isfinite, model.losses))
    assert_optimizer_holds_model(optimizer, model)
    logged = [entry for entry in run.state.log_history if "nrfx/r" in entry]
    assert [(e["step"], e["nrfx/rounds"]) for e in logged] == [(2, 1.0), (4, 1.0), (6, 1.0)]
    checkpoint = tmp_path / "checkpoint-4"
    assert json.loads((checkpoint / PROGRESS_FILE).read_text())["rounds"] == 1

    fresh, resumed = Classifier(), NeuralRejuvenationCallback(**SETTINGS)
    again = trainer(fresh, resumed, tmp_path, 8)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert shapes(fresh) == shapes(model)
    assert resumed.nr.rounds == 1 and [r["step"] for r in resumed.history] == [2, 4, 6, 8]
    assert len(fresh.losses) == 4 and all(map(math.isfinite, fresh.losses))
    assert_optimizer_holds_model(resumed.nr.optimizer, fresh)


def test_more_than_one_process_is_refused_at_init_with_the_way_out():
    callback = NeuralRejuvenationCallback(**SETTINGS)
    args = types.SimpleNamespace(world_size=2)
    with pytest.raises(nrfx.DriverError, match=r"single-process.*ddp_wrapper"):
        callback.on_init_end(args, None, None, model=nn.Linear(2, 2))


def build_resnet() -> nn.Module:
    """A tiny HF ResNet (a PreTrainedModel with BatchNorms), half of every norm dead."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=2)
    model = transformers.ResNetForImageClassification(config)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight[: norm.num_features // 2] = 0
    return model


class Pictures(torch.utils.data.Dataset):
    """16 random 16×16 images with binary labels: 4 steps an epoch at batch size 4."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 2)}


def resnet_trainer(model: nn.Module, callback, out, max_steps: int, **options) -> transformers.Trainer:
    """A CPU Trainer saving the PreTrainedModel (save_pretrained) at epoch ends: after the callback's epoch-end check
    (a step-based save of the same step comes before ``on_epoch_end``)."""
    options = {"save_strategy": "epoch", **options}
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **options)
    return transformers.Trainer(model=model, args=args, train_dataset=Pictures(), callbacks=[callback])


def test_a_pretrained_model_checks_at_epoch_ends_and_saves_its_plans(tmp_path):
    import safetensors.torch

    settings = dict(example_inputs=torch.zeros(1, 3, 16, 16), target=0.9, lam=1e-2, delta_lambda=0.0, align=1, seed=0)
    model, callback = build_resnet(), NeuralRejuvenationCallback(**settings)
    resnet_trainer(model, callback, tmp_path / "run", 8).train()
    assert [(r["step"], r["event"]) for r in callback.history] == [(4, "rejuvenate"), (8, "check")]
    saved = safetensors.torch.load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert "nrfx_plans" in saved  # save_pretrained keeps the plans
    reloaded = build_resnet()
    nrfx.load_rejuvenated(reloaded, saved)
    assert shapes(reloaded) == shapes(model)

    elsewhere = tmp_path / "copied"  # a checkpoint folder outside output_dir, without the progress file
    (tmp_path / "run" / "checkpoint-4").rename(elsewhere)
    (elsewhere / PROGRESS_FILE).unlink()
    fresh, resumed = build_resnet(), NeuralRejuvenationCallback(**settings)
    with pytest.warns(nrfx.NrfxWarning, match="start afresh"):
        resnet_trainer(fresh, resumed, tmp_path / "run", 6).train(resume_from_checkpoint=str(elsewhere))
    assert shapes(fresh) == shapes(model) and resumed.nr.rounds == 0


def test_mixed_precision_rejuvenates_through_the_autocast_accelerate_wraps_forward_in(tmp_path):
    """bf16=True: accelerate wraps the model's forward in torch.autocast; export puts that whole forward in one
    autocast region, which nrfx analyses through (it was one frozen node: no norm to monitor)."""
    settings = dict(example_inputs=torch.zeros(2, 3, 16, 16), target=0.9, lam=1e-2, delta_lambda=0.0, align=1, seed=0)
    model, callback = build_resnet(), NeuralRejuvenationCallback(**settings)
    before = shapes(model)
    run = resnet_trainer(model, callback, tmp_path, 8, bf16=True, save_strategy="no")
    run.train()
    assert [(r["step"], r["event"]) for r in callback.history] == [(4, "rejuvenate"), (8, "check")]
    assert shapes(model) != before and "forward" in vars(model)  # resized, still under accelerate's wrapper
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 16, 16)).logits.dtype == torch.float32  # its output cast back


def test_torch_compile_recompiles_after_the_round_and_trains_as_eager(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer compiles the model it trains; the in-place round changes
    shapes under it, dynamo compiles again, and the logged losses are the eager run's."""
    settings = dict(example_inputs=torch.zeros(2, 3, 16, 16), target=0.9, lam=1e-2, delta_lambda=0.0, align=1, seed=0,
                    every_n_steps=2, scheme="ca")  # S/R layers: new parameters and classes under the compiled model
    losses, graphs = {}, {}
    for compiled, target in ((False, 0.9), (True, 0.9), (True, 0.01)):  # target 0.01: no round
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model, callback = build_resnet(), NeuralRejuvenationCallback(**{**settings, "target": target})
        before = shapes(model)
        options = dict(torch_compile=True, torch_compile_backend="eager") if compiled else {}
        run = resnet_trainer(model, callback, tmp_path / f"{compiled}{target}", 6, save_strategy="no", logging_steps=1,
                             **options)
        run.train()
        assert callback.nr.rounds == (target > 0.5) and (shapes(model) != before) == (target > 0.5)
        losses[compiled, target] = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
        graphs[compiled, target] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs[True, 0.9] > graphs[True, 0.01] > 0  # the round made dynamo compile the new shapes
    assert len(losses[True, 0.9]) == 6
    torch.testing.assert_close(torch.tensor(losses[True, 0.9]), torch.tensor(losses[False, 0.9]), rtol=1e-5, atol=1e-6)
