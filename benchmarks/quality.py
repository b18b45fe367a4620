"""Quality on Fashion-MNIST: test error of a small VGG-BN with and without Neural Rejuvenation.

Every method trains the same model family for the same number of SGD steps on the same data
order (per seed), with one cosine learning-rate schedule over all steps; only what the method
does to the network differs:

* ``baseline``: plain SGD.  ``baseline-half``: the same VGG with every width scaled so it has
  at most half the parameters, plain SGD.
* ``nr``, ``nr-cr``, ``nr-ca``: the nrfx driver (Algorithm 1, adaptive λ), one rejuvenation back
  to the initial parameter count, scheme nr / cr / ca (paper Table 1).
* ``nr-x3``: up to three rejuvenations (paper Table 5).
* ``nr-half``: budget 0.5·c(A), target 0.25 (paper Table 4: NR as compression).
* ``slim-half``: Network Slimming: L1 on γ with a fixed λ, at ``slim_at`` of the steps one global
  γ threshold prunes the network to at most 0.5·c(A) parameters, then plain fine-tuning.

A validation split (``val_size`` images, a fixed draw from the 60k training images) is held out
and never trained on; every choice of setting was made on it.  The test split is read only
when ``eval_test`` is on.

    python -m benchmarks.quality [--quick] [--methods nr slim-half] [--seeds 0 1 2] [--set steps=1600 gamma0=none]
    python -m benchmarks.quality --ablation      # ABLATION: NR's settings one at a time, validation split only
    python -m benchmarks.quality ... --resume    # keep the finished (method, seed) runs of the results file

Every finished (method, seed) run prints one line and is written to the results file at once
(atomically, ``"partial": true`` until the last one): a run stopped halfway keeps what it
finished, and ``--resume`` trains only what is missing (it refuses a file made with other settings).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nrfx

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist_vgg.py"
log_line = functools.partial(print, flush=True)  # progress lines reach a log file at once
SPLIT_SEED = 20190615  # the fixed draw of the validation split


@functools.cache
def example() -> Any:
    """The Fashion-MNIST example module (data loading and the VGG-BN builder live there)."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_vgg", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- settings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """Everything shared by the methods: data, model, optimisation, and the NR / slimming knobs."""

    data: str = "/usr/share/datasets/fashion-mnist"
    config: tuple = (16, 16, "M", 32, 32, "M", 64, 64, "M")
    steps: int = 800
    batch: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    train_limit: int | None = None  # training images after the validation split is taken out
    val_size: int = 5000
    test_limit: int | None = None
    eval_test: bool = True
    target: float = 0.5  # T_r for the full-budget NR methods
    interval: int = 10  # Δt (steps)
    delta_r: float = 0.01
    delta_lambda: float = 1e-3
    gamma0: float | str | None = "match"  # γ of rejuvenated channels (None: the layer's initial 1; "match": below)
    rescale: bool = False
    slim_lambda: float = 1e-4  # Network Slimming's fixed λ (its paper's value for VGG)
    slim_at: float = 0.5  # fraction of the steps trained with the L1 term before pruning
    slim_restart: bool = True  # fine-tuning gets its own cosine schedule (Network Slimming fine-tunes afresh)

    def replace(self, **changes: Any) -> Setup:
        """A copy with fields changed (values given as strings are converted to the field's type)."""
        return dataclasses.replace(self, **{k: _convert(self, k, v) for k, v in changes.items()})


def _convert(setup: Setup, key: str, value: Any) -> Any:
    """``value`` for ``setup.key``: strings (from --set key=value) become None, bool, tuple, int, float or stay."""
    if key not in {f.name for f in dataclasses.fields(setup)}:
        raise SystemExit(f"unknown setting {key!r}; settings: {', '.join(f.name for f in dataclasses.fields(setup))}")
    if not isinstance(value, str):
        return value
    current = getattr(setup, key)
    if value.lower() == "none":
        return None
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, tuple):
        return tuple(int(v) if v.isdigit() else v for v in value.split(","))
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True)
class Method:
    """One row of the quality table: how the network is trained."""

    kind: str  # "plain" | "nr" | "slim"
    label: str
    scheme: str = "nr"
    rounds: int | None = 1
    budget: float = 1.0  # fraction of the initial c(A) in parameters
    target: float | None = None  # None: Setup.target
    size: float = 1.0  # plain only: widths narrowed to at most this fraction of c(A) in parameters


METHODS: dict[str, Method] = {
    "baseline": Method("plain", "baseline"),
    "nr": Method("nr", "NR"),
    "nr-cr": Method("nr", "NR-CR", scheme="cr"),
    "nr-ca": Method("nr", "NR-CA", scheme="ca"),
    "nr-x3": Method("nr", "NR, up to 3 rounds", rounds=3),
    "nr-half": Method("nr", "NR @ ½ params", budget=0.5, target=0.25),
    "slim-half": Method("slim", "Slimming @ ½ params", budget=0.5),
    "baseline-half": Method("plain", "baseline, ½ params (narrower)", size=0.5),
}


# -- data --------------------------------------------------------------------------------------------
@functools.cache
def load_data(root: str, val_size: int, train_limit: int | None, test_limit: int | None) -> dict[str, Any]:
    """Train / validation / test tensors; the validation split is a fixed draw from the training set."""
    ex = example()
    images, labels = ex.load(root, "train", None)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    val, train = order[:val_size], order[val_size:]
    train = train[:train_limit] if train_limit else train
    test_x, test_y = ex.load(root, "test", test_limit)
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": (test_x, test_y)}


def batches(seed: int, n: int, batch: int, steps: int) -> Iterator[torch.Tensor]:
    """``steps`` index batches from reshuffled epochs; the order depends on the seed only."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    order, position = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if position + batch > n:
            order, position = torch.randperm(n, generator=gen), 0
        yield order[position:position + batch]
        position += batch


@torch.no_grad()
def error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 error in percent, in eval mode (the model's mode is restored)."""
    return 100.0 * (1.0 - example().accuracy(model, images, labels, batch))


# -- models --------------------------------------------------------------------------------------------
def params_of(config: tuple) -> int:
    """Parameters of the VGG-BN of this config."""
    return sum(p.numel() for p in example().vgg_bn(config).parameters())


def narrower(config: tuple, fraction: float) -> tuple:
    """The config with widths scaled by the largest m such that its parameters are at most ``fraction``·c(A)."""
    limit = fraction * params_of(config)

    def scaled(m: float) -> tuple:
        return tuple(v if v == "M" else max(1, round(v * m)) for v in config)

    low, high = 0.0, 1.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if params_of(scaled(mid)) <= limit else (low, mid)
    return scaled(low)


def optimizer_factory(setup: Setup):
    """SGD with momentum and weight decay, built from the parameters it is given."""
    return lambda params: torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum,
                                          weight_decay=setup.weight_decay)


def cosine(steps: int, offset: int = 0):
    """A per-step cosine schedule from the base LR to 0 over ``steps`` steps, entered at step ``offset``."""
    def factor(t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(t + offset, steps) / max(1, steps)))

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


EXAMPLE_INPUT = torch.zeros(2, 1, 28, 28)


# -- the three kinds of training ---------------------------------------------------------------------
class Plain:
    """Plain SGD with a cosine schedule over all steps."""

    def __init__(self, model: nn.Module, method: Method, setup: Setup, seed: int) -> None:
        self.model = model
        self.optimizer = optimizer_factory(setup)(model.parameters())
        self.scheduler = cosine(setup.steps)(self.optimizer)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, step, schedule."""
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def summary(self) -> dict[str, Any]:
        """Nothing beyond the common figures."""
        return {}


class Rejuvenating:
    """The nrfx driver: adaptive λ, rejuvenation below the target, up to ``method.rounds`` times."""

    def __init__(self, model: nn.Module, method: Method, setup: Setup, seed: int, probe=None) -> None:
        self.setup = setup
        self.nr = nrfx.NeuralRejuvenation(
            model, optimizer_factory(setup), example_inputs=EXAMPLE_INPUT,
            budget=nrfx.Budget.fraction(method.budget, "params"), target=method.target or setup.target,
            interval=setup.interval, delta_r=setup.delta_r, delta_lambda=setup.delta_lambda, scheme=method.scheme,
            rescale=setup.rescale, max_rounds=method.rounds, seed=seed, scheduler_factory=cosine(setup.steps),
            align=1)  # the paper's exact allocation (the recorded results predate align)
        self.rounds, self.probe, self.jumps = 0, probe, []

    @property
    def model(self) -> nn.Module:
        """The driver's current model."""
        return self.nr.model

    def step(self, loss: torch.Tensor) -> None:
        """Backward, the driver's step (penalty, optimizer, check), schedule."""
        checking = self.probe is not None and (self.nr.steps + 1) % self.setup.interval == 0
        before = copy.deepcopy(self.nr.module) if checking and not self.nr.finished else None
        self.nr.optimizer.zero_grad()
        loss.backward()
        self.nr.step()
        self.nr.scheduler.step()
        if self.nr.rounds != self.rounds:
            self.rounds = self.nr.rounds
            if self.setup.gamma0 is not None:
                set_new_gamma(self.nr.module, self.setup.gamma0)
            if before is not None:
                self.jumps.append({"step": self.nr.steps, "val_error_before": self.probe(before),
                                   "val_error_after": self.probe(self.nr.module)})

    def summary(self) -> dict[str, Any]:
        """Rounds, every rejuvenation, and the r/λ history."""
        events = [{k: h[k] for k in ("step", "r", "lam_before", "r_after", "cost_before", "cost", "widths")}
                  for h in self.nr.history if h["event"] == "rejuvenate"]
        history = [[h["step"], round(h["r"], 4), h.get("lam_before", h["lam"])] for h in self.nr.history]
        for event, jump in zip(events, self.jumps, strict=False):
            event.update(jump)
        return {"rounds": self.nr.rounds, "rejuvenations": events, "history": history}


def set_new_gamma(module: nn.Module, gamma0: float | str) -> None:
    """Set γ of every rejuvenated norm channel (slots the param map marks -1) to ``gamma0``.

    ``gamma0="match"``: per norm, the median |γ| of its surviving channels (R starts at the
    scale the penalty left S at, instead of the layer's initial 1).
    """
    with torch.no_grad():
        for name, pmap in module.nrfx_param_map.items():
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if not (name.endswith("weight") and isinstance(owner, nn.modules.batchnorm._NormBase) and pmap.dims):
                continue
            param, new = module.get_parameter(name), pmap.dims[0].source < 0
            if not new.any():
                continue
            value = param[~new].abs().median() if gamma0 == "match" and (~new).any() else float(gamma0)
            param[new] = value


class Slimming:
    """Network Slimming: L1 on γ (fixed λ), one global threshold down to the budget, fine-tune."""

    def __init__(self, model: nn.Module, method: Method, setup: Setup, seed: int) -> None:
        self.model, self.setup, self.method = model, setup, method
        self.prune_at = round(setup.slim_at * setup.steps)
        self.optimizer = optimizer_factory(setup)(model.parameters())
        self.scheduler = cosine(self.prune_at if setup.slim_restart else setup.steps)(self.optimizer)
        self.steps, self.pruned = 0, None

    def step(self, loss: torch.Tensor) -> None:
        """Backward (+ λ·sign(γ) before pruning), step, schedule; prune at ``prune_at``."""
        self.optimizer.zero_grad()
        loss.backward()
        if self.pruned is None:
            with torch.no_grad():
                for m in self.model.modules():
                    if isinstance(m, nn.BatchNorm2d) and m.weight.grad is not None:
                        m.weight.grad.add_(torch.sign(m.weight), alpha=self.setup.slim_lambda)
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        if self.steps == self.prune_at:
            self._prune()

    def _prune(self) -> None:
        """Prune with one global γ threshold to the budget; a fresh optimizer (and schedule) for fine-tuning."""
        limit = int(self.method.budget * sum(p.numel() for p in self.model.parameters()))
        masks, threshold = global_threshold_masks(self.model, limit)
        live = nrfx.analyze(self.model, EXAMPLE_INPUT).utilization(masks).live_params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nrfx.NrfxWarning)
            self.model = nrfx.rejuvenate(self.model, masks, nrfx.Budget(params=live), example_inputs=EXAMPLE_INPUT,
                                         align=1)
        self.model.train()
        remaining = self.setup.steps - self.prune_at
        lr = self.setup.lr if self.setup.slim_restart else self.scheduler.get_last_lr()[0]
        self.optimizer = optimizer_factory(self.setup)(self.model.parameters())
        self.scheduler = (cosine(remaining) if self.setup.slim_restart else
                          cosine(self.setup.steps, self.prune_at))(self.optimizer)
        self.pruned = {"step": self.steps, "threshold": threshold, "lr_at_prune": lr,
                       "widths": list(self.model.nrfx_plan.new_widths)}

    def summary(self) -> dict[str, Any]:
        """Where and how the network was pruned."""
        return {"pruned": self.pruned}


def global_threshold_masks(model: nn.Module, limit: int) -> tuple[dict[str, torch.Tensor], float]:
    """Masks from one |γ| threshold over every BatchNorm: the most channels alive with at most ``limit`` params.

    Each layer keeps at least its strongest channel.  Bisection over how many of the weakest
    channels are pruned (the live cost only falls as more are pruned).
    """
    analysis = nrfx.analyze(model, EXAMPLE_INPUT)
    norms = {n: m.weight.detach().abs() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    values = torch.sort(torch.cat(list(norms.values()))).values

    def masks_at(k: int) -> dict[str, torch.Tensor]:
        t = values[k - 1] if k > 0 else -1.0
        return {n: (g > t) | (g == g.max()) for n, g in norms.items()}

    low, high = 0, len(values)
    while low < high:
        mid = (low + high) // 2
        if analysis.utilization(masks_at(mid)).live_params <= limit:
            high = mid
        else:
            low = mid + 1
    return masks_at(low), float(values[low - 1]) if low > 0 else 0.0


RUNNERS = {"plain": Plain, "nr": Rejuvenating, "slim": Slimming}


# -- one run -------------------------------------------------------------------------------------------------
def train(name: str, seed: int, setup: Setup) -> dict[str, Any]:
    """Train one method with one seed; errors (%), final size, and the method's own record."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", nrfx.UnknownOpWarning)
    method = METHODS[name]
    data = load_data(setup.data, setup.val_size, setup.train_limit, setup.test_limit)
    torch.manual_seed(seed)
    config = setup.config if method.size == 1.0 else narrower(setup.config, method.size)
    probe_x, probe_y = (t[:2000] for t in data["val"])
    probe = functools.partial(_probe, images=probe_x, labels=probe_y)
    runner = RUNNERS[method.kind](example().vgg_bn(config), method, setup, seed,
                                  **({"probe": probe} if method.kind == "nr" else {}))
    images, labels = data["train"]
    criterion, losses, start = nn.CrossEntropyLoss(), [], time.perf_counter()
    for index in batches(seed, len(images), setup.batch, setup.steps):
        loss = criterion(runner.model(images[index]), labels[index])
        runner.step(loss)
        losses.append(loss.item())
    model = runner.model
    record = {"method": name, "seed": seed, "steps": setup.steps,
              "epochs": round(setup.steps * setup.batch / len(images), 2), "val_error": error(model, *data["val"]),
              "test_error": error(model, *data["test"]) if setup.eval_test else None,
              "params": sum(p.numel() for p in model.parameters()),
              "macs": nrfx.analyze(model, EXAMPLE_INPUT).macs, "train_loss_last_100": statistics.fmean(losses[-100:]),
              "loss_curve": [round(statistics.fmean(losses[i:i + 20]), 4) for i in range(0, len(losses), 20)],
              "seconds": round(time.perf_counter() - start, 1)}
    return record | runner.summary()


def _probe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Eval-mode error (%) on a slice of the validation split: the function just before / after a rejuvenation."""
    return round(error(model, images, labels), 2)


def _train_job(job: tuple[str, int, Setup, str]) -> dict[str, Any]:
    """One job of ``run_jobs``: (method, seed, setup, variant label)."""
    name, seed, setup, variant = job
    return train(name, seed, setup) | {"variant": variant}


def run_jobs(jobs: list[tuple[str, int, Setup, str]], workers: int = 2, log=log_line,
             done=None) -> list[dict[str, Any]]:
    """Every (method, seed, setup, variant), ``workers`` processes at a time (one thread each); in job order.

    Each run is logged, and handed to ``done(record)`` (e.g. to save it), as soon as it finishes.
    When a job raises, the jobs not yet started are cancelled, those running are still collected
    (and handed to ``done``), then the error is raised.
    """
    count = {"finished": 0}

    def finished(record: dict[str, Any]) -> dict[str, Any]:
        count["finished"] += 1
        _logged(log, record, f"[{count['finished']}/{len(jobs)}]")
        if done is not None:
            done(record)
        return record

    if workers <= 1:
        return [finished(_train_job(job)) for job in jobs]
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    failure: BaseException | None = None
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_train_job, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                record = future.result()
            except Exception as exc:
                _, seed, _, variant = jobs[futures[future]]
                log(f"  {variant} seed {seed} failed: {type(exc).__name__}: {exc}")
                if failure is None:
                    failure = exc
                    for other in futures:
                        other.cancel()
                continue
            records[futures[future]] = finished(record)
    if failure is not None:
        raise failure
    return [r for r in records if r is not None]


def _logged(log, record: dict[str, Any], count: str = "") -> dict[str, Any]:
    """Log one finished run: steps (epochs), errors, size, time."""
    test = f" test {record['test_error']:.2f}%" if record["test_error"] is not None else ""
    steps = f"{record['steps']} steps ({record['epochs']:g} epochs)  " if "steps" in record else ""
    log(f"  {count} {record['variant']:24} seed {record['seed']}: {steps}val {record['val_error']:.2f}%{test}  "
        f"params {record['params']:,}  rounds {record.get('rounds', '-')}  {record['seconds']:.0f}s")
    return record


# -- results files that keep what finished ------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it over ``path``.

    A process killed mid-write leaves the previous file whole, never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_previous(path: Path, setup: dict[str, Any], resume: bool, log=log_line) -> dict[str, Any] | None:
    """The results file to resume from, or None (no ``--resume``, or no file yet).

    Refuses (SystemExit) a file made with other settings rather than mixing runs of two setups
    in one table, and a file that is not JSON.
    """
    if not resume:
        return None
    if not path.is_file():
        log(f"--resume: no {path} yet: starting afresh")
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--resume: {path} is not valid JSON ({exc}): move it away and start afresh") from None
    ours, theirs = json.loads(json.dumps(setup)), data.get("setup", {})
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        changes = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differ)
        raise SystemExit(f"--resume: {path} was made with other settings ({changes}); not mixing them: run "
                         "without --resume (starts afresh, overwrites it) or with another --out")
    return data


def _resumable(path: Path, setup: dict[str, Any], jobs: list[tuple[str, int, Setup, str]], resume: bool,
               log) -> tuple[list[dict[str, Any]], list[tuple[str, int, Setup, str]], float]:
    """The runs kept from the file, the jobs still to do, and the wall seconds already spent."""
    previous = load_previous(path, setup, resume, log)
    if previous is None:
        return [], jobs, 0.0
    kept = list(previous.get("runs", []))
    finished = {(r.get("variant", r.get("method")), r["seed"]) for r in kept}
    todo = [job for job in jobs if (job[3], job[1]) not in finished]
    log(f"--resume: {len(jobs) - len(todo)} of {len(jobs)} runs already in {path}; {len(todo)} to train")
    return kept, todo, float(previous.get("wall_seconds", 0.0))


def _in_order(records: list[dict[str, Any]], jobs: list[tuple[str, int, Setup, str]]) -> list[dict[str, Any]]:
    """The records in job order; records of the file that this run did not ask for come last."""
    order = {(job[3], job[1]): i for i, job in enumerate(jobs)}
    return sorted(records, key=lambda r: order.get((r.get("variant", r.get("method")), r["seed"]), len(order)))


# -- tables -----------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(records: list[dict[str, Any]], keys: list[str], field: str = "method",
              label=lambda key: METHODS[key].label) -> dict[str, dict[str, Any]]:
    """Per key (method or variant): mean ± std of errors, params, MACs, rounds, and the first rejuvenation."""
    table = {}
    for key in keys:
        rows = [r for r in records if r[field] == key]
        if not rows:
            continue
        entry = {"label": label(key), "seeds": [r["seed"] for r in rows],
                 "val_error": mean_std([r["val_error"] for r in rows]),
                 "params": mean_std([r["params"] for r in rows]), "macs": mean_std([r["macs"] for r in rows]),
                 "rounds": mean_std([r.get("rounds", 0) for r in rows]),
                 "seconds": mean_std([r["seconds"] for r in rows])}
        if all(r["test_error"] is not None for r in rows):
            entry["test_error"] = mean_std([r["test_error"] for r in rows])
        firsts = [r["rejuvenations"][0] for r in rows if r.get("rejuvenations")]
        if firsts:
            entry["first_rejuvenation"] = {k: mean_std([f[k] for f in firsts]) for k in
                                           ("step", "lam_before", "val_error_before", "val_error_after") if
                                           all(f.get(k) is not None for f in firsts)}
        table[key] = entry
    return table


def markdown(table: dict[str, dict[str, Any]], c_params: int) -> str:
    """The quality table in markdown (errors in %, mean ± std over seeds)."""
    lines = ["| method | test error % | val error % | params (× c(A)) | MACs | rounds | 1st rejuvenation: step, λ |"
             " s/run |", "|---|---|---|---|---|---|---|---|"]
    for entry in table.values():
        test = _pm(entry["test_error"]) if "test_error" in entry else "—"
        lines.append(f"| {entry['label']} | {test} | {_pm(entry['val_error'])} | "
                     f"{entry['params']['mean']:,.0f} ({entry['params']['mean'] / c_params:.2f}) | "
                     f"{entry['macs']['mean'] / 1e6:.2f} M | {entry['rounds']['mean']:.1f} | {_first(entry)} | "
                     f"{entry['seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def ablation_markdown(table: dict[str, dict[str, Any]]) -> str:
    """The ablation table: validation error, and the function just before and after the first rejuvenation."""
    base = table.get("baseline", {}).get("val_error", {}).get("mean")
    lines = ["| variant | val error % | vs baseline | rounds | 1st rejuvenation: step, λ | "
             "val error just before → just after it |", "|---|---|---|---|---|---|"]
    for entry in table.values():
        delta = f"{entry['val_error']['mean'] - base:+.2f}" if base is not None else "—"
        first = entry.get("first_rejuvenation", {})
        jump = (f"{first['val_error_before']['mean']:.1f} → {first['val_error_after']['mean']:.1f}"
                if "val_error_before" in first else "—")
        lines.append(f"| {entry['label']} | {_pm(entry['val_error'])} | {delta} | {entry['rounds']['mean']:.1f} | "
                     f"{_first(entry)} | {jump} |")
    return "\n".join(lines) + "\n"


def _first(entry: dict[str, Any]) -> str:
    """Mean step and λ of the first rejuvenation, or a dash."""
    first = entry.get("first_rejuvenation")
    return f"{first['step']['mean']:.0f}, {first['lam_before']['mean']:.3f}" if first else "—"


def _pm(cell: dict[str, float]) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


# -- plots ---------------------------------------------------------------------------------------------------
def plot(result: dict[str, Any], folder: Path) -> list[str]:
    """Error bars per method and the r(θ)/λ history of the rejuvenating runs (seed 0); [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    written = [_plot_errors(plt, result, folder / "quality_errors.png")]
    histories = {r["method"]: r["history"] for r in result["runs"] if r.get("history") and r["seed"] == 0}
    if histories:
        written.append(_plot_histories(plt, histories, result, folder / "quality_history.png"))
    return written


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install -e '.[bench]')", file=sys.stderr)
        return None
    return plt


def _plot_errors(plt, result: dict[str, Any], path: Path) -> str:
    """Mean test error (validation when no test) with ± std bars, one bar per method."""
    table = result["table"]
    key = "test_error" if all("test_error" in e for e in table.values()) else "val_error"
    labels = [e["label"] for e in table.values()]
    means = [e[key]["mean"] for e in table.values()]
    stds = [e[key]["std"] for e in table.values()]
    fig, axis = plt.subplots(figsize=(8, 4))
    colors = ["tab:gray" if n.startswith("baseline") else "tab:green" if n.startswith("slim") else "tab:blue"
              for n in table]
    axis.bar(range(len(means)), means, yerr=stds, color=colors, capsize=4)
    axis.set_xticks(range(len(means)), labels, rotation=25, ha="right")
    axis.set_ylabel(f"{key.replace('_', ' ')} (%)")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    axis.set_ylim(max(0.0, math.floor(low) - 1), max(m + s for m, s in zip(means, stds, strict=True)) + 0.5)
    axis.set_title(f"Fashion-MNIST, VGG-BN, {result['setup']['steps']} steps, mean ± std over "
                   f"{len(result['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_histories(plt, histories: dict[str, list], result: dict[str, Any], path: Path) -> str:
    """r(θ) and λ over steps for each rejuvenating method (seed 0), rejuvenations marked (paper Fig. 1)."""
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    for name, history in histories.items():
        steps = [h[0] for h in history]
        line = top.plot(steps, [h[1] for h in history], label=METHODS[name].label)[0]
        bottom.plot(steps, [h[2] for h in history], color=line.get_color())
        for run in result["runs"]:
            if run["method"] == name and run["seed"] == 0:
                for event in run["rejuvenations"]:
                    top.axvline(event["step"], color=line.get_color(), alpha=0.3, linestyle=":")
    top.set_ylabel("utilization r(θ)")
    bottom.set_ylabel("λ")
    bottom.set_xlabel("step")
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- entry point ---------------------------------------------------------------------------------------------
QUICK = {"steps": 160, "train_limit": 6000, "val_size": 1000, "test_limit": 2000, "batch": 64, "interval": 5,
         "delta_lambda": 6e-3, "target": 0.7}
QUICK_METHODS = ["baseline", "nr", "slim-half"]

# The investigation (validation split only): what in NR's settings moves the error, and why.
ABLATION: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "NR, R γ0 = 1 (nrfx default)": ("nr", {"gamma0": None}),
    "NR, R γ0 = 0.5 (official code)": ("nr", {"gamma0": 0.5}),
    "NR, R γ0 = median S γ (main table)": ("nr", {}),
    "NR-CR, R γ0 = 1": ("nr-cr", {"gamma0": None}),
    "NR-BR (neural rescaling)": ("nr", {"rescale": True}),
    "NR, Δλ = 5e-4 (slower λ)": ("nr", {"delta_lambda": 5e-4}),
    "NR, Δλ = 2e-3 (faster λ)": ("nr", {"delta_lambda": 2e-3}),
    "NR, Δt = 50, Δλ = 5e-3": ("nr", {"interval": 50, "delta_lambda": 5e-3}),
    "NR, T_r = 0.75": ("nr", {"target": 0.75}),
    "baseline, 3× steps": ("baseline", {"steps": 2400}),
    "baseline ½ params, 3× steps": ("baseline-half", {"steps": 2400}),
    "NR, 3× steps, Δλ = 1e-4": ("nr", {"steps": 2400, "delta_lambda": 1e-4}),
}


def missing_data(setup: Setup) -> list[str]:
    """The Fashion-MNIST files not found (empty when the benchmark can run)."""
    return example().missing_files(setup.data)


def _skip(setup: Setup, log) -> bool:
    """True (and a message) when the data is missing."""
    missing = missing_data(setup)
    if missing:
        log(f"quality: Fashion-MNIST not found in {setup.data} (missing {', '.join(missing)}): skipped. "
            "Install it with: sudo apt-get install dataset-fashion-mnist")
    return bool(missing)


def _setup_dict(setup: Setup) -> dict[str, Any]:
    """The setup as JSON data."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(setup).items()}


def run(names: list[str], seeds: list[int], setup: Setup, out: Path, workers: int = 2, log=log_line,
        resume: bool = False) -> dict | None:
    """Train, aggregate, write quality.json / quality.md / plots into ``out``; None when the data is missing.

    quality.json (and .md) is rewritten after every finished run, ``"partial": true`` until the
    last; ``resume``: the runs already in quality.json (same settings) are kept, not retrained.
    """
    if _skip(setup, log):
        return None
    start, path = time.perf_counter(), out / "quality.json"
    jobs = [(name, seed, setup, name) for seed in seeds for name in names]
    records, todo, spent = _resumable(path, _setup_dict(setup), jobs, resume, log)
    c_params = params_of(setup.config)
    c_macs = nrfx.analyze(example().vgg_bn(setup.config), EXAMPLE_INPUT).macs

    def result_of(partial: bool) -> dict[str, Any]:
        runs = _in_order(records, jobs)
        methods = list(dict.fromkeys([*names, *(r["method"] for r in runs)]))
        return {"setup": _setup_dict(setup), "c_params": c_params, "c_macs": c_macs,
                "methods": {n: dataclasses.asdict(METHODS[n]) for n in methods},
                "seeds": sorted({*seeds, *(r["seed"] for r in runs)}), "workers": workers,
                "wall_seconds": round(spent + time.perf_counter() - start, 1), "partial": partial,
                "finished_runs": len(runs), "planned_runs": len(jobs), "table": aggregate(runs, methods),
                "runs": runs}

    def save(record: dict[str, Any] | None = None, partial: bool = True) -> dict[str, Any]:
        if record is not None:
            records.append(record)
        result = result_of(partial)
        write_atomic(path, json.dumps(result, indent=1) + "\n")
        write_atomic(out / "quality.md", markdown(result["table"], c_params))
        return result

    run_jobs(todo, workers, log, done=save)
    result = save(partial=False)
    result["plots"] = plot(result, out)
    return result


def run_ablation(seeds: list[int], setup: Setup, out: Path, workers: int = 2, log=log_line,
                 resume: bool = False) -> dict | None:
    """Every ABLATION variant on the validation split; quality_ablation.json / .md into ``out``.

    Saved after every finished run (``"partial": true`` until the last); ``resume`` keeps the runs already there.
    """
    if _skip(setup, log):
        return None
    start, path = time.perf_counter(), out / "quality_ablation.json"
    setup = setup.replace(eval_test=False)
    jobs = [(name, seed, setup.replace(**changes), label) for seed in seeds
            for label, (name, changes) in ABLATION.items()]
    records, todo, spent = _resumable(path, _setup_dict(setup), jobs, resume, log)

    def save(record: dict[str, Any] | None = None, partial: bool = True) -> dict[str, Any]:
        if record is not None:
            records.append(record)
        runs = _in_order(records, jobs)
        result = {"setup": _setup_dict(setup), "variants": {k: {"method": m, "changes": c} for k, (m, c) in
                                                            ABLATION.items()},
                  "seeds": sorted({*seeds, *(r["seed"] for r in runs)}),
                  "wall_seconds": round(spent + time.perf_counter() - start, 1), "partial": partial,
                  "finished_runs": len(runs), "planned_runs": len(jobs),
                  "table": aggregate(runs, list(ABLATION), "variant", label=lambda key: key), "runs": runs}
        write_atomic(path, json.dumps(result, indent=1) + "\n")
        write_atomic(out / "quality_ablation.md", ablation_markdown(result["table"]))
        return result

    run_jobs(todo, workers, log, done=save)
    return save(partial=False)


def main(argv: list[str] | None = None) -> int:
    """Command line: pick methods, seeds and settings (or the ablation); print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="160 steps on a 6k subset, 1 seed")
    parser.add_argument("--ablation", action="store_true", help="the validation-split investigation instead")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a Setup field")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (method, seed) runs already in the results file; train the rest")
    args = parser.parse_args(argv)
    setup = Setup().replace(**QUICK) if args.quick else Setup()
    setup = setup.replace(**dict(item.split("=", 1) for item in args.set))
    if args.ablation:
        result = run_ablation(args.seeds or [0, 1], setup, Path(args.out), args.workers, resume=args.resume)
        print(ablation_markdown(result["table"]) if result else "", end="")
        return 0
    names = args.methods or (QUICK_METHODS if args.quick else list(METHODS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    result = run(names, seeds, setup, Path(args.out), args.workers, resume=args.resume)
    print(markdown(result["table"], result["c_params"]) if result else "", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
