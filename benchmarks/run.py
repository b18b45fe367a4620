"""Run every nrfx benchmark; write JSON, a markdown summary and PNG plots into one folder.

    python -m benchmarks.run [--quick] [--only quality|speed|ablation|paper|gpu] [--resume] [--out benchmarks/results]

* speed: ``benchmarks.bench_analysis`` (nrfx.analyze against Torch-Pruning and fvcore),
  ``benchmarks.bench_rejuvenate`` (rejuvenate time, latency of the rewritten models) — each in its
  own process, as their own commands would run them — and ``benchmarks.speed`` (the driver's
  monitoring overhead per training step).
* quality: ``benchmarks.quality`` (Fashion-MNIST, VGG-BN, 3 seeds; skipped with a message when
  the data is missing).
* paper (only with ``--only paper``): ``benchmarks.quality_paper``, the official code's CIFAR
  protocol at Fashion-MNIST scale (fixed λ, T_r = 0.25, restarted schedule, fresh optimizer;
  baseline, compute-matched baseline, NR-CR, NR-CR two heads, NR-CA, ensemble; 3 seeds; one thread,
  ``--device cuda`` when there is one).
* ablation (only with ``--only ablation``): ``benchmarks.quality --ablation``, NR's settings one at
  a time on the validation split (2 seeds): why NR does or does not pay.
* gpu (only with ``--only gpu``): ``benchmarks.bench_gpu``, original / pruned / nr / cr / ca on
  ResNet-50, MobileNet-V3-Large and a gated ViT-B/16 on a CUDA device, fp32 and bf16 +
  channels_last, as ratios to the original (``gpu.json``); without a CUDA device it says so and
  skips (``--device cpu`` runs its tiny CPU smoke form into ``gpu_cpu.json``).

The quality benchmarks write every finished (method or arm, seed) run to their JSON at once;
``--resume`` keeps the runs already there and trains the rest.

Speed runs first and alone: the quality runs use two processes and would disturb the timings.
``--quick`` runs every benchmark in a reduced form (under 3 minutes on 2 cores).  The folder gets
``run.json`` (command, machine, date, versions, what ran and how long), ``summary.md``, the JSON of
every benchmark and the plots (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import bench_gpu, bench_rejuvenate, quality, quality_paper, speed
from benchmarks.bench_analysis import machine, versions

ROOT = Path(__file__).resolve().parent.parent


# -- speed -----------------------------------------------------------------------------------------------
def run_module(module: str, args: list[str], log) -> dict[str, Any]:
    """``python -m module args`` from the repository root; its status and how long it took."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    shown = [a.replace(f"{ROOT}/", "") for a in args]  # paths relative to the checkout: no machine paths
    status = {"command": " ".join(["python", "-m", module, *shown]), "returncode": done.returncode,
              "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode != 0:
        status["stderr_tail"] = done.stderr[-2000:]
        log(f"  {module} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return status


def run_speed(out: Path, quick: bool, log) -> dict[str, Any]:
    """The three speed benchmarks; their JSON files land in ``out``."""
    flag = ["--quick"] if quick else []
    steps = {}
    for module, name in (("benchmarks.bench_analysis", "analysis.json"),
                         ("benchmarks.bench_rejuvenate", "rejuvenate.json")):
        log(f"speed: {module} ...")
        steps[module] = run_module(module, [*flag, "--out", str(out / name)], log)
    log("speed: driver overhead ...")
    start = time.perf_counter()
    driver = speed.run(quick, interval=quality.Setup().interval)
    driver["command"] = "python -m benchmarks.speed" + (" --quick" if quick else "")
    (out / "driver_overhead.json").write_text(json.dumps(driver, indent=2) + "\n")
    steps["benchmarks.speed"] = {"command": driver["command"], "returncode": 0,
                                 "seconds": round(time.perf_counter() - start, 1)}
    return steps


def _read(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when it is not there."""
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(cell: dict[str, Any]) -> str:
    """A timing cell of bench_analysis in ms, or why there is none."""
    return f"{cell['seconds'] * 1e3:.1f}" if cell.get("seconds") is not None else cell.get("status", "—")[:40]


def analysis_markdown(data: dict[str, Any]) -> str:
    """nrfx.analyze against Torch-Pruning and fvcore (median ms, one thread)."""
    lines = ["| model | params | nrfx ms | Torch-Pruning ms | fvcore ms | nrfx / TP | nrfx / fvcore | "
             "nrfx peak RSS MB | real tensors MB | a forward's activations MB |", "|---" * 10 + "|"]
    for r in data["results"]:
        ratios = [f"{r[k]:.3f}" if r.get(k) else "—" for k in ("nrfx_over_torch_pruning", "nrfx_over_fvcore")]
        lines.append(f"| {r['model']} | {r['params']:,} | {_ms(r['nrfx'])} | {_ms(r['torch_pruning'])} | "
                     f"{_ms(r['fvcore'])} | {ratios[0]} | {ratios[1]} | {r['nrfx_peak_rss_mb']:.1f} | "
                     f"{r['nrfx_real_tensor_mb']:.3f} | {r['forward_activation_mb']:.1f} |")
    targets = [f"- {k}: {v['value']} (target {v['target']}): {'met' if v['met'] else 'MISSED'}"
               for k, v in data.get("targets", {}).items()]
    return "\n".join([*lines, "", *targets]) + "\n"


REJUVENATE_TARGETS = bench_rejuvenate.TARGETS


def rejuvenate_markdown(data: dict[str, Any]) -> str:
    """Rejuvenate time and latency of the rewritten models, one table per dead-channel pattern."""
    lines = [f"{data['model']}, input {'×'.join(map(str, data['input']))}, "
             f"{data['dead_fraction']:.0%} of the channels dead, rejuvenated to the original's MACs: "
             f"`nrfx.rejuvenate` takes **{data['rejuvenate_s'] * 1e3:.0f} ms** (target < 1 s).", ""]
    original = data["latency_s"]["original"]
    for pattern, entry in data["patterns"].items():
        latency, elements = entry["latency_s"], entry["conv_output_elements"]
        lines += [f"**{pattern}** (r = {entry['r_params']:.2f}; conv outputs per example after reallocation: "
                  f"{elements['rejuvenated'] / elements['original']:.2f}× the original's)", "",
                  "| model | latency ms | × original | × dense of equal MACs | target |", "|---|---|---|---|---|",
                  f"| original | {original * 1e3:.1f} | 1.00 | — | |",
                  f"| dense, plan's widths | {latency['dense'] * 1e3:.1f} | "
                  f"{entry['overhead_vs_original']['dense']:.2f} | 1.00 | |"]
        for scheme in ("nr", "cr", "ca"):
            ratio, vs_original = entry["overhead_vs_dense_equal_macs"][scheme], entry["overhead_vs_original"][scheme]
            target, goal = REJUVENATE_TARGETS[scheme], bench_rejuvenate.TARGETS_VS_ORIGINAL[scheme]
            verdict = (f"≤ {target:.2f} × dense ({'met' if ratio <= target else 'missed'}); "
                       f"≤ {goal:.2f} × original ({'met' if vs_original <= goal else 'missed'})")
            lines.append(f"| rejuvenated, {scheme} | {latency[scheme] * 1e3:.1f} | "
                         f"{vs_original:.2f} | {ratio:.2f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------------
def plot_speed(out: Path, analysis: dict | None, rejuvenate: dict | None, driver: dict | None) -> list[str]:
    """Analysis times (log scale), latency ratios and driver overhead; [] without matplotlib."""
    plt = quality._pyplot()
    if plt is None:
        return []
    written = []
    if analysis:
        written.append(_plot_analysis(plt, analysis, out / "speed_analysis.png"))
    if rejuvenate:
        written.append(_plot_latency(plt, rejuvenate, out / "speed_latency.png"))
    if driver:
        written.append(_plot_driver(plt, driver, out / "speed_driver_overhead.png"))
    return written


def _plot_analysis(plt, data: dict[str, Any], path: Path) -> str:
    """Median seconds per tool and model (log scale); a tool that failed or timed out is marked ×."""
    rows = data["results"]
    tools = [("nrfx", "nrfx"), ("torch_pruning", "Torch-Pruning"), ("fvcore", "fvcore")]
    fig, axis = plt.subplots(figsize=(8, 4))
    width = 0.27
    for k, (key, label) in enumerate(tools):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        values = [r[key]["seconds"] for r in rows]
        axis.bar([x for x, v in zip(xs, values, strict=True) if v is not None],
                 [v for v in values if v is not None], width, label=label)
        for x, v, r in zip(xs, values, rows, strict=True):
            if v is None:
                axis.annotate("×", (x, 1e-2), ha="center", color="tab:red", fontsize=14)
                axis.annotate(r[key]["status"][:18], (x, 2e-2), ha="center", rotation=90, fontsize=6)
    axis.set_yscale("log")
    axis.set_xticks(range(len(rows)), [r["model"] for r in rows])
    axis.set_ylabel("seconds (median, 1 thread)")
    axis.set_title("Graph analysis: nrfx.analyze vs Torch-Pruning DependencyGraph vs fvcore FLOPs")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_latency(plt, data: dict[str, Any], path: Path) -> str:
    """Latency of each scheme relative to a dense model of equal MACs, per dead pattern, with the targets."""
    schemes = list(REJUVENATE_TARGETS)
    patterns = list(data["patterns"])
    fig, axis = plt.subplots(figsize=(5.5, 3.5))
    width = 0.8 / len(patterns)
    for j, pattern in enumerate(patterns):
        ratios = data["patterns"][pattern]["overhead_vs_dense_equal_macs"]
        axis.bar([i + (j - (len(patterns) - 1) / 2) * width for i in range(len(schemes))],
                 [ratios[s] for s in schemes], width, label=pattern)
    for i, s in enumerate(schemes):
        axis.hlines(REJUVENATE_TARGETS[s], i - 0.4, i + 0.4, color="tab:red", linestyle="--")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set_xticks(range(len(schemes)), schemes)
    axis.set_ylabel("latency / dense of equal MACs")
    axis.set_title(f"{data['model']} rejuvenated, batch {data['input'][0]} (dashed: targets)", fontsize=9)
    axis.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_driver(plt, data: dict[str, Any], path: Path) -> str:
    """Driver overhead per step at checks every 1, 10, 100 steps, per model, with the 1 % target."""
    fig, axis = plt.subplots(figsize=(6, 3.5))
    rows = data["results"]
    for k, r in enumerate(rows):
        intervals = list(r["overhead_at_interval"])
        xs = [i + (k - (len(rows) - 1) / 2) * 0.35 for i in range(len(intervals))]
        axis.bar(xs, [100 * v for v in r["overhead_at_interval"].values()], 0.35, label=r["model"])
    axis.axhline(100 * speed.TARGET, color="tab:red", linestyle="--", label="target 1 %")
    axis.set_xticks(range(3), [f"Δt = {i}" for i in ("1", "10", "100")])
    axis.set_ylabel("overhead per step (%)")
    axis.set_title("NeuralRejuvenation.step() vs optimizer.step()", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- summary ---------------------------------------------------------------------------------------------------
def summary_markdown(info: dict[str, Any], out: Path) -> str:
    """Everything in one markdown page: where and how it ran, then each benchmark's table and plots."""
    m = info["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    parts = ["# nrfx benchmark results", "",
             f"- last command: `{info['command']}`", f"- date (UTC): {info['date']}",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; load average at "
             f"start {m['load_average_at_start']}", f"- versions: {packages}",
             "", "| benchmark | run by | date (UTC) | seconds |", "|---|---|---|---|"]
    parts += [f"| `{s['command']}` | `{s['run_by']}` | {s['date']} | {s['seconds']:.0f} |"
              for s in info["steps"].values() if "run_by" in s]
    parts += ["", "--quick: reduced settings, not results." if info["quick"] else "", ""]
    parts += _quality_section(out)
    parts += _ablation_section(out)
    parts += _paper_section(out)
    parts += _speed_section(out)
    parts += _gpu_section(out)
    return "\n".join(parts) + "\n"


def _quality_section(out: Path) -> list[str]:
    data = _read(out / "quality.json")
    if data is None:
        return []
    s = data["setup"]
    lines = ["## Quality: Fashion-MNIST, VGG-BN", "",
             f"c(A) = {data['c_params']:,} params, {data['c_macs'] / 1e6:.2f} M MACs; {s['steps']} SGD steps of "
             f"batch {s['batch']} for every method; seeds {data['seeds']}; errors in %, mean ± std.", "",
             (out / "quality.md").read_text()]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in data.get("plots", [])]
    return [*lines, ""]


def _ablation_section(out: Path) -> list[str]:
    data = _read(out / "quality_ablation.json")
    if data is None:
        return []
    s = data["setup"]
    return ["## Quality: what moves NR's error (validation split only)", "",
            f"{s['steps']} steps unless the row says otherwise; seeds {data['seeds']}; validation error in %, "
            "mean ± std; the test split is not evaluated.", "", (out / "quality_ablation.md").read_text(), ""]


def _paper_section(out: Path) -> list[str]:
    data = _read(out / "quality_paper.json")
    if data is None:
        return []
    s = data["setup"]
    lines = ["## Quality under the paper's protocol (official CIFAR mode), Fashion-MNIST", "",
             f"{s['per_class'] * 10:,} training images, E = {s['epochs']} epochs, batch {s['batch']}, "
             f"T_r = {s['target']}, fixed λ = {data['lambda']['chosen']:g}; seeds {data['seeds']}; "
             f"device {data['device']}; {data['wall_seconds'] / 60:.0f} min.", "",
             (out / "quality_paper.md").read_text()]
    if data.get("plot"):
        lines.append(f"![quality_paper]({Path(data['plot']).name})")
    return [*lines, ""]


def _gpu_section(out: Path) -> list[str]:
    lines = []
    for name, title in (("gpu.json", "## Speed on the GPU: rewritten models against the original"),
                        ("gpu_cpu.json", "## The GPU benchmark's CPU smoke run (tiny sizes, not representative)")):
        data = _read(out / name)
        if data:
            lines += [title, "", bench_gpu.markdown(data), ""]
    return lines


def _speed_section(out: Path) -> list[str]:
    lines = []
    analysis, rejuvenate, driver = (_read(out / n) for n in ("analysis.json", "rejuvenate.json",
                                                             "driver_overhead.json"))
    if analysis:
        lines += ["## Speed: analysis against Torch-Pruning and fvcore", "", analysis_markdown(analysis),
                  "![speed_analysis](speed_analysis.png)", ""]
    if rejuvenate:
        lines += ["## Speed: rejuvenate and latency of the rewritten models", "", rejuvenate_markdown(rejuvenate),
                  "![speed_latency](speed_latency.png)", ""]
    if driver:
        lines += ["## Speed: the driver's monitoring overhead per training step", "", speed.markdown(driver),
                  "![speed_driver_overhead](speed_driver_overhead.png)", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks into ``--out``; update run.json and rewrite summary.md from every result there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark, reduced (under 3 minutes)")
    parser.add_argument("--only", choices=("quality", "speed", "ablation", "paper", "gpu"), default=None,
                        help="one part; 'ablation', 'paper' and 'gpu' run only when named")
    parser.add_argument("--device", default="auto", help="the paper and gpu benchmarks' device: auto (cuda when "
                        "available), cpu or cuda")
    parser.add_argument("--resume", action="store_true", help="quality, ablation, paper: keep the finished runs "
                        "of their JSON in --out and train the rest")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--workers", type=int, default=2, help="training processes for the quality runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    command = " ".join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    previous = _read(out / "run.json") or {}
    info = {"command": command, "date": date, "machine": machine(), "versions": versions(), "quick": args.quick,
            "steps": previous.get("steps", {}) if previous.get("quick") == args.quick else {}}
    start = time.perf_counter()
    ran: dict[str, Any] = {}
    if args.only in (None, "speed"):
        ran |= run_speed(out, args.quick, log)
        info["plots"] = plot_speed(out, *(_read(out / n) for n in ("analysis.json", "rejuvenate.json",
                                                                    "driver_overhead.json")))
    if args.only in (None, "quality"):
        ran["benchmarks.quality"] = run_quality(out, args.quick, args.workers, log, args.resume)
    if args.only == "ablation":
        ran["benchmarks.quality --ablation"] = run_ablation(out, args.quick, args.workers, log, args.resume)
    if args.only == "paper":
        ran["benchmarks.quality_paper"] = run_paper(out, args.quick, args.device, log, args.resume)
    if args.only == "gpu":
        ran["benchmarks.bench_gpu"] = run_gpu(out, args.quick, args.device, log)
    for step in ran.values():
        step |= {"run_by": command, "date": date}
    info["steps"] |= ran
    info["seconds"] = round(time.perf_counter() - start, 1)
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(info, out))
    log(f"wrote {out / 'summary.md'} ({info['seconds']:.0f} s)")
    return 0 if all(s.get("returncode", 0) == 0 for s in ran.values()) else 1


def run_quality(out: Path, quick: bool, workers: int, log, resume: bool = False) -> dict[str, Any]:
    """The quality benchmark (default or --quick settings); its status."""
    start = time.perf_counter()
    setup = quality.Setup().replace(**quality.QUICK) if quick else quality.Setup()
    names = quality.QUICK_METHODS if quick else list(quality.METHODS)
    seeds = [0] if quick else [0, 1, 2]
    log(f"quality: {len(names)} methods × {len(seeds)} seeds, {setup.steps} steps each ...")
    result = quality.run(names, seeds, setup, out, workers, log=log, resume=resume)
    return {"command": "python -m benchmarks.quality" + (" --quick" if quick else ""), "returncode": 0,
            "seconds": round(time.perf_counter() - start, 1), "skipped": result is None}


def run_paper(out: Path, quick: bool, device: str, log, resume: bool = False) -> dict[str, Any]:
    """The paper-protocol benchmark on one thread (3 seeds; --quick: 1 seed on synthetic data); its status."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    setup = quality_paper.PaperSetup().replace(**quality_paper.QUICK) if quick else quality_paper.PaperSetup()
    result = quality_paper.run(setup, [0] if quick else [0, 1, 2], out, device, log=log, resume=resume)
    return {"command": "python -m benchmarks.quality_paper" + (" --quick" if quick else ""), "returncode": 0,
            "seconds": round(time.perf_counter() - start, 1), "skipped": result is None}


def run_ablation(out: Path, quick: bool, workers: int, log, resume: bool = False) -> dict[str, Any]:
    """The validation-split investigation of NR's settings (2 seeds; 1 with --quick); its status."""
    start = time.perf_counter()
    setup = quality.Setup().replace(**quality.QUICK) if quick else quality.Setup()
    seeds = [0] if quick else [0, 1]
    log(f"ablation: {len(quality.ABLATION)} variants × {len(seeds)} seeds (validation split only) ...")
    result = quality.run_ablation(seeds, setup, out, workers, log=log, resume=resume)
    return {"command": "python -m benchmarks.quality --ablation" + (" --quick" if quick else ""), "returncode": 0,
            "seconds": round(time.perf_counter() - start, 1), "skipped": result is None}


def run_gpu(out: Path, quick: bool, device: str, log) -> dict[str, Any]:
    """The GPU benchmark in this process (gpu.json); skipped with a message when there is no CUDA device.

    ``--device cpu`` runs its smoke form (always quick) into gpu_cpu.json.
    """
    start = time.perf_counter()
    dev = bench_gpu.resolve_device(device)
    if dev is None:
        log("gpu: no CUDA device here: skipped (a CPU smoke run: --only gpu --device cpu)")
        return {"command": "python -m benchmarks.bench_gpu", "returncode": 0, "seconds": 0.0, "skipped": True}
    quick = quick or dev.type == "cpu"
    settings = bench_gpu.Settings(device=str(dev), quick=quick)
    if quick:
        settings = dataclasses.replace(settings, **bench_gpu.QUICK)
    flags = (["--device", "cpu"] if dev.type == "cpu" else []) + (["--quick"] if quick else [])
    command = " ".join(["python -m benchmarks.bench_gpu", *flags])
    result = bench_gpu.run(settings, out / ("gpu.json" if dev.type == "cuda" else "gpu_cpu.json"), command)
    return {"command": command, "returncode": 0 if not result["failed"] else 1,
            "seconds": round(time.perf_counter() - start, 1), "skipped": False}


if __name__ == "__main__":
    raise SystemExit(main())
