"""Time nrfx's capture front ends: export-captured models against torch.export alone and fvcore.

One process, one thread; model construction is never timed; the median of ``--repeats`` calls
after one untimed warm-up.  Per model: ``nrfx`` (``nrfx.analyze`` with ``capture="auto"``:
the capture it used is reported), ``torch_export`` (``torch.export.export(strict=False)``, the
batch dim dynamic, as nrfx calls it: the floor of the export path), ``fx_trace``
(``torch.fx.symbolic_trace`` where it works: the floor of the fx path) and ``fvcore`` (its
FLOP count, a JIT trace plus a walk; its status where it fails).  The fx path must not slow
down: resnet50 is the reference row.

    python -m benchmarks.bench_capture [--quick] [--out benchmarks/results/capture.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torchvision

import nrfx
from benchmarks.bench_analysis import machine, versions, write_json
from benchmarks.bench_rejuvenate import _median_time
from nrfx.capture.front_ends import Example, _batch_dynamic, _export_call

QUICK = ("resnet50", "hf_vit_tiny")
MODELS = ("resnet50", "hf_vit_base", "hf_bert_base", "hf_convnext_tiny", "swin3d_t", "yolov8n", "smp_fpn_resnet34")


def build(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    """(model in eval mode, positional example args, keyword example args); no weights anywhere."""
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None).eval(), (torch.randn(2, 3, 224, 224),), {}
    if name == "swin3d_t":
        return torchvision.models.video.swin3d_t(weights=None).eval(), (torch.randn(2, 3, 8, 112, 112),), {}
    if name.startswith("hf_"):
        return _hugging_face(name)
    if name == "yolov8n":
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel("yolov8n.yaml", verbose=False).eval(), (torch.randn(2, 3, 320, 320),), {}
    if name == "smp_fpn_resnet34":
        import segmentation_models_pytorch as smp

        return smp.FPN(encoder_name="resnet34", encoder_weights=None).eval(), (torch.randn(2, 3, 256, 256),), {}
    raise ValueError(f"unknown model {name!r}")


def _hugging_face(name: str) -> tuple[torch.nn.Module, tuple, dict]:
    """Hugging Face transformers models from their default configs (tiny for the quick run)."""
    import transformers as hf

    if name == "hf_vit_tiny":
        config = hf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              image_size=64, patch_size=16)
        return hf.ViTForImageClassification(config).eval(), (torch.randn(2, 3, 64, 64),), {}
    if name == "hf_vit_base":
        return hf.ViTForImageClassification(hf.ViTConfig()).eval(), (torch.randn(2, 3, 224, 224),), {}
    if name == "hf_convnext_tiny":
        return hf.ConvNextForImageClassification(hf.ConvNextConfig()).eval(), (torch.randn(2, 3, 224, 224),), {}
    ids = torch.randint(0, 30000, (2, 128))
    return hf.BertModel(hf.BertConfig()).eval(), (ids,), {"attention_mask": torch.ones(2, 128, dtype=torch.long)}


def median_seconds(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median wall time after one warm-up, or the error that stopped the tool."""
    try:
        seconds = _median_time(fn, repeats)
    except Exception as error:  # a peer that cannot handle the model: recorded, not fatal
        return {"seconds": None, "status": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    return {"seconds": round(seconds, 4), "status": "ok"}


def _export(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """torch.export exactly as nrfx calls it (non-strict, every tensor input's dim 0 dynamic), nothing else."""
    example = Example(args, kwargs)
    return _export_call(model, example, _batch_dynamic(model, example))


def _fvcore(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """fvcore's FLOP count (positional inputs only)."""
    from fvcore.nn import FlopCountAnalysis

    if kwargs:
        raise TypeError("fvcore takes positional inputs only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = FlopCountAnalysis(model, args)
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return counter.total()


def bench(name: str, repeats: int) -> dict[str, Any]:
    """Every figure for one model."""
    model, args, kwargs = build(name)

    def analyze() -> nrfx.Analysis:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return nrfx.analyze(model, args, example_kwargs=kwargs)

    analysis = analyze()
    cover = analysis.coverage()
    row: dict[str, Any] = {
        "model": name, "capture": analysis.capture, "params": analysis.params,
        "params_exact": analysis.params == sum(p.numel() for p in model.parameters()), "nrfx_macs": analysis.macs,
        "coverage_free": round(cover.free, 4), "coverage_monitored": round(cover.monitored, 4),
        "aten_left": [n for n in analysis.capture_notes if "without a torch-level rule" in n],
        "nrfx": median_seconds(analyze, repeats),
        "torch_export": median_seconds(lambda: _export(model, args, kwargs), repeats),
        "fx_trace": median_seconds(lambda: torch.fx.symbolic_trace(model), repeats),
        "fvcore": median_seconds(lambda: _fvcore(model, args, kwargs), repeats),
    }
    for floor in ("torch_export", "fx_trace", "fvcore"):
        theirs = row[floor]["seconds"]
        row[f"nrfx_over_{floor}"] = round(row["nrfx"]["seconds"] / theirs, 3) if theirs and row["nrfx"]["seconds"] \
            else None
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    """The figures side by side (median ms)."""
    def ms(cell: dict[str, Any]) -> str:
        return f"{cell['seconds'] * 1e3:10.1f}" if cell["seconds"] is not None else f"{'failed':>10}"

    head = (f"{'model':18} {'capture':8} {'params':>11} {'nrfx ms':>10} {'export ms':>10} {'fx ms':>10} "
            f"{'fvcore ms':>10}")
    print(head + f" {'free':>6} {'monit.':>6}")
    print("-" * (len(head) + 14))
    for r in rows:
        print(f"{r['model']:18} {r['capture']:8} {r['params']:11d} {ms(r['nrfx'])} {ms(r['torch_export'])} "
              f"{ms(r['fx_trace'])} {ms(r['fvcore'])} {r['coverage_free']:6.1%} {r['coverage_monitored']:6.1%}")


def main(argv: list[str] | None = None) -> int:
    """Run, print, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK)}, one repeat")
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/capture.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = args.models or (QUICK if args.quick else MODELS)
    repeats = 1 if args.quick else args.repeats
    info = {"command": " ".join(["python", "-m", "benchmarks.bench_capture", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "repeats": repeats, "time_unit": "seconds (median)"}
    rows = []
    for name in models:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(bench(name, repeats))
    print_table(rows)
    info["results"] = rows
    write_json(info, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
