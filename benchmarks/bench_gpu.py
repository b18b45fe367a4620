"""GPU speed of rewritten models: original / pruned / nr / cr / ca, as ratios to the original, in one process.

    PYTHONPATH=src:. python3 -m benchmarks.bench_gpu [--out benchmarks/results/gpu.json] [--max-seconds 200]
    python -m benchmarks.bench_gpu --device cpu --quick          # a smoke run on the CPU (tiny sizes)

Imports only torch, nrfx and the standard library, so that it runs on a bare GPU machine from a
fresh copy of the repository: the models come from torchvision where it is installed and from
``benchmarks.torch_models`` (the same models in plain torch) where it is not; ``meta.models`` says which.

Models: ResNet-50, MobileNet-V3-Large and ViT-B/16 with ``nrfx.add_gates`` (its MLP hidden
spaces have no norm).  40 % dead: γ of a random 40 % of every BatchNorm's channels (of every
gate's, for the ViT) is zeroed, each norm drawn with its own seeded generator.  Variants, all
built by ``nrfx.rejuvenate`` from that model with the example at the benchmark's image size:

* ``original``: the model with its dead channels (eager torchvision / the gated GraphModule).
* ``pruned``: dead channels removed, nothing regrown: a rejuvenation to budget U(θ) in MACs
  (``Budget(macs=analysis.live_macs)``; ``realloc=False`` would keep every width).
* ``nr``, ``cr``, ``ca``: rejuvenated to c(A) in MACs (``Budget.fraction(1.0, "macs")``) with that scheme.
* ``nr_keep``, ``cr_keep``, ``ca_keep``: the same with ``residual="keep"`` (the paper's ResNet setting: the
  residual streams keep every channel and their width), for models that have residual streams (ResNet-50
  only with ``--quick``).

Measured on every variant, interleaved (alternating order per round), CUDA-event timed, median:
inference (``eval()``, ``torch.inference_mode()``) and one training step (``train()``, SGD
momentum, cross-entropy on random labels, forward + backward + step), each in fp32 and in bf16
(``torch.autocast(dtype=torch.bfloat16)`` with model and input in ``channels_last``).  Batch 64,
224².  Also: the driver's overhead on ResNet-18 (``nr.step()`` against ``optimizer.step()``, λ > 0
so the L1 term is applied every step, no check or rejuvenation in the timed window), and the
rewrite pause (wall time of the ``nrfx.rejuvenate`` call, analysis included, per scheme, ResNet-50
on the device).  Targets (ResNet-50, bf16 + channels_last, 40 % dead), time / the original's:
inference pruned ≤ 0.75, nr ≤ 1.10, cr ≤ 1.00, ca ≤ 1.30; training step nr ≤ 1.10, cr ≤ 1.00,
ca ≤ 1.40; driver ≤ 1.02.  The JSON is rewritten after every section (a run stopped by a time
limit keeps what it measured); ``--max-seconds`` shortens the cells that come late and skips what
would not fit.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import nrfx
from benchmarks import torch_models

try:
    import torchvision.models as model_zoo
except Exception:  # torch alone (or a torchvision built for another torch): the models rebuilt in plain torch
    model_zoo = None

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("nr", "cr", "ca")
KEPT = tuple(f"{scheme}_keep" for scheme in SCHEMES)  # residual="keep": streams whole (models with streams only)
VARIANTS = ("original", "pruned", *SCHEMES, *KEPT)
DEAD = 0.4
TARGET_MODEL, TARGET_PRECISION = "resnet50", "bf16"
TARGETS: dict[str, dict[str, float]] = {  # time / the original's, ResNet-50, bf16 + channels_last, 40 % dead
    "inference": {"pruned": 0.75, "nr": 1.10, "cr": 1.00, "ca": 1.30},
    "train": {"nr": 1.10, "cr": 1.00, "ca": 1.40},
    "driver": {"driver": 1.02},
}
MODES = ("inference", "train")


@dataclass(frozen=True)
class Settings:
    """Sizes, repeats and the time budget."""

    device: str = "cuda"
    quick: bool = False
    batch: int = 64
    size: int = 224
    iters: int = 20  # timed iterations per variant and cell (the target cells always get them all)
    min_iters: int = 6
    warmup: int = 5
    rounds: int = 4  # interleaved rounds; the order of the variants alternates between rounds
    cell_seconds: float = 1.5  # other cells: fewer iterations when one variant would take longer than this
    max_seconds: float = 200.0  # the measuring (the issue: all of it under 4 minutes, start-up included)
    models: tuple[str, ...] = ("resnet50", "mobilenet_v3_large", "vit_b_16")
    precisions: tuple[str, ...] = ("fp32", "bf16")
    driver: bool = True
    seed: int = 0
    lr: float = 1e-3


QUICK = {"batch": 2, "size": 32, "iters": 4, "min_iters": 2, "warmup": 2, "rounds": 2, "cell_seconds": 0.3,
         "max_seconds": 600.0}  # a smoke run: every path once, figures not representative


def _log(text: str) -> None:
    print(text, flush=True)


# -- models ----------------------------------------------------------------------------------------------------
def model_label(name: str, s: Settings) -> str:
    """What the model key stands for (the quick ViT is a tiny one)."""
    if name == "vit_b_16":
        return ("ViT (tiny: 2 layers, hidden 64, patch 16) + nrfx gates" if s.quick
                else "ViT-B/16 + nrfx gates (MLP hidden spaces)")
    return {"resnet50": "ResNet-50", "mobilenet_v3_large": "MobileNet-V3-Large"}.get(name, name)


def models_source() -> str:
    """Where the models come from: torchvision (with its version), or its rebuild in plain torch."""
    if model_zoo is None:
        return "benchmarks.torch_models (torchvision is not installed, or does not import)"
    import torchvision

    return f"torchvision {torchvision.__version__}"


def build(name: str, s: Settings) -> nn.Module:
    """A fresh model with random weights (nothing downloaded): torchvision's, or the same one in plain torch."""
    zoo = model_zoo if model_zoo is not None else torch_models
    if name == "vit_b_16":
        if s.quick:
            return zoo.VisionTransformer(image_size=s.size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                         mlp_dim=128)
        return zoo.vit_b_16(weights=None, image_size=s.size)
    return getattr(zoo, name)(weights=None)


def kill(model: nn.Module, fraction: float, seed: int) -> int:
    """Zero γ of a random ``fraction`` of the channels of every BatchNorm and nrfx Gate; how many norms."""
    norms = [m for m in model.modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, nrfx.Gate)) and getattr(m, "weight", None) is not None]
    with torch.no_grad():
        for i, norm in enumerate(norms):
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            n = norm.weight.numel()
            dead = torch.randperm(n, generator=gen)[:round(fraction * n)]
            norm.weight.view(-1)[dead.to(norm.weight.device)] = 0
    return len(norms)


def widths_multiple_of(model: nn.Module, k: int = 8) -> dict[str, float | None]:
    """Share of conv output widths (and of linear output widths) that are multiples of ``k``."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    linears = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return {kind: (sum(w % k == 0 for w in ws) / len(ws) if ws else None)
            for kind, ws in (("conv", convs), ("linear", linears))}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def prepare(name: str, s: Settings, dev: torch.device) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The variants of one model on ``dev`` and what they are (MACs, params, widths, the rewrite pause)."""
    torch.manual_seed(s.seed)
    model = build(name, s).to(dev).eval()
    x1 = torch.randn(1, 3, s.size, s.size, device=dev)
    info: dict[str, Any] = {"label": model_label(name, s), "input": [s.batch, 3, s.size, s.size]}
    if name == "vit_b_16":
        model = nrfx.add_gates(model, x1)
        info["gates"] = len(model.nrfx_gates)
    info["norms_killed"] = kill(model, DEAD, s.seed)
    start = time.perf_counter()
    analysis = nrfx.analyze(model, x1)
    info["analyze_s"] = round(time.perf_counter() - start, 4)
    u = analysis.utilization()
    info |= {"c_params": u.params, "c_macs": u.macs, "live_macs": u.live_macs, "r_macs": round(u.r_macs, 4),
             "r_params": round(u.r_params, 4)}
    variants: dict[str, nn.Module] = {"original": model}
    entries: dict[str, dict[str, Any]] = {"original": {"params": u.params, "macs": u.macs,
                                                        "widths_multiple_of_8": widths_multiple_of(model)}}
    pause: dict[str, float] = {}
    builds: dict[str, Callable[[], nn.Module]] = {
        "pruned": lambda: nrfx.rejuvenate(model, None, nrfx.Budget(macs=u.live_macs), example_inputs=x1,
                                          scheme="nr"),
        **{scheme: (lambda sc=scheme: nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"),
                                                      example_inputs=x1, scheme=sc)) for scheme in SCHEMES}}
    if any(space.summed and not space.is_frozen for space in analysis.spaces) and (name == TARGET_MODEL or
                                                                                   not s.quick):
        builds |= {f"{scheme}_keep": (lambda sc=scheme: nrfx.rejuvenate(
            model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x1, scheme=sc, residual="keep"))
            for scheme in SCHEMES}
    for variant, make in builds.items():
        try:
            _sync(dev)
            start = time.perf_counter()
            new = make()
            _sync(dev)
            seconds = time.perf_counter() - start
        except Exception as exc:  # a broken variant is recorded, the others are still measured
            entries[variant] = {"error": _error(exc)}
            _log(f"  {name}: building {variant} failed: {_error(exc)}")
            continue
        plan = new.nrfx_plan
        pause[variant] = round(seconds, 4)
        entries[variant] = {"params": sum(p.numel() for p in new.parameters()), "macs": plan.cost_after,
                            "macs_over_original": round(plan.cost_after / u.macs, 4), "grown": sum(plan.grow),
                            "alpha": plan.alpha, "align": getattr(plan, "align", None),
                            "widths_multiple_of_8": widths_multiple_of(new),
                            "sr_layers": sum(1 for m in new.modules() if getattr(m, "scheme", None) in ("cr", "ca"))}
        variants[variant] = new.eval()
    info["variants"] = entries
    info["rewrite_pause_s"] = pause  # nrfx.rejuvenate, analysis included, on the device
    return variants, info


# -- timing ---------------------------------------------------------------------------------------------------
class Clock:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _timed_block(fn: Callable[[], Any], n: int, dev: torch.device) -> list[float]:
    """Seconds of each of ``n`` calls: CUDA events on a GPU (launch gaps included), perf_counter on the CPU."""
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(fns: dict[str, Callable[[], Any]], dev: torch.device, s: Settings, clock: Clock,
            priority: bool) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Warm up every variant, then interleaved rounds of timed calls; median seconds per variant, and errors."""
    errors: dict[str, str] = {}
    estimate: dict[str, float] = {}
    for name, fn in list(fns.items()):
        try:
            for _ in range(s.warmup):
                fn()
            _sync(dev)
            estimate[name] = min(_timed_block(fn, 1, dev))
        except Exception as exc:  # one failing variant must not stop the others
            errors[name] = _error(exc)
            _log(f"    {name} failed: {errors[name]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    live = {k: v for k, v in fns.items() if k not in errors}
    if not live:
        return {}, errors
    per_call = statistics.fmean(estimate.values())
    iters = s.iters if priority else max(s.min_iters, min(s.iters, int(s.cell_seconds / max(per_call, 1e-9))))
    if clock.left() < 45 and not priority:
        iters = s.min_iters
    per_round = max(1, math.ceil(iters / s.rounds))
    times: dict[str, list[float]] = {k: [] for k in live}
    names = list(live)
    for r in range(s.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name] += _timed_block(live[name], per_round, dev)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "n": len(v)} for k, v in times.items()}, errors


def _autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def inference_fn(model: nn.Module, x: torch.Tensor, dev: torch.device, precision: str) -> Callable[[], Any]:
    """One inference call: eval mode, inference_mode, autocast for bf16."""
    def call() -> None:
        with torch.inference_mode(), _autocast(dev, precision):
            model(x)

    return call


def train_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device, precision: str,
             lr: float) -> Callable[[], Any]:
    """One training step: forward (autocast for bf16), cross-entropy, backward, SGD momentum step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dev, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return call


def _ratios(cell: dict[str, dict[str, float]], reference: str) -> dict[str, float]:
    base = cell.get(reference, {}).get("median_s")
    return {k: round(v["median_s"] / base, 4) for k, v in cell.items()} if base else {}


def _verdicts(model: str, precision: str, mode: str, ratios: dict[str, float]) -> list[dict[str, Any]]:
    """The targets this cell is judged by (ResNet-50, bf16 only)."""
    if model != TARGET_MODEL or precision != TARGET_PRECISION:
        return []
    return [{"what": f"{model} {precision} {mode} {variant}", "ratio": ratios.get(variant), "target": target,
             "met": ratios.get(variant) is not None and ratios[variant] <= target}
            for variant, target in TARGETS[mode].items()]


def _line(model: str, precision: str, mode: str, cell: dict, ratios: dict, errors: dict) -> str:
    """A progress line: the original's time and every variant's ratio."""
    base = cell.get("original", {}).get("median_s")
    parts = [f"{model:19} {precision:4} {mode:9} original {base * 1e3:8.2f} ms" if base else
             f"{model:19} {precision:4} {mode:9} original      —"]
    for variant in VARIANTS[1:]:
        if variant in ratios:
            target = TARGETS.get(mode, {}).get(variant) if (model, precision) == (TARGET_MODEL,
                                                                                 TARGET_PRECISION) else None
            mark = "" if target is None else (" ok" if ratios[variant] <= target else f" >{target:.2f}")
            parts.append(f"{variant} {ratios[variant]:.3f}×{mark}")
        elif variant in errors:
            parts.append(f"{variant} failed")
    return " | ".join(parts)


def bench_model(name: str, s: Settings, dev: torch.device, clock: Clock, result: dict[str, Any],
                save: Callable[[], None]) -> None:
    """Build the variants of one model and time every cell; results go into ``result["models"][name]``."""
    _log(f"{name}: building the variants ...")
    variants, info = prepare(name, s, dev)
    pause = ", ".join(f"{k} {v:.2f}s" for k, v in info["rewrite_pause_s"].items())
    _log(f"  r(θ) in MACs {info['r_macs']:.3f}; rejuvenate (analysis included): {pause}")
    entry = result["models"][name] = info | {"inference": {}, "train": {}, "errors": {}}
    save()
    torch.manual_seed(s.seed)
    x = torch.randn(s.batch, 3, s.size, s.size, device=dev)
    with torch.no_grad():
        classes = variants["original"](x[:1]).shape[-1]
    y = torch.randint(0, classes, (s.batch,), device=dev)
    priority = name == TARGET_MODEL
    for precision in s.precisions:
        if precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
            for model in variants.values():
                model.to(memory_format=torch.channels_last)
        for mode in MODES:
            if clock.left() < 10:
                entry["errors"][f"{precision}/{mode}"] = "skipped: out of time (--max-seconds)"
                continue
            for model in variants.values():
                model.train(mode == "train")
            fns = {k: (inference_fn(m, x, dev, precision) if mode == "inference" else
                       train_fn(m, x, y, dev, precision, s.lr)) for k, m in variants.items()}
            cell, errors = measure(fns, dev, s, clock, priority and precision == TARGET_PRECISION)
            ratios = _ratios(cell, "original")
            entry[mode][precision] = {"seconds": cell, "ratio_to_original": ratios}
            entry["errors"] |= {f"{precision}/{mode}/{k}": v for k, v in errors.items()}
            result["targets"] += _verdicts(name, precision, mode, ratios)
            _log("  " + _line(name, precision, mode, cell, ratios, errors))
            save()
            del fns
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def bench_driver(s: Settings, dev: torch.device, clock: Clock, result: dict[str, Any]) -> None:
    """ResNet-18: a plain training loop against the same loop with ``nr.step()``; per precision."""
    torch.manual_seed(s.seed)
    plain_model = build("resnet18", s).to(dev)
    nr_model = copy.deepcopy(plain_model)
    x = torch.randn(s.batch, 3, s.size, s.size, device=dev)
    y = torch.randint(0, 1000, (s.batch,), device=dev)
    factory = lambda params: torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    plain_opt = factory(plain_model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nr = nrfx.NeuralRejuvenation(nr_model, factory, example_inputs=x[:1], target=1e-6, interval=10**9,
                                     lam=1e-4, delta_lambda=0.0, seed=s.seed)
    entry: dict[str, Any] = {"model": "resnet18", "input": [s.batch, 3, s.size, s.size], "lam": nr.lam,
                             "interval": nr.interval, "precisions": {}}
    result["driver"] = entry

    def stepper(model: nn.Module, optimizer: Callable[[], torch.optim.Optimizer], step: Callable[[], Any],
                precision: str) -> Callable[[], None]:
        def call() -> None:
            optimizer().zero_grad(set_to_none=True)
            with _autocast(dev, precision):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            step()

        return call

    for precision in s.precisions:
        if clock.left() < 10:
            entry["precisions"][precision] = {"error": "skipped: out of time (--max-seconds)"}
            continue
        if precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
            plain_model.to(memory_format=torch.channels_last)
            nr.module.to(memory_format=torch.channels_last)
        fns = {"plain": stepper(plain_model, lambda: plain_opt, plain_opt.step, precision),
               "driver": stepper(nr.model, lambda: nr.optimizer, nr.step, precision)}
        cell, errors = measure(fns, dev, s, clock, priority=precision == TARGET_PRECISION)
        checks = []
        for _ in range(5):
            _sync(dev)
            start = time.perf_counter()
            nr.check()
            _sync(dev)
            checks.append(time.perf_counter() - start)
        check_s = statistics.median(checks)
        ratio = cell["driver"]["median_s"] / cell["plain"]["median_s"] if len(cell) == 2 else None
        at_100 = ((cell["driver"]["median_s"] + check_s / 100) / cell["plain"]["median_s"]) if ratio else None
        entry["precisions"][precision] = {"seconds": cell, "ratio": ratio, "check_s": check_s,
                                          "ratio_with_a_check_every_100_steps": at_100, "errors": errors}
        if precision == TARGET_PRECISION:
            target = TARGETS["driver"]["driver"]
            result["targets"].append({"what": f"resnet18 {precision} driver step", "ratio": ratio, "target": target,
                                      "met": ratio is not None and ratio <= target})
        plain_ms = cell.get("plain", {}).get("median_s", float("nan")) * 1e3
        _log(f"  driver {precision:4}: plain step {plain_ms:.2f} ms, nr.step() loop "
             f"{ratio if ratio is not None else float('nan'):.3f}×, a check {check_s * 1e3:.2f} ms")
    entry["rounds"] = nr.rounds  # 0: nothing was rejuvenated in the timed window


# -- the run ----------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device | None:
    """cuda for "auto" when there is one; None when cuda is asked for (or auto) and absent."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return None
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _meta(s: Settings, dev: torch.device, command: str) -> dict[str, Any]:
    meta = {"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": str(dev),
            "device_name": device_name(dev), "torch": torch.__version__, "models": models_source(),
            "nrfx": nrfx.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if dev.type == "cuda":
        meta |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "cudnn_benchmark": torch.backends.cudnn.benchmark,
                 "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                 "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return meta


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file, then os.replace): a run killed mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run(s: Settings, out: Path, command: str = "python -m benchmarks.bench_gpu") -> dict[str, Any]:
    """Every section in order (ResNet-50 first: the targets), the JSON rewritten after each."""
    dev = torch.device(s.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock = Clock(s.max_seconds)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # on a few shared cores, oversubscribed threads make small models 100× slower
    result: dict[str, Any] = {"meta": _meta(s, dev, command), "settings": dataclasses.asdict(s),
                              "dead_fraction": DEAD, "targets_definition": TARGETS,
                              "targets_apply_to": f"{TARGET_MODEL}, {TARGET_PRECISION} + channels_last",
                              "models": {}, "driver": None, "targets": [], "skipped": [], "failed": [],
                              "partial": True}

    def save() -> None:
        result["seconds"] = round(clock.elapsed(), 1)
        write_json(out, result)

    _log(f"bench_gpu on {result['meta']['device_name']} (torch {torch.__version__}); batch {s.batch}, "
         f"{s.size}², budget {s.max_seconds:.0f} s")
    sections: list[tuple[str, Callable[[], None]]] = []
    if TARGET_MODEL in s.models:
        sections.append((TARGET_MODEL, lambda: bench_model(TARGET_MODEL, s, dev, clock, result, save)))
    if s.driver:
        sections.append(("driver", lambda: bench_driver(s, dev, clock, result)))
    sections += [(m, (lambda m=m: bench_model(m, s, dev, clock, result, save))) for m in s.models if m != TARGET_MODEL]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # UnknownOpWarning and friends: the rewrite notes are in the plans
            _sections(sections, dev, clock, s, result, save)
    finally:
        torch.set_num_threads(threads)
    result["failed"] += [f"{name} {what}: {why}" for name, entry in result["models"].items()
                         for what, why in entry.get("errors", {}).items() if not why.startswith("skipped")]
    result["failed"] += [f"{name} {variant}: {v['error']}" for name, entry in result["models"].items()
                         for variant, v in entry.get("variants", {}).items() if "error" in v]
    result["partial"] = False
    result["all_targets_met"] = bool(result["targets"]) and all(t["met"] for t in result["targets"])
    save()
    _log(markdown(result))
    _log(f"wrote {out} ({clock.elapsed():.0f} s)")
    return result


def _sections(sections: list[tuple[str, Callable[[], None]]], dev: torch.device, clock: Clock, s: Settings,
              result: dict[str, Any], save: Callable[[], None]) -> None:
    """Run each section unless time is short; a section that raises is recorded and the next one runs."""
    for label, section in sections:
        if clock.left() < 20:
            result["skipped"].append(f"{label}: out of time (--max-seconds {s.max_seconds:.0f})")
            _log(f"{label}: skipped, out of time")
            continue
        try:
            section()
        except Exception as exc:  # a section that breaks is recorded; the next one still runs
            result["failed"].append(f"{label}: {_error(exc)}")
            _log(f"{label} failed: {_error(exc)}\n{traceback.format_exc(limit=6)}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()


# -- the table --------------------------------------------------------------------------------------------------
def markdown(data: dict[str, Any]) -> str:
    """Time of every variant / the original's, per model, precision and mode; the driver; the pause; targets."""
    meta = data["meta"]
    lines = [f"{meta['device_name']}, torch {meta['torch']}, {data['meta']['date']}; input "
             f"{data['settings']['batch']}×3×{data['settings']['size']}², {data['dead_fraction']:.0%} dead; "
             "time / the original's time (median, interleaved)" + (" — PARTIAL run" if data.get("partial") else ""),
             "", "| model | precision | mode | original ms | " + " | ".join(VARIANTS[1:]) + " |",
             "|---" * (3 + len(VARIANTS)) + "|"]
    for name, entry in data["models"].items():
        for mode in MODES:
            for precision, cell in entry.get(mode, {}).items():
                base = cell["seconds"].get("original", {}).get("median_s")
                ratios = cell["ratio_to_original"]
                targets = TARGETS.get(mode, {}) if (name, precision) == (TARGET_MODEL, TARGET_PRECISION) else {}
                cells = []
                for variant in VARIANTS[1:]:
                    value = ratios.get(variant)
                    text = f"{value:.2f}" if value is not None else "failed" if variant in entry["variants"] else "—"
                    if variant in targets and value is not None:
                        text += f" (≤ {targets[variant]:.2f} {'met' if value <= targets[variant] else 'MISSED'})"
                    cells.append(text)
                prec = "bf16 + channels_last" if precision == "bf16" else precision
                lines.append(f"| {name} | {prec} | {mode} | {base * 1e3:.1f} | " if base else
                             f"| {name} | {prec} | {mode} | — | ")
                lines[-1] += " | ".join(cells) + " |"
    driver = data.get("driver")
    if driver:
        lines += ["", "| driver (ResNet-18, training step) | plain ms | nr.step() loop / plain | + a check every 100 "
                  "steps | one check ms |", "|---|---|---|---|---|"]
        for precision, cell in driver["precisions"].items():
            if cell.get("ratio") is None:
                lines.append(f"| {precision} | — | {cell.get('error', 'failed')} | | |")
                continue
            lines.append(f"| {precision} | {cell['seconds']['plain']['median_s'] * 1e3:.1f} | {cell['ratio']:.3f} | "
                         f"{cell['ratio_with_a_check_every_100_steps']:.3f} | {cell['check_s'] * 1e3:.1f} |")
    pauses = {name: e["rewrite_pause_s"] for name, e in data["models"].items() if e.get("rewrite_pause_s")}
    if pauses:
        lines += ["", "| rewrite pause (nrfx.rejuvenate, analysis included) s | " + " | ".join(VARIANTS[1:]) + " |",
                  "|---" * len(VARIANTS) + "|"]
        for name, p in pauses.items():
            lines.append(f"| {name} | " + " | ".join(f"{p[k]:.2f}" if k in p else "—" for k in VARIANTS[1:]) + " |")
    if data["targets"]:
        met = sum(t["met"] for t in data["targets"])
        lines += ["", f"Targets met: {met} of {len(data['targets'])}: " + "; ".join(
            f"{t['what']} {t['ratio']:.2f} ≤ {t['target']:.2f}" + ("" if t["met"] else " MISSED")
            if t["ratio"] is not None else f"{t['what']}: not measured" for t in data["targets"])]
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(data["skipped"])]
    if data.get("failed"):
        lines += ["", "Failed: " + "; ".join(data["failed"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line; exits 0 with a message when there is no CUDA device and none was forced."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one, else skip), cuda, cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (batch 2, 64², a tiny ViT, few repeats)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/gpu.json (gpu_cpu.json on the CPU)")
    parser.add_argument("--models", nargs="+", choices=list(Settings.models), default=None)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per variant and cell")
    parser.add_argument("--max-seconds", type=float, default=None, help="time budget of the whole run")
    parser.add_argument("--no-driver", action="store_true", help="skip the driver-overhead section")
    args = parser.parse_args(argv)
    dev = resolve_device(args.device)
    if dev is None:
        _log("bench_gpu: no CUDA device here: skipped (a smoke run on the CPU: --device cpu --quick)")
        return 0 if args.device == "auto" else 2
    s = Settings(device=str(dev), quick=args.quick)
    changes: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.models:
        changes["models"] = tuple(args.models)
    if args.iters:
        changes["iters"] = args.iters
    if args.max_seconds:
        changes["max_seconds"] = args.max_seconds
    if args.no_driver:
        changes["driver"] = False
    s = dataclasses.replace(s, **changes)
    default = "gpu.json" if dev.type == "cuda" else "gpu_cpu.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / default
    command = " ".join(["python", "-m", "benchmarks.bench_gpu", *(sys.argv[1:] if argv is None else argv)])
    result = run(s, out, command)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
