"""Time nrfx.analyze against Torch-Pruning's dependency graph and fvcore's FLOP count.

One process, one thread (``torch.set_num_threads(1)``), the same model object for every tool;
model construction is never timed.  For each model it reports the median wall time of each
tool over a few repeats (after one untimed warm-up), and for nrfx the memory it needs:

* ``nrfx_peak_rss_mb``: peak growth of the process's resident memory during ``analyze``,
  sampled every millisecond by a thread;
* ``nrfx_real_tensor_mb``: bytes of every non-meta tensor any torch op created during
  ``analyze`` (counted by a dispatch mode), next to ``forward_activation_mb``, what one real
  forward allocates for its node outputs: the analysis allocates no activations.

regnet_y_128gf (644 M parameters) is built for nrfx with its parameters on the meta device
(buffers stay real) in a fraction of a second; ``with torch.device("meta")`` cannot build it, its
builder reads widths from tensors.  The peers need real weights and run a real forward, so it
is built for real for them (~15 s, not timed) and each of their calls is capped by
``--peer-timeout``.

    python -m benchmarks.bench_analysis [--quick] [--out benchmarks/results/analysis.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nrfx
from nrfx.models import meta_parameters

MODELS = ("resnet50", "densenet121", "vit_b_16", "regnet_y_128gf")
HUGE = {"regnet_y_128gf"}  # built with meta parameters for nrfx; the peers run once, capped
TARGET_TP_RATIO = 0.3  # nrfx time / Torch-Pruning time on resnet50
TARGET_HUGE_SECONDS = 1.0  # nrfx.analyze on regnet_y_128gf


# -- building ---------------------------------------------------------------------------------------------
def build(name: str, meta: bool = False) -> nn.Module:
    """A torchvision model with random weights (``weights=None``) in eval mode."""
    with meta_parameters() if meta else contextlib.nullcontext():
        return torchvision.models.get_model(name, weights=None).eval()


# -- measuring --------------------------------------------------------------------------------------------
class _Timeout(Exception):
    """A peer call ran past its cap."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise _Timeout in the main thread after ``seconds`` (checked between torch ops)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def interleaved(tools: dict[str, Callable[[], Any]], repeats: int, warmup: bool,
                cap: float | None = None) -> dict[str, dict[str, Any]]:
    """Median wall time of each tool, calls interleaved round by round (load bursts hit every tool alike).

    A tool that errs or runs past ``cap`` seconds stops being called and reports why.
    """
    results: dict[str, dict[str, Any]] = {name: {"seconds": None, "status": "ok", "runs": []} for name in tools}
    for round_ in range(repeats + int(warmup)):
        for name, fn in tools.items():
            cell = results[name]
            if cell["status"] != "ok":
                continue
            try:
                with time_limit(cap):
                    start = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - start
            except _Timeout:
                cell["status"] = f"timeout after {cap:g} s"
            except Exception as error:  # a peer failing is a result to record
                cell["status"] = f"{type(error).__name__}: {str(error)[:200]}"
            else:
                if round_ >= int(warmup):
                    cell["runs"].append(round(elapsed, 6))
    for cell in results.values():
        if cell["status"] == "ok" and cell["runs"]:
            cell["seconds"] = statistics.median(cell["runs"])
    return results


def _rss() -> int:
    """Resident memory of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn: Callable[[], Any]) -> int:
    """Peak growth of resident memory while ``fn`` runs (sampled every millisecond)."""
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - base


class RealTensorBytes(TorchDispatchMode):
    """Counts the bytes of every non-meta tensor that a torch op outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.bytes += t.untyped_storage().nbytes() if t._base is None else 0
        return out


def forward_activation_bytes(analysis: nrfx.Analysis) -> int:
    """Bytes of every node output a real forward would allocate (read from the meta shapes)."""
    total = 0
    for node in analysis.gm.graph.nodes:
        if node.op.startswith("call_"):
            for t in tree_leaves(analysis.state.values.get(node)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


# -- the three tools --------------------------------------------------------------------------------------
def run_nrfx(model: nn.Module, x: torch.Tensor) -> nrfx.Analysis:
    """nrfx: trace, meta shapes, channel spaces, c(A)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.UnknownOpWarning)
        return nrfx.analyze(model, x)


def run_torch_pruning(model: nn.Module, x: torch.Tensor) -> Any:
    """Torch-Pruning: its dependency graph (forward hooks + autograd walk)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_pruning as tp

        return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def run_fvcore(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore: JIT-trace the model and count FLOPs (1 per multiply-add)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        counter = FlopCountAnalysis(model, x)
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return counter.total()


# -- one model ----------------------------------------------------------------------------------------------
def bench_model(name: str, repeats: int, warmup: bool, peer_timeout: float) -> dict[str, Any]:
    """Every figure for one model."""
    x = torch.randn(1, 3, 224, 224)
    huge = name in HUGE
    start = time.perf_counter()
    model = build(name, meta=huge)
    row: dict[str, Any] = {"model": name, "input": list(x.shape), "nrfx_build": "meta parameters" if huge else "real",
                           "build_seconds": round(time.perf_counter() - start, 3)}
    analysis = run_nrfx(model, x)
    row.update(_nrfx_figures(model, x, analysis))
    peers = {"torch_pruning": lambda: run_torch_pruning(model, x), "fvcore": lambda: run_fvcore(model, x)}
    if huge:  # nrfx repeated on the meta-built model; the peers once each on a real build, capped
        row["nrfx"] = interleaved({"nrfx": lambda: run_nrfx(model, x)}, repeats, warmup)["nrfx"]
        del model, analysis
        start = time.perf_counter()
        model = build(name)
        row["peer_build_seconds"] = round(time.perf_counter() - start, 3)
        real = run_nrfx(model, x)
        row["same_counts_on_real_build"] = (real.params, real.macs) == (row["params"], row["nrfx_macs"])
        peers = {"nrfx_on_real_model": lambda: run_nrfx(model, x), **peers}
        row.update(interleaved(peers, 1, False, peer_timeout))
    else:
        row.update(interleaved({"nrfx": lambda: run_nrfx(model, x), **peers}, repeats, warmup))
        if row["fvcore"]["status"] == "ok":
            row["fvcore_flops"] = run_fvcore(model, x)
    for peer in ("torch_pruning", "fvcore"):
        theirs, ours = row[peer]["seconds"], row["nrfx"]["seconds"]
        row[f"nrfx_over_{peer}"] = round(ours / theirs, 4) if theirs else None
    return row


def _nrfx_figures(model: nn.Module, x: torch.Tensor, analysis: nrfx.Analysis) -> dict[str, Any]:
    """nrfx's counts and its memory: peak RSS growth and real tensor bytes during one analyze."""
    counter = RealTensorBytes()
    with counter:
        run_nrfx(model, x)
    return {
        "params": analysis.params,
        "params_exact": analysis.params == sum(p.numel() for p in model.parameters()),
        "nrfx_macs": analysis.macs,
        "graph_nodes": len(analysis.gm.graph.nodes),
        "spaces": len(analysis.spaces),
        "frozen_spaces": len(analysis.frozen_spaces),
        "nrfx_peak_rss_mb": round(peak_rss_growth(lambda: run_nrfx(model, x)) / 2**20, 2),
        "nrfx_real_tensor_mb": round(counter.bytes / 2**20, 4),
        "forward_activation_mb": round(forward_activation_bytes(analysis) / 2**20, 1),
    }


# -- report ---------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU, cores, memory and load: timings on a shared machine need the load next to them."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    """Versions of everything measured."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for package in ("nrfx", "torch_pruning", "fvcore"):
        try:
            module = __import__(package)
            out[package] = getattr(module, "__version__", None) or _dist_version(package)
        except ImportError:
            out[package] = "not installed"
    return out


def _dist_version(package: str) -> str:
    """Installed distribution version of a package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def _ms(cell: dict[str, Any]) -> str:
    """A timing cell: milliseconds, or the reason there is none."""
    return f"{cell['seconds'] * 1e3:9.1f}" if cell["seconds"] is not None else f"{cell['status'][:9]:>9}"


def print_table(rows: list[dict[str, Any]]) -> None:
    """The figures side by side (median ms)."""
    head = (f"{'model':16} {'params':>11} {'nrfx ms':>9} {'TP ms':>9} {'fvcore ms':>9} {'nrfx/TP':>8} "
            f"{'nrfx/fv':>8} {'peakRSS MB':>10} {'real MB':>8} {'fwd act MB':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        tp_ratio = f"{r['nrfx_over_torch_pruning']:8.3f}" if r["nrfx_over_torch_pruning"] else f"{'-':>8}"
        fv_ratio = f"{r['nrfx_over_fvcore']:8.3f}" if r["nrfx_over_fvcore"] else f"{'-':>8}"
        print(f"{r['model']:16} {r['params']:11d} {_ms(r['nrfx'])} {_ms(r['torch_pruning'])} {_ms(r['fvcore'])} "
              f"{tp_ratio} {fv_ratio} {r['nrfx_peak_rss_mb']:10.1f} {r['nrfx_real_tensor_mb']:8.3f} "
              f"{r['forward_activation_mb']:10.1f}")


def check_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: ≤ 0.3× Torch-Pruning on resnet50; regnet_y_128gf under 1 s, no activations."""
    by_name = {r["model"]: r for r in rows}
    targets: dict[str, Any] = {}
    if "resnet50" in by_name:
        ratio = by_name["resnet50"]["nrfx_over_torch_pruning"]
        targets["resnet50_nrfx_over_torch_pruning"] = {"value": ratio, "target": f"<= {TARGET_TP_RATIO}",
                                                       "met": ratio is not None and ratio <= TARGET_TP_RATIO}
    if "regnet_y_128gf" in by_name:
        row = by_name["regnet_y_128gf"]
        seconds = row["nrfx"]["seconds"]
        no_activations = row["nrfx_real_tensor_mb"] < 0.01 * row["forward_activation_mb"]
        targets["regnet_y_128gf_nrfx_seconds"] = {"value": seconds, "target": f"< {TARGET_HUGE_SECONDS}",
                                                  "met": seconds is not None and seconds < TARGET_HUGE_SECONDS}
        targets["regnet_y_128gf_no_activations"] = {
            "value": row["nrfx_real_tensor_mb"], "target": "real tensors < 1% of a forward's activations",
            "met": no_activations}
    return targets


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 only, one repeat, no warm-up")
    parser.add_argument("--out", default="benchmarks/results/analysis.json", help="where to write the JSON")
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per tool (median reported)")
    parser.add_argument("--peer-timeout", type=float, default=120.0, help="cap (s) per peer call on huge models")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models or (["resnet50"] if args.quick else list(MODELS))
    repeats, warmup = (1, False) if args.quick else (args.repeats, True)
    info = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_analysis", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "repeats": repeats, "warmup": warmup, "peer_timeout_s": args.peer_timeout,
            "time_unit": "seconds (median)", "macs_convention": "conv/linear/matmul multiply-adds, bias excluded"}
    rows = []
    for name in models:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(name, repeats, warmup, args.peer_timeout))
    print_table(rows)
    info["results"] = rows
    info["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    info["targets"] = check_targets(rows)
    for key, target in info["targets"].items():
        print(f"target {key}: {target['value']} (want {target['target']}) -> {'met' if target['met'] else 'MISSED'}")
    write_json(info, args.out)
    return 0


def write_json(info: dict[str, Any], path: str) -> None:
    """Write the figures as indented JSON (folders made) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
