"""Rejuvenate time and inference latency of the rewritten models, side by side, as JSON.

Run: ``.venv/bin/python -m benchmarks.bench_rejuvenate [--quick] [--out benchmarks/results/rejuvenate.json]``.
Latency is measured at batch 32 (8 with --quick) on one thread, for the original model, each
scheme, and a dense model of equal MACs (the same architecture with every free space widened
by the plan's widths but no S/R split: the plain ``nr`` form at the same widths is that model).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision

import nrfx


def _kill(model: torch.nn.Module, fraction: float, seed: int) -> None:
    """Zero γ of a random fraction of every BatchNorm's channels (a model with dead channels)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight[torch.rand(module.weight.shape, generator=gen) < fraction] = 0


def _median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool) -> dict:
    """All figures for resnet50 (and a smaller input with --quick)."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    size, batch, repeats = (64, 8, 3) if quick else (224, 32, 5)
    model = torchvision.models.resnet50(weights=None).eval()
    _kill(model, 0.4, 0)
    x1 = torch.randn(1, 3, size, size)
    analysis = nrfx.analyze(model, x1)
    results = {"model": "resnet50", "input": [batch, 3, size, size], "c_params": analysis.params,
               "c_flops": analysis.flops, "r_params": analysis.utilization().r_params}
    results["rejuvenate_s"] = _median_time(lambda: nrfx.rejuvenate(model, None, None, example_inputs=x1), repeats)
    x = torch.randn(batch, 3, size, size)
    latency = {}
    with torch.no_grad():
        latency["original"] = _median_time(lambda: model(x), repeats)
        for scheme in ("nr", "cr", "ca"):
            new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "flops"), example_inputs=x1, scheme=scheme)
            latency[scheme] = _median_time(lambda new=new: new(x), repeats)
    dense = latency["nr"]
    results["latency_s"] = latency
    results["overhead_vs_dense_equal_macs"] = {k: latency[k] / dense for k in ("nr", "cr", "ca")}
    results["overhead_vs_original"] = {k: latency[k] / latency["original"] for k in ("nr", "cr", "ca")}
    return results


def main(argv: list[str] | None = None) -> None:
    """Print the figures and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/rejuvenate.json")
    args = parser.parse_args(argv)
    results = run(args.quick)
    results["meta"] = {"command": " ".join([sys.executable, "-m", "benchmarks.bench_rejuvenate", *sys.argv[1:]]),
                       "machine": platform.platform(), "processor": platform.processor(),
                       "date": datetime.now(UTC).isoformat(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
