"""How an S/R layer should launch its blocks: the alternatives, timed side by side.

    python -m benchmarks.bench_srlayers [--device cpu|cuda] [--quick] [--out benchmarks/results/srlayers_cpu.json]

For one ResNet-50-like 3×3 conv, one 1×1 conv and one ViT-like linear (no bias), with 60 % survivors (S)
and the rest rejuvenated (R), aligned to 8, the same maths is computed several ways, interleaved,
median time, inference (no grad) and a training step (forward + backward):

* cr: ``nrfx_two_calls_cat`` (nrfx's layer: split, two convs, cat); ``prealloc_copy`` (two
  convs written into slices of one preallocated output: a copy per block); ``grouped_half`` (one
  grouped conv, possible only when S and R have equal widths on both sides: timed with a
  half/half split against ``nrfx_half``, nrfx's layer at that split); ``dense`` (the plain layer
  of the same width, which computes the cross blocks too).
* ca: ``nrfx`` (nrfx's layer: two convs, then with autograd ``where_gate`` with its backward
  written out, without it the gate written into the first output half by half); ``where_gate``
  (the diagonal and cross terms picked by a row mask, one addcmul; autograd's own backward);
  ``cat_gate`` (the two outputs split, gated per half,
  concatenated); ``prealloc_gate`` (gated into slices of a new output; inference only); ``dense``.

Everything is a ratio to ``dense``.  The choice kept in nrfx is the one fastest on both CPU
and GPU that also has one code path for training and inference (``prealloc_*`` cannot train).
Writes JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.layers.srlayers import _cross_attention, make_sr

ROOT = Path(__file__).resolve().parent.parent


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of ``fn`` takes (device-synchronised)."""
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    return run


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per variant, the variants alternating within each round."""
    timer, times = _timer(device), {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _cr_variants(dense: nn.Module, s_in: int, s_out: int, op) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The cr block product written several ways (each returns the [S; R] output)."""
    layer = make_sr(dense, "cr", s_in, s_out)
    dim = 1 if not isinstance(dense, nn.Linear) else -1

    def prealloc_copy(x: torch.Tensor) -> torch.Tensor:
        xs, xr = torch.split(x, (s_in, x.shape[dim] - s_in), dim)
        a, b = op(xs, layer.weight_ss, layer.bias_s), op(xr, layer.weight_rr, layer.bias_r)
        at = dim % a.dim()
        out = a.new_empty((*a.shape[:at], a.shape[at] + b.shape[at], *a.shape[at + 1:]))
        out.narrow(dim, 0, a.shape[dim]).copy_(a)
        out.narrow(dim, a.shape[dim], b.shape[dim]).copy_(b)
        return out

    variants = {"dense": dense, "nrfx_two_calls_cat": layer, "prealloc_copy": prealloc_copy}
    cin = dense.in_features if isinstance(dense, nn.Linear) else dense.in_channels
    cout = dense.out_features if isinstance(dense, nn.Linear) else dense.out_channels
    if not isinstance(dense, nn.Linear) and cin % 2 == 0 and cout % 2 == 0:
        half = make_sr(dense, "cr", cin // 2, cout // 2)
        grouped = nn.Conv2d(cin, cout, dense.kernel_size, padding=dense.padding, groups=2, bias=dense.bias is not None)
        grouped = grouped.to(dense.weight.device, dense.weight.dtype)
        with torch.no_grad():
            grouped.weight.copy_(torch.cat([half.weight_ss, half.weight_rr]))
        variants |= {"nrfx_half": half, "grouped_half": grouped}
    return variants


def _ca_variants(dense: nn.Module, s_in: int, s_out: int, op) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The ca block product and gate written several ways."""
    layer = make_sr(dense, "ca", s_in, s_out)
    dim = 1 if not isinstance(dense, nn.Linear) else -1

    def blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, xr = torch.split(x, (s_in, x.shape[dim] - s_in), dim)
        return op(xs, layer.weight_s_in, None), op(xr, layer.weight_r_in, None)

    def cat_gate(x: torch.Tensor) -> torch.Tensor:
        a, b = blocks(x)
        (a_s, a_r), (b_s, b_r) = (t.split((s_out, t.shape[dim] - s_out), dim) for t in (a, b))
        return torch.cat([torch.addcmul(a_s, torch.sigmoid(a_s), b_s, value=2),
                          torch.addcmul(b_r, torch.sigmoid(b_r), a_r, value=2)], dim)

    def prealloc_gate(x: torch.Tensor) -> torch.Tensor:
        a, b = blocks(x)
        out = torch.empty_like(a)
        for diag, cross, part in ((a, b, 0), (b, a, 1)):
            rows = (0, s_out) if part == 0 else (s_out, a.shape[dim] - s_out)
            d, c, o = (t.narrow(dim, *rows) for t in (diag, cross, out))
            torch.addcmul(d, torch.sigmoid(d), c, value=2, out=o)
        return out

    def where_gate(x: torch.Tensor) -> torch.Tensor:
        return _cross_attention(*blocks(x), layer.s_rows, layer.bias_all)

    return {"dense": dense, "nrfx": layer, "where_gate": where_gate, "cat_gate": cat_gate,
            "prealloc_gate": prealloc_gate}


def _cases(device: torch.device, quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, object]]:
    """(name, dense layer, input, functional op) at ResNet-50 / ViT-B sizes (smaller with --quick)."""
    batch = 64 if device.type == "cuda" else (2 if quick else 8)
    side = 14 if quick else 28
    conv3 = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    conv1 = nn.Conv2d(256, 1024, 1, bias=False)
    linear = nn.Linear(768, 3072, bias=False)  # no bias anywhere: the alternatives' gates are written without one
    return [("conv3x3_256", conv3, torch.randn(batch, 256, side, side), None),
            ("conv1x1_256_1024", conv1, torch.randn(batch, 256, side, side), None),
            ("linear_768_3072", linear, torch.randn(batch, 197, 768), F.linear)]


def _step(fn, x: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], object]:
    """One forward + backward of ``fn`` (gradients into ``params`` and the input)."""
    def run() -> object:
        for p in params:
            p.grad = None
        y = fn(x)
        y.backward(torch.ones_like(y))
        return y
    return run


def run(device: torch.device, quick: bool, repeats: int) -> dict:
    """Every case × scheme × variant, inference and training, as times and ratios to dense."""
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": quick, "cases": {}}
    for name, dense, x, op in _cases(device, quick):
        dense, x = dense.to(device), x.to(device)
        cin = x.shape[1] if x.dim() == 4 else x.shape[-1]
        cout = dense.out_channels if hasattr(dense, "out_channels") else dense.out_features
        s_in, s_out = 8 * round(0.6 * cin / 8), 8 * round(0.6 * cout / 8)
        op = F.linear if isinstance(dense, nn.Linear) else (lambda t, w, b, d=dense: d._conv_forward(t, w, b))
        entry = {"input": list(x.shape), "s_in": s_in, "s_out": s_out}
        for scheme, build in (("cr", _cr_variants), ("ca", _ca_variants)):
            variants = build(dense, s_in, s_out, op)
            with torch.no_grad():
                infer = _interleaved({k: (lambda f=f, x=x: f(x)) for k, f in variants.items()}, device, repeats)
            trainable = {k: f for k, f in variants.items() if k != "prealloc_gate"}
            params = [p for f in trainable.values() if isinstance(f, nn.Module) for p in f.parameters()]
            train = _interleaved({k: _step(f, x, params) for k, f in trainable.items()}, device, repeats)
            entry[scheme] = {"inference_s": infer, "training_s": train,
                             "inference_vs_dense": {k: v / infer["dense"] for k, v in infer.items()},
                             "training_vs_dense": {k: v / train["dense"] for k, v in train.items()}}
            print(f"{name:18s} {scheme}  inference " + "  ".join(f"{k} {v:.2f}" for k, v in
                                                                entry[scheme]["inference_vs_dense"].items()),
                  flush=True)
            print(f"{name:18s} {scheme}  training  " + "  ".join(f"{k} {v:.2f}" for k, v in
                                                                entry[scheme]["training_vs_dense"].items()),
                  flush=True)
        results["cases"][name] = entry
    return results


def main(argv: list[str] | None = None) -> None:
    """Command line: run, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        torch.set_num_threads(2)
    data = run(device, args.quick, args.repeats or (3 if args.quick else 9))
    out = args.out or ROOT / "benchmarks" / "results" / f"srlayers_{device.type}.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
