"""The op vocabulary states each trait once, and every trait it states holds numerically.

f(0) = 0 for ZERO_KEEPING and f(0) ≠ 0 for ZERO_BREAKING ops, f(s·x) = s·f(x) for HOMOGENEOUS
ones, SPATIAL ops keep the leading dims; and no nrfx module keeps a list of activations of its own.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from nrfx.ops.vocabulary import VOCABULARY, Trait, functions_with, methods_with, modules_with, op_info

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "nrfx"
X = torch.randn(2, 4, 6, 6, 6)  # sliced to the rank an op wants


def _module(kind: type) -> nn.Module:
    """A module of this kind with the smallest arguments it needs (pools: kernel 2, upsampling: × 2)."""
    needs = [p for p in list(inspect.signature(kind.__init__).parameters.values())[1:]
             if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    if kind in (nn.Upsample,):
        return kind(scale_factor=2)
    if kind.__name__.startswith("FractionalMaxPool"):
        return kind(2, output_ratio=0.5)
    return kind(*([2] * len(needs))).eval()


def _input(rank: int | None) -> torch.Tensor:
    """A random input of the rank a 1d / 2d / 3d op takes (batch and channel included)."""
    return X[(slice(None), slice(None)) + (0,) * (3 - rank)] if rank else X[:, :, 0, 0]


def _eval_kwargs(function) -> dict:
    """Dropout functions in eval (``training=False``): the identity the analysis assumes."""
    return {"training": False} if "dropout" in function.__name__ else {}


def _integer(x: torch.Tensor, name: str) -> torch.Tensor:
    """Bitwise ops take integers (``~x``, ``bitwise_not``): x as int64 for them, else x."""
    return x.long() if name in ("invert", "bitwise_not", "bitwise_not_") else x


def _rank(kind: object) -> int | None:
    """1, 2 or 3 for ops named with that suffix, None for rank-free ones."""
    match = re.search(r"([123])d$", getattr(kind, "__name__", ""))
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("kind", modules_with(Trait.ZERO_KEEPING) + modules_with(Trait.ZERO_BREAKING),
                         ids=lambda k: k.__name__)
def test_zero_traits_of_modules_hold(kind):
    module = _module(kind)
    zero = module(torch.zeros_like(_input(_rank(kind))))
    assert bool((zero == 0).all()) == op_info("call_module", None, module).has(Trait.ZERO_KEEPING), kind


@pytest.mark.parametrize("function", functions_with(Trait.ZERO_KEEPING) + functions_with(Trait.ZERO_BREAKING),
                         ids=lambda f: getattr(f, "__name__", str(f)))
def test_zero_traits_of_functions_hold(function):
    zero = torch.zeros_like(_input(_rank(function) or 2))
    zero = function(_integer(zero, getattr(function, "__name__", "")), **_eval_kwargs(function))
    assert bool((zero == 0).all()) == op_info("call_function", function).has(Trait.ZERO_KEEPING), function


@pytest.mark.parametrize("name", methods_with(Trait.ZERO_KEEPING) + methods_with(Trait.ZERO_BREAKING))
def test_zero_traits_of_methods_hold(name):
    if not hasattr(torch.Tensor, name):
        pytest.skip(f"torch.Tensor has no {name} here")
    arguments = {"type_as": (torch.zeros(1),), "type": (torch.float32,), "to": (torch.float32,)}.get(name, ())
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    zero = getattr(_integer(torch.zeros(3, 4), name), name)(*arguments)
    assert bool((zero == 0).all()) == op_info("call_method", name).has(Trait.ZERO_KEEPING), name


@pytest.mark.parametrize("kind", modules_with(Trait.HOMOGENEOUS), ids=lambda k: k.__name__)
def test_homogeneous_modules_commute_with_positive_scales(kind):
    module, x = _module(kind), _input(_rank(kind))
    scale = torch.rand(1, x.shape[1], *[1] * (x.dim() - 2)) + 0.1
    torch.testing.assert_close(module(x * scale), module(x) * scale)


@pytest.mark.parametrize("function", functions_with(Trait.HOMOGENEOUS), ids=lambda f: getattr(f, "__name__", str(f)))
def test_homogeneous_functions_commute_with_positive_scales(function):
    name = function.__name__
    resize = "upsample" in name or "interpolate" in name
    x = _input(_rank(function) or 2)
    arguments = (2,) if "pool" in name else ()
    extra = {"scale_factor": 2} if resize else _eval_kwargs(function)
    scale = torch.rand(1, x.shape[1], *[1] * (x.dim() - 2)) + 0.1
    out = function(x, *arguments, **extra)
    torch.testing.assert_close(function(x * scale, *arguments, **extra), out * scale)


@pytest.mark.parametrize("kind", modules_with(Trait.SPATIAL), ids=lambda k: k.__name__)
def test_spatial_modules_act_on_trailing_dims_only(kind):
    module = _module(kind)
    info = op_info("call_module", None, module)
    x = _input(info.spatial or 2)
    torch.manual_seed(0)  # fractional max pools draw their regions
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape[:2] == x.shape[:2] and out.dim() == x.dim()
    channel = x.clone()
    channel[:, 1] = 0
    torch.manual_seed(0)
    changed = module(channel)
    changed = changed[0] if isinstance(changed, tuple) else changed
    torch.testing.assert_close(changed[:, [0, 2, 3]], out[:, [0, 2, 3]])  # channels do not mix


class _Clamped(nn.Module):
    """conv → BN → an op whose f(0) depends on its numbers → conv."""

    def __init__(self, op) -> None:
        super().__init__()
        self.c1, self.bn, self.c2, self.op = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1), op

    def forward(self, x):
        return self.c2(self.op(self.bn(self.c1(x))))


@pytest.mark.parametrize(("op", "keeps_zero"), [
    (lambda x: torch.clamp(x, min=0.5), False), (lambda x: torch.clamp(x, max=2.0), True),
    (lambda x: x.clamp(-1.0, 1.0), True), (lambda x: x.clamp_min(0.25), False), (lambda x: x.clip(0.1, 0.2), False),
    (lambda x: torch.nn.functional.hardtanh(x, 0.5, 1.0), False), (lambda x: torch.nn.functional.hardtanh(x), True),
    (lambda x: torch.nn.functional.threshold(x, 0.1, 0.7), False),
    (lambda x: torch.nn.functional.threshold(x, -0.1, 0.7), True),
    (nn.Hardtanh(0.5, 1.0), False), (nn.Hardtanh(), True), (nn.ReLU6(), True), (nn.Threshold(0.1, 2.0), False)])
def test_zeros_pass_ops_whose_f0_depends_on_their_numbers_only_when_f0_is_zero(op, keeps_zero):
    """A dead BN channel (γ = β = 0) is dead after clamp(min=0) but a constant 0.5 after clamp(min=0.5): then it
    is alive (removing it would drop c2's response to the constant), and a rewrite keeps the function."""
    import nrfx

    model = _Clamped(op).eval()
    with torch.no_grad():
        model.bn.weight[2] = model.bn.bias[2] = 0
    x = torch.randn(2, 3, 8, 8)
    analysis = nrfx.analyze(model, x, capture="fx")
    alive = analysis.alive(analysis.masks_from(model))
    bn_space = next(i for i, a in enumerate(alive) if a.numel() == 6)
    assert bool(alive[bn_space][2]) is not keeps_zero
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, realloc=False, analysis=analysis)
    torch.testing.assert_close(new(x), model(x))


def test_an_op_in_several_rows_has_the_union_of_their_traits():
    relu = op_info("call_module", None, nn.ReLU())
    assert relu.has(Trait.ZERO_KEEPING | Trait.ACTIVATION | Trait.HOMOGENEOUS)
    assert op_info("call_method", "to").has(Trait.PASS | Trait.CONVERTS)
    assert op_info("call_function", torch.mean).has(Trait.REDUCTION | Trait.LINEAR_POOL)
    assert op_info("call_module", None, nn.Upsample(scale_factor=2)).spatial == 0  # every dim past N, C


def test_a_subclass_that_overrides_forward_has_no_traits():
    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x) + 1

    class Plain(nn.ReLU):
        pass

    assert op_info("call_module", None, Shifted()).traits == Trait.NONE
    assert op_info("call_module", None, Plain()).has(Trait.ZERO_KEEPING)


def test_no_module_keeps_its_own_list_of_activations():
    """Computing with one activation (the S/R layers' sigmoid gate) is a use; naming two is a list."""
    names = [k.__name__ for k in modules_with(Trait.ACTIVATION)] + [
        f.__name__ for f in functions_with(Trait.ACTIVATION) if f.__name__ != "relu"]
    pattern = re.compile(r"\b(?:nn|F|torch)\.(" + "|".join(map(re.escape, names)) + r")\b")
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("vocabulary.py", "aten.py"):  # the table; aten's translation of aten ops to torch ones
            continue
        found = sorted(set(pattern.findall(path.read_text())))
        assert len(found) < 2, f"{path.relative_to(PACKAGE)} lists activations itself: {found}"  # one is a use


def test_every_op_of_the_table_is_reachable_by_lookup():
    for kind in VOCABULARY.modules:
        assert VOCABULARY.modules[kind] is not None
    for function, info in VOCABULARY.functions.items():
        assert op_info("call_function", function) == info
    for name, info in VOCABULARY.methods.items():
        assert op_info("call_method", name) == info


@pytest.mark.parametrize("name", ["TIMM_ZERO_KEEPING", "TIMM_ZERO_BREAKING"])
def test_timm_activation_modules_keep_or_break_zeros_as_registered(name):
    """timm's activation modules (rules for inside a BatchNormAct2d): f(0) = 0 exactly for the zero-keeping ones."""
    pytest.importorskip("timm")
    from nrfx.analysis.rules import timm_layers

    kinds = timm_layers.timm_activations(getattr(timm_layers, name))
    assert kinds
    for kind in kinds:
        zero = kind()(torch.zeros(2, 3))
        assert bool((zero == 0).all()) == (name == "TIMM_ZERO_KEEPING"), kind
