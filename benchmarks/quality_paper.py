"""The paper's protocol (the official code's CIFAR mode) on Fashion-MNIST: does NR beat plain training?

What the official code does on CIFAR (joe-siyuan-qiao/NeuralRejuvenation-CVPR19, see
the project's notes on the official code), at a scale one CPU thread can run:

* a class-balanced training subset the VGG-BN fits (~99 % train accuracy), random crop (pad 2)
  and horizontal flip, batch 64, SGD lr 0.1 momentum 0.9 wd 1e-4, LR ÷10 at 50 % and 75 % of E
  epochs; BN γ initialised to 0.5, as the official VGG does;
* NR: a *fixed* λ from step 0 (chosen on the validation split, below), r(θ) read at every epoch
  end, one rejuvenation when r ≤ T_r = 0.25, budget = c(A) in (dense) parameters, rejuvenated γ =
  0.5; the epochs before it do not count, so the rejuvenated net gets the full E-epoch schedule
  from LR 0.1 with a fresh optimizer (``restart_schedule=True, carry_state=False``).

Arms, per seed, from the same initial weights and the same data order:

* ``baseline``: E epochs.  ``baseline-matched``: k + E epochs (k = the epochs NR spent before
  its rejuvenation in that seed), the schedule stretched over all of them.
* ``nr-cr``: NR with cross connections removed (the paper's CIFAR choice, Table 4).
  ``nr-cr-2heads``: the same, trained as the official code does: the classifier's S and R column
  blocks are two heads, loss CE(S) + CE(R), prediction their sum (a benchmark-side variant: a
  hook on the classifier; the R head has no bias of its own).  ``nr-ca``: cross attention.
* ``ensemble``: two nets of half the parameters each, E epochs each, prediction = mean logits.
* ``baseline-half``: one of those half-size nets alone: NR-CR's equal in *used* weights (at
  T_r = 0.25 the cr blocks use about half of the dense budget).

The three NR arms share their pre-rejuvenation phase (a driver checkpoint, replayed per scheme).
λ: every value of a small grid trains the pre-rejuvenation phase once (seed ``search_seed``);
among the values that reach r ≤ T_r within ``pre_fraction``·E epochs the one with the lowest
validation error just before the rejuvenation is kept.  The test split is read only at the end.

    python -m benchmarks.quality_paper [--quick] [--device cpu|cuda] [--seeds 0 1 2] [--set epochs=20] [--resume]

Every finished (arm, seed) prints one line (epochs, errors, time) and is written to the results
file at once (atomically, ``"partial": true`` until the last): a run stopped halfway (a time
limit, a lost machine) keeps every finished arm.  ``--resume`` keeps them and trains only the
missing ones, with the λ the file records (it refuses a file made with other settings).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import nrfx
from benchmarks import quality
from nrfx.layers.srlayers import unused_weights

__all__ = ["PaperSetup", "QUICK", "ARMS", "load", "run", "main", "used_cost", "choose_lambda"]

ARMS = {"baseline": "baseline (E epochs)", "baseline-matched": "baseline, k + E epochs (compute-matched)",
        "nr-cr": "NR-CR", "nr-cr-2heads": "NR-CR, two heads (official)", "nr-ca": "NR-CA",
        "ensemble": "ensemble of two ½-size nets", "baseline-half": "baseline, ½ params (narrower), E epochs"}
NR_ARMS = {"nr-cr": ("cr", False), "nr-cr-2heads": ("cr", True), "nr-ca": ("ca", False)}


@dataclass(frozen=True)
class PaperSetup:
    """Data, model, schedule and NR settings of the paper-protocol benchmark."""

    data: str = "/usr/share/datasets/fashion-mnist"
    per_class: int = 100  # training images per class (class-balanced subset of the 55k not held out)
    val_size: int = 2000  # validation images (the fixed draw of benchmarks.quality, first val_size)
    test_limit: int | None = None
    config: tuple = (16, "M", 32, 32, "M", 64, 64, "M")
    epochs: int = 40  # E
    batch: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple = (0.5, 0.75)  # LR ÷10 at these fractions of the schedule
    gamma_init: float = 0.5  # BN γ at initialisation and of rejuvenated channels (official VGG)
    target: float = 0.25  # T_r
    lam: float | None = None  # fixed λ; None: chosen by the search below
    lam_grid: tuple = (1.2e-2, 1.6e-2, 2e-2)
    pre_fraction: float = 0.3  # the search wants r < T_r within this fraction of E
    pre_max: float = 0.5  # the NR arms give up waiting for r ≤ T_r after this fraction of E
    search_seed: int = 100
    pad: int = 2
    synthetic: bool = False  # generated data instead of Fashion-MNIST (the tests, without the dataset)

    def replace(self, **changes: Any) -> PaperSetup:
        """A copy with fields changed (strings from --set converted to the field's type)."""
        return dataclasses.replace(self, **{k: _convert(self, k, v) for k, v in changes.items()})


def _convert(setup: PaperSetup, key: str, value: Any) -> Any:
    """quality's --set conversion, with tuple items that may be floats (lam_grid=1e-3,2e-3)."""
    if isinstance(value, str) and isinstance(getattr(setup, key, None), tuple):
        return tuple(_number(v) for v in value.split(","))
    return quality._convert(setup, key, value)


def _number(text: str) -> int | float | str:
    """An int, a float, or the text (the VGG config's "M")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


QUICK = {"synthetic": True, "per_class": 60, "val_size": 200, "test_limit": 500, "config": (8, "M", 16, "M"),
         "epochs": 4, "batch": 16, "target": 0.5, "lam_grid": (3e-2, 5e-2), "pre_fraction": 0.75, "pre_max": 1.0}


# -- data -------------------------------------------------------------------------------------------------
def load(setup: PaperSetup, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Class-balanced train subset, validation and test tensors on ``device``."""
    if setup.synthetic:
        data = _synthetic(setup)
    else:
        full = quality.load_data(setup.data, 5000, None, setup.test_limit)
        images, labels = full["train"]
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:setup.per_class] for c in range(10)])
        data = {"train": (images[keep], labels[keep]), "val": tuple(t[:setup.val_size] for t in full["val"]),
                "test": full["test"]}
    return {k: (x.to(device), y.to(device)) for k, (x, y) in data.items()}


def _synthetic(setup: PaperSetup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Horizontal stripes whose frequency is the class, random phase, noise (for runs without the dataset)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(28.0).view(1, 1, 28, 1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        frequency = (0.04 + 0.04 * y.float()).view(n, 1, 1, 1)
        phase = 2 * math.pi * torch.rand(n, 1, 1, 1, generator=gen)
        x = torch.cos(2 * math.pi * frequency * rows + phase).expand(n, 1, 28, 28)
        return x + 0.5 * torch.randn(n, 1, 28, 28, generator=gen), y

    return {"train": draw(10 * setup.per_class), "val": draw(setup.val_size), "test": draw(setup.test_limit or 1000)}


def augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop from the zero-padded image (background value) and a random horizontal flip."""
    n, _, h, w = x.shape
    background = -quality.example().MEAN / quality.example().STD
    padded = F.pad(x, (pad,) * 4, value=background)
    dx, dy = (torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist() for _ in range(2))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# -- models and their cost ------------------------------------------------------------------------------------
def build(config: tuple, seed: int, setup: PaperSetup, device: torch.device) -> nn.Module:
    """The example's VGG-BN with BN γ = ``gamma_init``, seeded."""
    torch.manual_seed(seed)
    model = quality.example().vgg_bn(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(setup.gamma_init)
    return model.to(device)


def _used_weights(module: nn.Module) -> int:
    """Weights a conv/linear computes with: a cr S/R layer uses its two diagonal blocks only."""
    weight = module.weight
    if getattr(module, "scheme", None) != "cr":
        return weight.numel()
    per = weight[0, 0].numel()
    out, inp = weight.shape[:2]
    return per * (module.s_out * module.s_in + (out - module.s_out) * (inp - module.s_in))


@torch.no_grad()
def used_cost(models: list[nn.Module], example: torch.Tensor) -> dict[str, int]:
    """Parameters (dense size, used = stored blocks, non-zero) and MACs per example of conv + linear (used blocks)."""
    macs, hooks = [0], []

    def count(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        positions = output[0].numel() // output.shape[1] if output.dim() > 2 else 1
        macs[0] += _used_weights(module) * positions

    stored = used = nonzero = 0
    for model in models:
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        hooks += [m.register_forward_hook(count) for m in layers]
        physical = sum(p.numel() for p in model.parameters())  # cr S/R layers store their diagonal blocks only
        stored += physical + sum(unused_weights(m) for m in layers)  # the dense size, as a budget counts it
        used += physical
        nonzero += sum(int(torch.count_nonzero(p)) for p in model.parameters())
        was = model.training
        model.eval()
        model(example[:1])
        model.train(was)
    for hook in hooks:
        hook.remove()
    return {"params_stored": stored, "params_used": used, "params_nonzero": nonzero, "macs_used": macs[0]}


@torch.no_grad()
def error(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 error (%) of the mean logits of ``models`` in eval mode (modes restored)."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    wrong = 0
    for i in range(0, len(x), batch):
        logits = sum(m(x[i:i + batch]) for m in models)
        wrong += int((logits.argmax(1) != y[i:i + batch]).sum())
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    return 100.0 * wrong / len(x)


# -- training loops ------------------------------------------------------------------------------------------
def epoch(loss_of: Callable, step: Callable, data: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator,
          setup: PaperSetup) -> float:
    """One pass over the shuffled, augmented training subset; mean training loss."""
    x, y = data
    order, losses = torch.randperm(len(x), generator=gen), []
    for i in range(0, len(x), setup.batch):
        index = order[i:i + setup.batch].to(x.device)
        loss = loss_of(augment(x[index], gen, setup.pad), y[index])
        step(loss)
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


def step_schedule(epochs: int, setup: PaperSetup) -> Callable[[torch.optim.Optimizer], Any]:
    """Per-epoch LR ÷10 at ``milestones`` of ``epochs`` (MultiStepLR), as a scheduler factory."""
    marks = sorted({max(1, round(f * epochs)) for f in setup.milestones})
    return lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, marks, gamma=0.1)


def sgd(setup: PaperSetup) -> Callable:
    """The optimizer factory: SGD lr, momentum 0.9, weight decay."""
    return lambda params: torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum,
                                          weight_decay=setup.weight_decay)


def train_plain(model: nn.Module, epochs: int, data: dict, seed: int, setup: PaperSetup) -> list[float]:
    """Plain SGD for ``epochs`` epochs with the step schedule over all of them; per-epoch loss."""
    optimizer = sgd(setup)(model.parameters())
    scheduler = step_schedule(epochs, setup)(optimizer)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    losses = []
    for _ in range(epochs):
        losses.append(epoch(lambda x, y: F.cross_entropy(model(x), y), step, data["train"], gen, setup))
        scheduler.step()
    return losses


def driver(model: nn.Module, scheme: str, lam: float, seed: int, setup: PaperSetup,
           example: torch.Tensor) -> nrfx.NeuralRejuvenation:
    """The official CIFAR mode: fixed λ, epoch-end checks, one round, restart, fresh optimizer."""
    return nrfx.NeuralRejuvenation(
        model, sgd(setup), example_inputs=example, target=setup.target, interval=None, lam=lam,
        delta_lambda=0.0, scheme=scheme, gamma0=setup.gamma_init, max_rounds=1, seed=seed,
        scheduler_factory=step_schedule(setup.epochs, setup), restart_schedule=True, carry_state=False,
        align=1)  # the paper's exact allocation: these nets are 8–32 channels wide


def _driver_step(nr: nrfx.NeuralRejuvenation) -> Callable[[torch.Tensor], None]:
    """Backward and the driver's step (penalty, optimizer)."""
    def step(loss: torch.Tensor) -> None:
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()

    return step


def pre_phase(original: nn.Module, lam: float, limit: int, data: dict, seed: int, setup: PaperSetup,
              example: torch.Tensor) -> dict[str, Any]:
    """Train under the fixed λ at LR 0.1 (no schedule step) until r ≤ T_r at an epoch end, at most ``limit``."""
    nr = driver(copy.deepcopy(original), "cr", lam, seed, setup, example)
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve, losses, k = [nr.utilization()], [], None
    for e in range(1, limit + 1):
        losses.append(epoch(lambda x, y: F.cross_entropy(nr.model(x), y), _driver_step(nr), data["train"], gen,
                            setup))
        curve.append(nr.utilization())
        if curve[-1] < setup.target:
            k = e
            break
    return {"k": k, "r_curve": curve, "losses": losses, "state": copy.deepcopy(nr.state_dict()),
            "gen": gen.get_state(), "val_error_before": error([nr.module], *data["val"]), "lam": lam}


def _head(module: nn.Module) -> tuple[nn.Linear, torch.Tensor]:
    """The classifier (last Linear) and the mask of its rejuvenated (R) input columns."""
    name, head = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)][-1]
    pmap = module.nrfx_param_map.get(f"{name}.weight")
    dims = [d for d in pmap.dims if d.dim == 1] if pmap is not None else []
    rejuvenated = dims[0].source < 0 if dims else torch.zeros(head.in_features, dtype=torch.bool)
    return head, rejuvenated.to(head.weight.device)


def two_head_loss(nr: nrfx.NeuralRejuvenation) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The official CR loss: CE of the S head plus CE of the R head (their sum is the model's output)."""
    head, r_cols = _head(nr.module)
    s_cols, seen = ~r_cols, {}
    head.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("x", inputs[0]))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nr.model(x)
        feats = seen.pop("x")
        s = F.linear(feats[:, s_cols], head.weight[:, s_cols], head.bias)
        r = F.linear(feats[:, r_cols], head.weight[:, r_cols])
        return F.cross_entropy(s, y) + F.cross_entropy(r, y)

    return loss_of


def nr_branch(original: nn.Module, pre: dict, arm: str, data: dict, seed: int, setup: PaperSetup,
              example: torch.Tensor) -> tuple[list[nn.Module], dict[str, Any]]:
    """One scheme from the shared pre-phase checkpoint: rejuvenate at once, then E epochs from LR 0.1."""
    scheme, heads = NR_ARMS[arm]
    nr = driver(copy.deepcopy(original), scheme, pre["lam"], seed, setup, example)
    nr.load_state_dict(copy.deepcopy(pre["state"]))
    record = nr.check()
    gen = torch.Generator()
    gen.set_state(pre["gen"])
    info = {"k": pre["k"], "rounds": nr.rounds, "r_before": record["r"], "r_after": record.get("r_after"),
            "widths": record.get("widths"), "val_error_before": pre["val_error_before"],
            "val_error_after": error([nr.module], *data["val"]), "pre_losses": pre["losses"],
            "r_curve": pre["r_curve"]}
    loss_of = two_head_loss(nr) if heads and nr.rounds else (lambda x, y: F.cross_entropy(nr.model(x), y))
    losses = []
    for _ in range(setup.epochs):
        losses.append(epoch(loss_of, _driver_step(nr), data["train"], gen, setup))
        nr.scheduler.step()
        if not nr.finished:
            nr.check()
    info["losses"], info["rounds"] = losses, nr.rounds
    return [nr.module], info


def choose_lambda(original: nn.Module, data: dict, setup: PaperSetup, example: torch.Tensor,
                  log=print) -> tuple[float, list[dict[str, Any]]]:
    """The grid value reaching r < T_r within pre_fraction·E epochs with the lowest validation error."""
    limit = max(1, round(setup.pre_fraction * setup.epochs))
    tried = []
    for lam in setup.lam_grid:
        pre = pre_phase(original, lam, limit, data, setup.search_seed, setup, example)
        tried.append({"lam": lam, "k": pre["k"], "r_curve": [round(r, 4) for r in pre["r_curve"]],
                      "val_error_before": pre["val_error_before"]})
        log(f"  λ = {lam:g}: k = {pre['k']}, r = {pre['r_curve'][-1]:.3f}, val error {pre['val_error_before']:.2f}%")
    reached = [t for t in tried if t["k"] is not None]
    if not reached:
        raise SystemExit(f"no λ in {setup.lam_grid} reaches r < {setup.target} within {limit} epochs: "
                         "widen lam_grid (--set lam_grid=...)")
    best = min(reached, key=lambda t: (t["val_error_before"], t["lam"]))
    return best["lam"], tried


# -- one seed: every arm ----------------------------------------------------------------------------------
def _record(arm: str, seed: int, models: list[nn.Module], data: dict, example: torch.Tensor, epochs: int,
            start: float, **extra: Any) -> dict[str, Any]:
    """Errors (%), cost and time of one trained arm."""
    return {"arm": arm, "seed": seed, "test_error": error(models, *data["test"]),
            "val_error": error(models, *data["val"]), "train_error": error(models, *data["train"]),
            "epochs": epochs, **used_cost(models, example), "seconds": round(time.perf_counter() - start, 1),
            **extra}


def run_seed(seed: int, lam: float, data: dict, setup: PaperSetup, device: torch.device, log=quality.log_line,
             arms: tuple[str, ...] = tuple(ARMS), done: Callable[[dict[str, Any]], None] | None = None,
             k: int | None = None) -> list[dict[str, Any]]:
    """The chosen arms for one seed: the shared NR pre-phase and its branches, the baselines, the half nets.

    Each arm is logged and handed to ``done(record)`` as soon as it is trained.  ``k`` (the
    pre-phase's epochs, known from a finished NR arm of this seed) spares the pre-phase when no
    NR arm is asked for: baseline-matched needs only k.
    """
    example = torch.zeros(2, 1, 28, 28, device=device)
    original = build(setup.config, seed, setup, device)
    records: list[dict[str, Any]] = []

    def finished(record: dict[str, Any]) -> None:
        records.append(record | {"device": str(device)})
        log(f"    seed {seed} {record['arm']:18} {record['epochs']} epochs  test {record['test_error']:.2f}%  "
            f"val {record['val_error']:.2f}%  train {record['train_error']:.2f}%  "
            f"params used {record['params_used']:,}  {record['seconds']:.0f}s")
        if done is not None:
            done(records[-1])

    pre, pre_seconds = None, None
    if any(a in arms for a in NR_ARMS) or ("baseline-matched" in arms and k is None):
        start = time.perf_counter()
        pre = pre_phase(original, lam, max(1, round(setup.pre_max * setup.epochs)), data, seed, setup, example)
        pre_seconds = round(time.perf_counter() - start, 1)
        k = pre["k"] if pre["k"] is not None else len(pre["losses"])
        log(f"  seed {seed}: r < {setup.target} after k = {pre['k']} epochs ({pre_seconds:.0f}s)")
    for arm in (a for a in NR_ARMS if a in arms):
        start = time.perf_counter()
        models, info = nr_branch(original, pre, arm, data, seed, setup, example)
        finished(_record(arm, seed, models, data, example, k + setup.epochs, start, pre_seconds=pre_seconds,
                         **info))
    for arm in ("baseline", "baseline-matched"):
        if arm in arms:
            epochs = setup.epochs if arm == "baseline" else k + setup.epochs
            start, model = time.perf_counter(), copy.deepcopy(original)
            losses = train_plain(model, epochs, data, seed, setup)
            finished(_record(arm, seed, [model], data, example, epochs, start, losses=losses))
    half = quality.narrower(setup.config, 0.5)
    for arm, count in (("ensemble", 2), ("baseline-half", 1)):
        if arm in arms:
            start, nets = time.perf_counter(), [build(half, seed + 1000 * i, setup, device) for i in range(count)]
            losses = [train_plain(net, setup.epochs, data, seed + 1000 * i, setup) for i, net in enumerate(nets)]
            finished(_record(arm, seed, nets, data, example, setup.epochs, start, losses=losses[0],
                             config=list(half)))
    return records


# -- aggregation ----------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float]:
    """Mean, sample std, min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm: errors, cost, epochs; paired differences (arm − reference, same seed) to both baselines."""
    by = {(r["arm"], r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    table = {}
    for arm in ARMS:
        rows = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rows:
            continue
        entry = {"label": ARMS[arm], "seeds": [r["seed"] for r in rows]}
        for key in ("test_error", "val_error", "train_error", "params_stored", "params_used", "params_nonzero",
                    "macs_used", "epochs", "seconds"):
            entry[key] = _stats([float(r[key]) for r in rows])
        for ref in ("baseline", "baseline-matched"):
            pairs = [(r["test_error"], by[(ref, r["seed"])]["test_error"]) for r in rows if (ref, r["seed"]) in by]
            if pairs and arm != ref:
                entry[f"test_minus_{ref}"] = _stats([a - b for a, b in pairs])
        if arm in NR_ARMS:
            entry["k"] = _stats([float(r["k"] or 0) for r in rows])
            entry["rounds"] = _stats([float(r["rounds"]) for r in rows])
        table[arm] = entry
    return table


def _pm(cell: dict[str, float] | None, digits: int = 2, sign: bool = False) -> str:
    """mean ± std, or a dash."""
    if cell is None:
        return "—"
    return f"{cell['mean']:{'+' if sign else ''}.{digits}f} ± {cell['std']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The table: test error, paired differences, train error, cost (used blocks), epochs."""
    c = result["c_params"]
    lines = ["| arm | test error % | − baseline (paired) | − compute-matched (paired) | train error % | "
             "params used (× c(A)) | params stored | MACs used | epochs | s/run |", "|---" * 10 + "|"]
    for entry in result["table"].values():
        lines.append(
            f"| {entry['label']} | {_pm(entry['test_error'])} | {_pm(entry.get('test_minus_baseline'), sign=True)} | "
            f"{_pm(entry.get('test_minus_baseline-matched'), sign=True)} | {_pm(entry['train_error'])} | "
            f"{entry['params_used']['mean']:,.0f} ({entry['params_used']['mean'] / c:.2f}) | "
            f"{entry['params_stored']['mean']:,.0f} | {entry['macs_used']['mean'] / 1e6:.2f} M | "
            f"{entry['epochs']['mean']:.1f} | {entry['seconds']['mean']:.0f} |")
    lam = result["lambda"]
    how = (f"chosen on the validation split from {[t['lam'] for t in lam['tried']]}" if lam["tried"] else
           "given (--set lam=...)")
    lines += ["", f"λ = {lam['chosen']:g} (fixed from step 0), {how}; seeds {result['seeds']}; "
              "errors mean ± std over seeds; paired differences are per-seed differences "
              "(same initial weights and data order)."]
    return "\n".join(lines) + "\n"


# -- plot, run, command line -------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> str | None:
    """Test error per arm (± std) and r(θ) per epoch before the rejuvenation (search and every seed)."""
    plt = quality._pyplot()
    if plt is None:
        return None
    table = result["table"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    means = [e["test_error"]["mean"] for e in table.values()]
    stds = [e["test_error"]["std"] for e in table.values()]
    colors = ["tab:gray" if a.startswith("baseline") else "tab:green" if a == "ensemble" else "tab:blue"
              for a in table]
    left.bar(range(len(means)), means, yerr=stds, color=colors, capsize=4)
    left.set_xticks(range(len(means)), [e["label"] for e in table.values()], rotation=25, ha="right", fontsize=8)
    left.set_ylabel("test error (%)")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    left.set_ylim(max(0.0, math.floor(low) - 1), max(m + s for m, s in zip(means, stds, strict=True)) + 0.5)
    left.set_title(f"paper protocol, E = {result['setup']['epochs']} epochs, {len(result['seeds'])} seeds",
                   fontsize=9)
    for t in result["lambda"]["tried"]:
        right.plot(t["r_curve"], linestyle="--", label=f"search λ = {t['lam']:g}")
    for r in result["runs"]:
        if r["arm"] == "nr-cr":
            right.plot(r["r_curve"], label=f"seed {r['seed']} (λ = {result['lambda']['chosen']:g})")
    right.axhline(result["setup"]["target"], color="gray", linestyle=":", label="T_r")
    right.set_xlabel("epoch (before the rejuvenation)")
    right.set_ylabel("r(θ), params")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _setup_dict(setup: PaperSetup) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(setup).items()}


def _result(setup: PaperSetup, seeds: list[int], lam: float, tried: list, records: list, device: torch.device,
            start: float, spent: float = 0.0) -> dict[str, Any]:
    """Everything written to quality_paper.json (``spent``: wall seconds of the runs resumed from)."""
    return {"setup": _setup_dict(setup), "device": str(device), "threads": torch.get_num_threads(),
            "seeds": sorted({*seeds, *(r["seed"] for r in records)}),
            "c_params": quality.params_of(setup.config), "lambda": {"chosen": lam, "tried": tried},
            "wall_seconds": round(spent + time.perf_counter() - start, 1), "table": aggregate(records),
            "runs": records}


def _known_k(records: list[dict[str, Any]], seed: int, setup: PaperSetup) -> int | None:
    """The pre-phase's epochs of ``seed`` from a finished NR arm (its epochs are k + E), or None."""
    return next((r["epochs"] - setup.epochs for r in records if r["seed"] == seed and r["arm"] in NR_ARMS), None)


def run(setup: PaperSetup, seeds: list[int], out: Path, device: str = "auto", log=quality.log_line,
        arms: tuple[str, ...] = tuple(ARMS), name: str = "quality_paper", resume: bool = False) -> dict | None:
    """λ search, then the arms per seed; ``name``.json / .md into ``out`` after every arm, the plot at the end.

    ``resume``: the (arm, seed) runs and the λ already in ``name``.json (same settings) are kept.
    """
    if not setup.synthetic and quality.example().missing_files(setup.data):
        log(f"paper: Fashion-MNIST not found in {setup.data}: skipped. "
            "Install it with: sudo apt-get install dataset-fashion-mnist")
        return None
    warnings.simplefilter("ignore", nrfx.UnknownOpWarning)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    path = out / f"{name}.json"
    previous = quality.load_previous(path, _setup_dict(setup), resume, log)
    records: list[dict[str, Any]] = list(previous["runs"]) if previous else []
    spent = float(previous.get("wall_seconds", 0.0)) if previous else 0.0
    if previous and previous.get("device") != str(dev):
        log(f"--resume: {path} was run on {previous.get('device')}, this run is on {dev} (each run records its device)")
    start, data = time.perf_counter(), load(setup, dev)
    example = torch.zeros(2, 1, 28, 28, device=dev)
    if previous and previous.get("lambda"):
        lam, tried = previous["lambda"]["chosen"], previous["lambda"]["tried"]
        log(f"paper: λ = {lam:g} from {path}")
    elif setup.lam is None:
        log(f"paper: choosing λ on the validation split from {setup.lam_grid} ...")
        lam, tried = choose_lambda(build(setup.config, setup.search_seed, setup, dev), data, setup, example, log)
    else:
        lam, tried = setup.lam, []
    planned = [(arm, seed) for seed in seeds for arm in arms]
    finished = {(r["arm"], r["seed"]) for r in records}
    if previous:
        log(f"--resume: {sum(p in finished for p in planned)} of {len(planned)} runs already in {path}")
    log(f"paper: λ = {lam:g}; {len(arms)} arms × {len(seeds)} seeds, E = {setup.epochs} epochs on {dev} ...")

    def save(record: dict[str, Any] | None = None, partial: bool = True) -> dict[str, Any]:
        if record is not None:
            records.append(record)
        result = _result(setup, seeds, lam, tried, records, dev, start, spent)
        result |= {"partial": partial, "finished_runs": sum(p in {(r["arm"], r["seed"]) for r in records}
                                                            for p in planned), "planned_runs": len(planned)}
        quality.write_atomic(path, json.dumps(result, indent=1) + "\n")
        quality.write_atomic(out / f"{name}.md", markdown(result))
        return result

    save()  # λ is on disk before the first arm: a run stopped from here on resumes without the search
    for seed in seeds:
        todo = tuple(arm for arm in arms if (arm, seed) not in finished)
        if todo:
            run_seed(seed, lam, data, setup, dev, log, todo, done=save, k=_known_k(records, seed, setup))
    result = save(partial=False)
    result["plot"] = plot(result, out / f"{name}.png")
    quality.write_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: settings, seeds, device; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run that exercises every arm (tests)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a PaperSetup field")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--name", default="quality_paper", help="file names of the results (NAME.json/.md/.png)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (arm, seed) runs and the λ already in NAME.json; train the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = PaperSetup().replace(**QUICK) if args.quick else PaperSetup()
    setup = setup.replace(**dict(item.split("=", 1) for item in args.set))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    result = run(setup, seeds, Path(args.out), args.device, arms=tuple(args.arms), name=args.name,
                 resume=args.resume)
    print(markdown(result) if result else "", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
