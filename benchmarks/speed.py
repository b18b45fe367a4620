"""The training driver's monitoring overhead per step: ``nr.step()`` against a plain ``optimizer.step()``.

Two identical copies of a model train on the same fixed batch, one with a plain optimizer, one
under ``nrfx.NeuralRejuvenation`` with λ > 0 (so the L1 sub-gradient is applied every step) and
a check of r(θ) every ``interval`` steps; the target is set so low that it never rejuvenates.
Blocks of steps alternate between the two (load bursts hit both alike).  Forward and backward
are the same work in both, so the driver adds

    penalty = median nr.step() without a check − median optimizer.step()
    check   = one nr.check() (masks from γ + ``utilization``: reads γ, no forward), timed alone
    overhead(Δt) = (penalty + check / Δt) / median time of a whole plain step

Medians, because preemption on a shared machine makes means noisy; the mean-based figure (checks
included as they happened in the loop) is kept as ``overhead_fraction_means``.

    python -m benchmarks.speed [--quick] [--out benchmarks/results/driver_overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import nrfx

TARGET = 0.01  # overhead per step, as a fraction of a plain training step


def fashion_vgg() -> nn.Module:
    """The VGG-BN of the quality benchmark."""
    from benchmarks.quality import Setup, example

    return example().vgg_bn(Setup().config)


CASES: dict[str, dict[str, Any]] = {
    "vgg_bn_fmnist": {"build": fashion_vgg, "input": (128, 1, 28, 28), "classes": 10},
    "resnet18": {"build": lambda: torchvision.models.resnet18(weights=None, num_classes=10),
                 "input": (16, 3, 64, 64), "classes": 10},
}


def _timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead(case: str, steps: int, interval: int, block: int = 10) -> dict[str, Any]:
    """Per-step times of plain and driver training on one model; the driver's overhead."""
    spec = CASES[case]
    torch.manual_seed(0)
    plain_model = spec["build"]()
    nr_model = copy.deepcopy(plain_model)
    factory = lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    plain_opt = factory(plain_model.parameters())
    x = torch.randn(spec["input"])
    y = torch.randint(0, spec["classes"], (spec["input"][0],))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.UnknownOpWarning)
        nr = nrfx.NeuralRejuvenation(nr_model, factory, example_inputs=x[:1], target=1e-6, interval=interval,
                                     delta_lambda=0.0, seed=0)
    nr.lam = 1e-4  # the penalty is applied at every step (Δλ = 0 keeps it there)
    criterion = nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {"plain_total": [], "plain_step": [], "nr_total": [], "nr_step": [],
                                     "nr_checked": []}

    def one(model, zero, stepper, kind) -> None:
        start, records = time.perf_counter(), len(nr.history)
        loss = criterion(model(x), y)
        zero()
        loss.backward()
        times[f"{kind}_step"].append(_timed(stepper))
        times[f"{kind}_total"].append(time.perf_counter() - start)
        if kind == "nr":
            times["nr_checked"].append(float(len(nr.history) > records))

    for i in range(-1, steps // block):  # block -1: warm-up, not recorded
        order = [("plain", plain_model, plain_opt.zero_grad, plain_opt.step),
                 ("nr", nr_model, nr.optimizer.zero_grad, nr.step)]
        for kind, model, zero, stepper in order if i % 2 else order[::-1]:
            for _ in range(block):
                one(model, zero, stepper, kind)
        if i == -1:
            times = {k: [] for k in times}
    return _figures(case, spec, nr, times, interval, steps)


def _figures(case: str, spec: dict, nr: nrfx.NeuralRejuvenation, times: dict[str, list[float]],
             interval: int, steps: int) -> dict[str, Any]:
    """Medians (robust to preemption on a shared machine), the overhead at ``interval`` and at other intervals.

    penalty = median nr.step without a check − median optimizer.step; a check is timed alone
    (median of 50 calls); overhead(Δt) = (penalty + check / Δt) / median plain step.  The same
    ratio from plain means (checks included as they happened) is kept as ``overhead_fraction_means``.
    """
    median = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    check_s = statistics.median(_timed(nr.check) for _ in range(50))
    between = [t for t, c in zip(times["nr_step"], times["nr_checked"], strict=True) if not c]
    penalty_s = statistics.median(between) - median["plain_step"]
    at = {str(i): (penalty_s + check_s / i) / median["plain_total"] for i in (1, 10, 100)}
    fraction = (penalty_s + check_s / interval) / median["plain_total"]
    return {
        "model": case, "input": list(spec["input"]), "steps_each": steps, "interval": interval,
        "checks_in_loop": int(sum(times["nr_checked"])), "lam": nr.lam, "rounds": nr.rounds,
        "plain_step_total_ms": round(1e3 * median["plain_total"], 3),
        "plain_optimizer_step_ms": round(1e3 * median["plain_step"], 4),
        "nr_step_ms": round(1e3 * statistics.median(between), 4),
        "penalty_ms": round(1e3 * penalty_s, 4), "check_ms": round(1e3 * check_s, 4),
        "overhead_fraction": fraction, "overhead_at_interval": at,
        "overhead_fraction_means": (mean["nr_step"] - mean["plain_step"]) / mean["plain_total"],
        "target": f"< {TARGET:.0%} of a plain step", "met": fraction < TARGET,
    }


def run(quick: bool, interval: int = 10) -> dict[str, Any]:
    """Overhead on the quality benchmark's VGG (and ResNet-18 unless quick)."""
    torch.set_num_threads(1)
    cases = ["vgg_bn_fmnist"] if quick else list(CASES)
    steps = 40 if quick else 200
    return {"results": [overhead(c, steps, interval) for c in cases], "threads": torch.get_num_threads()}


def markdown(result: dict[str, Any]) -> str:
    """The overhead table (medians; overhead = (penalty + check / Δt) / plain step)."""
    lines = ["| model | input | plain step ms | optimizer.step ms | nr.step ms (no check) | penalty ms | check ms | "
             "overhead (Δt) | at Δt=1 / 10 / 100 | < 1 %? |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        at = " / ".join(f"{v:.2%}" for v in r["overhead_at_interval"].values())
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input']))} | {r['plain_step_total_ms']:.1f} | "
                     f"{r['plain_optimizer_step_ms']:.2f} | {r['nr_step_ms']:.2f} | {r['penalty_ms']:.3f} | "
                     f"{r['check_ms']:.2f} | {r['overhead_fraction']:.2%} (Δt={r['interval']}) | {at} | "
                     f"{'yes' if r['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the VGG only, 40 steps each")
    parser.add_argument("--interval", type=int, default=10, help="steps between checks (Δt)")
    parser.add_argument("--out", default="benchmarks/results/driver_overhead.json")
    args = parser.parse_args(argv)
    result = run(args.quick, args.interval)
    result["command"] = " ".join(["python", "-m", "benchmarks.speed", *sys.argv[1:]])
    print(markdown(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
