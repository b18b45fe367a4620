"""The ``nrfx`` command line: ``nrfx report MODEL`` prints channels, params and MACs per layer.

Errors nrfx knows about (bad model name, untraceable model, bad masks, ...) print one line
``nrfx: error: ...`` on stderr and exit with status 2; nrfx warnings print as
``nrfx: warning: ...``.  Subcommands live in their own functions, registered in ``COMMANDS``.
``--json -`` writes the JSON to stdout and everything else the command prints to stderr, so
that stdout stays one JSON document (``nrfx report resnet50 --json - | jq .totals``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import torch

from nrfx.errors import MaskError, NrfxError, ShapeError

if TYPE_CHECKING:
    from nrfx.plan.planner import Budget

__all__ = ["COMMANDS", "build_parser", "main", "parse_input_size"]

EXIT_ERROR = 2

# name -> (add arguments to its subparser, run it and return the exit status)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]
            ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register a subcommand: its argument setup and its runner."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (add_arguments, run)
        return run

    return register


def parse_input_size(tokens: Sequence[str], batch: int) -> tuple[int, ...]:
    """Input shape from ``C H W`` (batch from ``--batch``) or ``1,3,224,224`` (batch included)."""
    text = " ".join(tokens).strip()
    try:
        if "," in text:
            shape = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
        else:
            shape = (batch, *(int(t) for t in text.split()))
    except ValueError:
        raise NrfxError(f"--input-size '{text}' is not a list of integers; write C H W (e.g. 3 224 224) "
                        "or the full shape with commas (e.g. 1,3,224,224)") from None
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise NrfxError(f"--input-size gives shape {shape}; write C H W (e.g. 3 224 224) "
                        "or the full shape with commas (e.g. 1,3,224,224)")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise NrfxError(f"--input-size {shape} is {math.prod(shape):,} elements, over {MAX_INPUT_ELEMENTS:,}: "
                        "the analysis needs one real example; give a smaller size (e.g. 3 224 224)")
    return shape


MAX_INPUT_ELEMENTS = 1 << 27  # 512 MiB of float32: one example input the CLI builds


def _check_out_path(path: Path | None, what: str) -> None:
    """An output file the work can end in: not a folder, its folder exists and is writable (checked first)."""
    if path is None or str(path) == "-":
        return
    if path.is_dir():
        raise NrfxError(f"{what} {path} is a folder; name a file in it (e.g. {path / 'out.pt'})")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NrfxError(f"{what} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise NrfxError(f"{what} {path} is not writable; choose another path")


def _positive_width(text: str) -> int:
    """--width: a table width of at least 40 characters."""
    try:
        width = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if width < 40:
        raise argparse.ArgumentTypeError(f"{width} is too narrow for the table; use 40 or more")
    return width


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nrfx report``."""
    parser.add_argument("model", help="torchvision name (resnet50), timm name, or package.module:factory")
    parser.add_argument("--input-size", nargs="+", metavar="N",
                        help="C H W without the batch dim, or the full shape 1,3,224,224 "
                             "(default: the crop size of the model's weights, else 3 224 224)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    parser.add_argument("--masks", type=Path, metavar="FILE",
                        help="torch.save'd dict {module_name: BoolTensor} (True = alive); replaces the "
                             "masks read from the norm scales")
    parser.add_argument("--threshold", type=float, default=0.01,
                        help="a channel is dead when |γ| < T·max|γ| of its norm (default 0.01)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the report as JSON to PATH; '-' writes it to stdout and the table "
                             "and totals to stderr")
    parser.add_argument("--width", type=_positive_width, default=None,
                        help="table width in characters, at least 40 (default: the terminal's, else 150)")
    parser.add_argument("--weights", type=Path, metavar="FILE",
                        help="a state dict for the named model (torch.save'd, loaded with weights_only=True); "
                             "default: random initial weights")
    parser.add_argument("--add-gates", action="store_true",
                        help="first insert an nrfx.Gate in every free channel space without a norm scale "
                             "(nrfx.add_gates): transformer and ConvNeXt MLPs get a liveliness signal")
    parser.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                        help="how the model becomes a graph: fx tracing, torch.export, or auto (fx, then "
                             "torch.export when fx cannot trace the root; default)")


def _gated(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """--add-gates: the model with a gate in every free space without a signal (nrfx.add_gates), else as it is."""
    if not getattr(args, "add_gates", False):
        return model
    from nrfx.rewrite.gating import add_gates

    gated = add_gates(model, x)
    print(f"add_gates: {len(gated.nrfx_gates)} gates added", file=_text_stream(args))
    return gated


def _load_masks(path: Path) -> dict[str, torch.Tensor]:
    """Read a torch.save'd mask dict (tensors only: loaded with weights_only=True)."""
    try:
        masks = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MaskError(f"mask file '{path}' does not exist") from None
    except Exception as error:
        raise MaskError(f"cannot read mask file '{path}': {error}; save it with "
                        "torch.save({'layer.name': bool_tensor, ...}, path)") from error
    if not isinstance(masks, dict):
        raise MaskError(f"mask file '{path}' holds a {type(masks).__name__}, not a dict "
                        "{module_name: BoolTensor}")
    return masks


def _text_stream(args: argparse.Namespace) -> TextIO:
    """Rule: the human-readable output goes to stdout, or to stderr when ``--json -`` takes stdout."""
    return sys.stderr if _json_to_stdout(args) else sys.stdout


def _json_to_stdout(args: argparse.Namespace) -> bool:
    """Whether ``--json -`` was given."""
    return getattr(args, "json", None) is not None and str(args.json) == "-"


def _write_json(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``--json PATH`` (stdout for ``-``); nothing without ``--json``."""
    if args.json is None:
        return
    text = json.dumps(data, indent=1) + "\n"
    if _json_to_stdout(args):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    args.json.write_text(text)
    print(f"wrote {args.json}", file=_text_stream(args))


@command("report", _add_report_arguments)
def run_report(args: argparse.Namespace) -> int:
    """``nrfx report``: build the model, analyse it and print the per-layer table and totals."""
    from nrfx.analysis.front import analyze
    from nrfx.models import default_input_size, resolve_model
    from nrfx.report import LEGEND

    if args.batch < 1:
        raise NrfxError(f"--batch must be at least 1, got {args.batch}")
    masks = _load_masks(args.masks) if args.masks else None  # fail fast, before building the model
    _check_out_path(args.json, "--json")
    model = _built(args, resolve_model)
    size = args.input_size or [str(d) for d in default_input_size(args.model, model)]
    shape = parse_input_size(size, args.batch)
    model = _gated(args, model, torch.zeros(shape))
    analysis = analyze(model, torch.zeros(shape), capture=args.capture)
    if masks is None:  # masks read from γ; a --masks file replaces them
        masks = analysis.masks_from(model, args.threshold)
    report = analysis.report(masks)
    out = _text_stream(args)
    print(report.table(args.width or _terminal_width()), file=out)
    print(report.summary(), file=out)
    print(_weights_line(args), LEGEND, sep="\n", file=out)
    _write_json(args, report.to_dict())
    return 0


def _add_rejuvenate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``nrfx rejuvenate``: those of report, plus budget, scheme and output."""
    _add_report_arguments(parser)
    parser.add_argument("--budget", default="params",
                        help="params|macs[=VALUE|=Fx]: the kind of budget and its absolute value, or F times "
                             "the model's own cost (macs=1.2x) "
                             "(default: the model's own cost c(A) in that kind)")
    parser.add_argument("--scheme", choices=("nr", "cr", "ca"), default="nr",
                        help="nr: cross connections kept; cr: removed; ca: cross attention")
    parser.add_argument("--rescale", action="store_true", help="neural rescaling of small norm scales")
    parser.add_argument("--gamma0", type=_gamma0, default=None, metavar="VALUE|match",
                        help="γ of rejuvenated norm channels: a number, or 'match' (per norm, the median |γ| of "
                             "its survivors); default: the layer's initial value")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rejuvenated channels' initialisation")
    parser.add_argument("--align", type=int, default=8,
                        help="resized widths (and their S and R parts) stay multiples of this; 1: the paper's "
                             "exact allocation (default 8: tensor-core friendly)")
    parser.add_argument("--constants", choices=("drop", "keep"), default="drop",
                        help="dead channels whose constant output cannot be folded exactly (zero padding, gates): "
                             "drop (the paper; warned with the measured change) or keep (exact, counted in the budget)")
    parser.add_argument("--residual", choices=("rejuvenate", "keep"), default="rejuvenate",
                        help="residual streams (spaces where an add joins two branches): rejuvenate them like every "
                             "layer (default) or keep every channel at its width (the paper's ResNet setting)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write {'plan': plan dict, 'state_dict': ...} with torch.save (weights_only-loadable); "
                             "without it, a dry run: each resized layer's old -> new width is printed")


def _gamma0(text: str) -> float | str:
    """--gamma0: 'match' or a number."""
    if text == "match":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'match'") from None


def parse_budget(text: str) -> Budget:
    """'params', 'macs', 'params=123', 'macs=4.1e9', 'macs=1.2x' (× the model's cost) -> nrfx.Budget ('flops' read)."""
    from nrfx.plan.planner import Budget

    kind, _, value = text.partition("=")
    kind = "macs" if kind == "flops" else kind
    if kind not in ("params", "macs"):
        raise NrfxError(f"--budget {text!r}: write params, macs, params=N, macs=N or macs=F x (e.g. macs=1.2x)")
    if not value:
        return Budget.fraction(1.0, kind)
    fraction = value.endswith("x")
    try:
        number = float(value[:-1] if fraction else value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise NrfxError(f"--budget {text!r}: {value!r} is not a finite number")
    if fraction:
        return Budget.fraction(number, kind)
    if not number.is_integer():
        raise NrfxError(f"--budget {text!r}: {value} is not a whole number of {kind}; for a multiple of the "
                        f"model's own cost write {kind}={value}x")
    return Budget.of(kind, int(number))


@command("rejuvenate", _add_rejuvenate_arguments)
def run_rejuvenate(args: argparse.Namespace) -> int:
    """``nrfx rejuvenate``: rewrite the model under a budget and print the before/after report."""
    from nrfx.analysis.front import analyze
    from nrfx.models import default_input_size, resolve_model
    from nrfx.rewrite.rejuvenate import rejuvenate

    budget = parse_budget(args.budget)
    _check_out_path(args.out, "--out")
    _check_out_path(args.json, "--json")
    masks = _load_masks(args.masks) if args.masks else None
    model = _built(args, resolve_model)
    size = args.input_size or [str(d) for d in default_input_size(args.model, model)]
    # seeded random inputs: the constants of removed channels are measured on them (all zeros would make
    # almost every channel look constant); only that measurement depends on the values
    x = torch.randn(parse_input_size(size, args.batch), generator=torch.Generator().manual_seed(0))
    model = _gated(args, model, x)
    before = analyze(model, x, capture=args.capture)
    if masks is None:
        masks = before.masks_from(model, args.threshold)
    out = _text_stream(args)
    before_report = before.report(masks)
    print("before:", before_report.summary(), sep="\n", file=out)
    new = rejuvenate(model, masks, budget, example_inputs=x, scheme=args.scheme, rescale=args.rescale,
                     gamma0=args.gamma0, seed=args.seed, align=args.align, constants=args.constants,
                     residual=args.residual, analysis=before)
    after = analyze(new, x, capture=args.capture).report()
    print("after:", after.summary(), sep="\n", file=out)
    plan = new.nrfx_plan
    print(f"budget {plan.budget_kind} {plan.budget:,}: cost {plan.cost_before:,} -> live {plan.cost_live:,} "
          f"-> {plan.cost_after:,} (alpha {plan.alpha:.4f})", file=out)
    for note in plan.notes:
        print("note:", note, file=out)
    print(_weights_line(args), file=out)
    if args.out is None:
        kept, grown = sum(len(k) for k in plan.keep), sum(plan.grow)
        print(f"dry run (no --out): {sum(plan.widths) - kept:,} channels removed, {grown:,} new; resized layers, "
              "old -> new width:", file=out)
        for line in _resized_layers(model, new) or ["(none: every layer keeps its width, re-initialised inside)"]:
            print(" ", line, file=out)
    else:
        torch.save({"plan": plan.to_dict(), "state_dict": new.state_dict()}, args.out)
        print(f"wrote {args.out}", file=out)
    _write_json(args, {"before": before_report.to_dict(), "after": after.to_dict(), "plan": plan.to_dict()})
    return 0


def _built(args: argparse.Namespace, resolve_model: Callable[[str], torch.nn.Module]) -> torch.nn.Module:
    """The named model in eval mode, with ``--weights`` loaded into it when given (weights_only=True)."""
    model = resolve_model(args.model).eval()
    if getattr(args, "weights", None) is None:
        return model
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except FileNotFoundError:
        raise NrfxError(f"--weights {args.weights}: no such file") from None
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        raise NrfxError(f"--weights {args.weights} does not load into {args.model}: "
                        f"{text[:300] + '…' if len(text) > 300 else text}") from error
    return model


def _weights_line(args: argparse.Namespace) -> str:
    """Where the weights came from: a file, or random initial weights (γ = 1: nothing is dead yet)."""
    if getattr(args, "weights", None) is not None:
        return f"weights: {args.weights}"
    return "weights: random init (no --weights): every norm scale starts at 1, so nothing is dead yet"


def _resized_layers(model: torch.nn.Module, new: torch.nn.Module) -> list[str]:
    """``name: in a -> b, out c -> d`` for every conv/linear/norm whose widths the rewrite changed."""
    before, lines = dict(model.named_modules()), []
    for name, module in new.named_modules():
        old = before.get(name)
        pairs = [(a, b) for a, b in (("in_channels", "out_channels"), ("in_features", "out_features"),
                                     ("num_features", "num_features")) if hasattr(module, a)]
        if old is None or not pairs:
            continue
        a, b = pairs[0]
        if (getattr(old, a), getattr(old, b)) != (getattr(module, a), getattr(module, b)):
            lines.append(f"{name}: in {getattr(old, a)} -> {getattr(module, a)}, out {getattr(old, b)} -> "
                         f"{getattr(module, b)}")
    return lines


def _terminal_width() -> int:
    """The terminal's width (150 when not a terminal), at least 40."""
    return max(40, shutil.get_terminal_size((150, 24)).columns)


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``nrfx report: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        """One line on stderr, then exit 2 (``--help`` still prints the usage)."""
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    parser = _OneLineParser(prog="nrfx", description="Neural Rejuvenation for any PyTorch model.")
    parser.add_argument("--version", action="version", version=f"nrfx {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=_OneLineParser)
    for name, (add_arguments, run) in COMMANDS.items():
        doc = _plain(run.__doc__.strip().splitlines()[0]) if run.__doc__ else None
        sub = subparsers.add_parser(name, help=doc, description=doc)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def _version() -> str:
    """The installed nrfx's version (the package metadata), or 'unknown' outside an install."""
    try:
        return importlib.metadata.version("nrfx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _plain(text: str) -> str:
    """Rule: help text is plain text; a docstring's RST literals (double backticks) lose their markup."""
    return text.replace("``", "")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print warnings as one ``nrfx: warning:`` line."""
    print(f"nrfx: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nrfx`` command line; returns the exit status (2 on an nrfx error)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.run(args)
        except NrfxError as error:
            print(f"nrfx: error: {_one_line(error)}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as error:
            print(f"nrfx: error: {error}", file=sys.stderr)
            return EXIT_ERROR


def _one_line(error: NrfxError) -> str:
    """An error as one line; a shape error points at ``--input-size`` (the CLI's way to give the input)."""
    if isinstance(error, ShapeError):
        first = str(error).splitlines()[0]
        return f"{first}; give the model's input shape with --input-size C H W (or N,C,H,W)"
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
