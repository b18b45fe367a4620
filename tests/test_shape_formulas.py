"""Shape formulas (nrfx.capture.shape_formulas) agree with the meta kernels, and decline what they cannot vouch for."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrfx.capture.shape_formulas import function_shape, method_shape, module_shape


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.is_meta and a.shape == b.shape and a.dtype == b.dtype


MODULE_CASES = [
    (nn.Conv2d(4, 6, 3), (meta(2, 4, 9, 7),)),
    (nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1)), (meta(1, 4, 10, 5),)),
    (nn.Conv2d(4, 4, 3, padding="same", groups=4, padding_mode="reflect"), (meta(1, 4, 6, 6),)),
    (nn.Conv1d(3, 5, 4, stride=3, padding="valid"), (meta(3, 11),)),
    (nn.Conv3d(2, 3, 2, stride=2), (meta(1, 2, 5, 6, 7),)),
    (nn.Linear(5, 7), (meta(2, 3, 5),)),
    (nn.BatchNorm2d(4), (meta(2, 4, 3, 3),)),
    (nn.LayerNorm((3, 5)), (meta(2, 3, 5),)),
    (nn.GroupNorm(2, 4), (meta(1, 4, 3),)),
    (nn.ReLU(inplace=True), (meta(2, 3),)),
    (nn.GELU(), (meta(2, 3),)),
    (nn.Dropout(0.3), (meta(2, 3),)),
    (nn.MaxPool2d(3, 2, 1), (meta(1, 2, 112, 111),)),
    (nn.MaxPool2d(3, 2, ceil_mode=True), (meta(1, 2, 14, 13),)),
    (nn.MaxPool2d(2, 2, dilation=2, ceil_mode=True), (meta(1, 2, 9, 9),)),
    (nn.AvgPool2d(2, 2, ceil_mode=True, padding=1), (meta(1, 2, 7, 8),)),
    (nn.AvgPool1d(3), (meta(1, 2, 10),)),
    (nn.AdaptiveAvgPool2d((None, 3)), (meta(1, 2, 7, 8),)),
    (nn.AdaptiveAvgPool2d(1), (meta(2, 5, 7, 8),)),
    (nn.Flatten(), (meta(2, 3, 4),)),
]


@pytest.mark.parametrize(("module", "args"), MODULE_CASES, ids=lambda v: type(v).__name__)
def test_module_formula_matches_the_meta_kernel(module, args):
    """The formula's output equals the module run on meta tensors."""
    module = module.to("meta")
    assert _same(module_shape(module, args, {}), module(*args))


def test_multihead_attention_formula():
    """MultiheadAttention without weights: the output is shaped as the query, weights are None."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True).to("meta")
    q, kv = meta(2, 5, 8), meta(2, 7, 8)
    out, weights = module_shape(mha, (q, kv, kv), {"need_weights": False})
    expected, _ = mha(q, kv, kv, need_weights=False)
    assert _same(out, expected) and weights is None
    assert module_shape(mha, (q, kv, kv), {}) is None  # weights asked for: the kernel runs


FUNCTION_CASES = [
    (operator.add, (meta(2, 1, 4), meta(3, 1))),
    (operator.mul, (meta(2, 3), 2.5)),
    (operator.truediv, (3, meta(4))),
    (operator.iadd, (meta(2, 3), meta(3))),
    (torch.cat, ([meta(1, 2, 3), meta(1, 5, 3)], 1)),
    (torch.cat, ([meta(2, 3), meta(4, 3)],)),
    (operator.matmul, (meta(2, 1, 3, 4), meta(5, 4, 6))),
    (torch.bmm, (meta(2, 3, 4), meta(2, 4, 5))),
    (F.scaled_dot_product_attention, (meta(1, 2, 5, 8), meta(1, 2, 7, 8), meta(1, 2, 7, 3))),
    (F.softmax, (meta(2, 3), -1)),
    (F.layer_norm, (meta(2, 3, 4), (4,))),
    (F.leaky_relu, (meta(2, 3), 0.2)),
    (torch.sigmoid, (meta(2, 3),)),
    (torch.pow, (meta(2, 3), 3)),
    (operator.pow, (meta(2, 3), 0.5)),
    (torch.addmm, (meta(6), meta(4, 5), meta(5, 6))),
    (torch.masked_fill, (meta(2, 3, 4), meta(2, 1, 4, dtype=torch.bool), 0.0)),
]


@pytest.mark.parametrize(("fn", "args"), FUNCTION_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_function_formula_matches_the_meta_kernel(fn, args):
    """The formula's output equals the function run on meta tensors."""
    assert _same(function_shape(fn, args, {}), fn(*args))


def test_method_formulas_match_the_meta_kernel():
    """Tensor methods: add_ keeps the receiver's shape, softmax and matmul as their functions."""
    x, y = meta(2, 3), meta(3)
    assert _same(method_shape("add_", (x, y), {}), x.clone().add_(y))
    assert _same(method_shape("softmax", (x, 1), {}), x.softmax(1))
    assert _same(method_shape("matmul", (x, meta(3, 4)), {}), x @ meta(3, 4))
    assert _same(method_shape("pow", (x, 2), {}), x.pow(2))
    mask = meta(1, 3, dtype=torch.bool)
    assert _same(method_shape("masked_fill", (x, mask, 1.0), {}), x.masked_fill(mask, 1.0))


DECLINED = [
    (nn.Conv2d(4, 6, 3), (meta(1, 5, 9, 9),), "wrong channel count: the kernel raises the real error"),
    (nn.Conv2d(4, 6, 5), (meta(1, 4, 3, 3),), "input smaller than the kernel"),
    (nn.Linear(5, 7), (meta(2, 4),), "wrong feature count"),
    (nn.BatchNorm2d(4), (meta(2, 3, 3, 3),), "wrong channel count"),
    (nn.LayerNorm(3), (meta(2, 4),), "normalised shape does not match"),
    (nn.ReLU(), (meta(2, 3, dtype=torch.int64),), "integer tensor"),
    (nn.MaxPool2d(2, return_indices=True), (meta(1, 2, 4, 4),), "returns indices"),
]


@pytest.mark.parametrize(("module", "args", "why"), DECLINED, ids=[c[2] for c in DECLINED])
def test_module_formula_declines(module, args, why):
    """A case the formula cannot vouch for returns None, so the meta kernel runs (and raises)."""
    assert module_shape(module.to("meta"), args, {}) is None


@pytest.mark.parametrize(("fn", "args"), [
    (operator.add, (meta(2, 3), meta(4))),  # does not broadcast
    (operator.add, (meta(2, 3), meta(3, dtype=torch.float64))),  # promotion left to the kernel
    (operator.iadd, (meta(3), meta(2, 3))),  # in-place result would have to grow
    (torch.cat, ([meta(1, 2, 3), meta(1, 5, 4)], 1)),  # other dims differ
    (torch.bmm, (meta(2, 3, 4), meta(1, 4, 5))),  # bmm does not broadcast
    (operator.matmul, (meta(3, 4), meta(5, 6))),  # inner sizes differ
    (F.softmax, (meta(2, 3),)),  # implicit dim
    (torch.pow, (meta(2, 3), meta(3))),  # a tensor exponent: broadcasting and promotion left to the kernel
    (torch.pow, (2, meta(3))),  # a number base
    (torch.addmm, (meta(6), meta(4, 5), meta(4, 6))),  # inner sizes differ
    (torch.addmm, (meta(5), meta(4, 5), meta(5, 6))),  # the bias does not broadcast to the output
    (torch.masked_fill, (meta(2, 3), meta(4, 2, 3, dtype=torch.bool), 0.0)),  # the mask would grow the result
    (torch.masked_fill, (meta(2, 3), meta(2, 3), 0.0)),  # a float mask: the kernel raises
])
def test_function_formula_declines(fn, args):
    """Mismatched or ambiguous calls are left to the meta kernel."""
    assert function_shape(fn, args, {}) is None


def test_subclass_with_its_own_forward_gets_no_formula():
    """A Conv2d subclass overriding forward (timm's Conv2dSame) is not assumed to be a plain conv."""

    class Odd(nn.Conv2d):
        def forward(self, x):
            return super().forward(x).flatten(1)

    assert module_shape(Odd(2, 2, 1).to("meta"), (meta(1, 2, 3, 3),), {}) is None
