"""One vocabulary of op traits: what nrfx may assume of an op, read by every pass that asks.

Each row names a set of ops (module types, functions, tensor-method names) and the traits they
share; an op listed in several rows has the union.  The channel rules (``analysis/rules/elementwise.py``,
``analysis/rules/movement.py``), the shape formulas, the gate placement and fold (``rewrite/gating.py``) and
neural rescaling (``rewrite/rescale.py``) read their op lists from here, so a trait is stated once:

======================  ==============================================================
``ZERO_KEEPING``        channel-wise unary with f(0) = 0: a dead channel stays dead
``ZERO_BREAKING``       channel-wise unary with f(0) ≠ 0 (sigmoid, exp): zeros are lost
``ZERO_BY_ARGS``        channel-wise unary whose f(0) depends on its numbers (clamp, hardtanh, threshold)
``CONVERTS``            channel-wise, but may change dtype or device (``to``, ``half``)
``ACTIVATION``          a nonlinearity a gate may follow (``add_gates``)
``PASS``                the value passes unchanged in eval (identity, dropout, clone)
``HOMOGENEOUS``         f(s·x) = s·f(x) per channel for every s > 0 (neural rescaling)
``SPATIAL``             acts on trailing dims only (pools, resizing, padding): ``spatial`` of them
``LINEAR_POOL``         each output mixes one channel's elements linearly (avg pools, resize, sum)
``MAX_POOL``            each output is a max over one channel's elements (commutes with a gate ≥ 0)
``REDUCTION``           reduces over the dims its arguments name (``sum``, ``mean``, ``amax``)
======================  ==============================================================
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from nrfx.ops.optable import OpTable

__all__ = ["Trait", "OpInfo", "VOCABULARY", "op_info", "node_info", "modules_with", "functions_with",
           "methods_with"]


class Trait(enum.Flag):
    """What may be assumed of an op, per channel (see the module docstring)."""

    NONE = 0
    ZERO_KEEPING = enum.auto()
    ZERO_BREAKING = enum.auto()
    ZERO_BY_ARGS = enum.auto()
    CONVERTS = enum.auto()
    ACTIVATION = enum.auto()
    PASS = enum.auto()
    HOMOGENEOUS = enum.auto()
    SPATIAL = enum.auto()
    LINEAR_POOL = enum.auto()
    MAX_POOL = enum.auto()
    REDUCTION = enum.auto()


@dataclass(frozen=True)
class OpInfo:
    """The traits of one op; ``spatial``: how many trailing dims a SPATIAL op acts on (0: all past N and C)."""

    traits: Trait = Trait.NONE
    spatial: int | None = None

    def has(self, trait: Trait) -> bool:
        """Whether the op has every trait in ``trait``."""
        return trait in self.traits

    def __or__(self, other: OpInfo) -> OpInfo:
        return OpInfo(self.traits | other.traits, self.spatial if other.spatial is None else other.spatial)


T = Trait
KEEP_ACT = T.ZERO_KEEPING | T.ACTIVATION
RELU = KEEP_ACT | T.HOMOGENEOUS
IDENTITY = T.ZERO_KEEPING | T.PASS | T.HOMOGENEOUS
AVG = T.SPATIAL | T.LINEAR_POOL | T.HOMOGENEOUS
MAX = T.SPATIAL | T.MAX_POOL | T.HOMOGENEOUS

# (traits, spatial dims, module types, functions, method names)
_ROWS: tuple[tuple[Trait, int | None, tuple, tuple, tuple], ...] = (
    (RELU, None, (nn.ReLU,), (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")),
    (KEEP_ACT, None,
     (nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh),
     (F.relu6, F.leaky_relu, F.leaky_relu_, F.rrelu, F.rrelu_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish,
      F.hardswish, F.tanh, torch.tanh),
     ("tanh", "tanh_", "silu", "gelu")),
    (T.ZERO_BY_ARGS | T.ACTIVATION, None, (nn.Hardtanh,), (F.hardtanh, F.hardtanh_), ("hardtanh_",)),
    (T.ZERO_BY_ARGS, None, (nn.Threshold,), (F.threshold, torch.clamp, torch.clip),
     ("clamp", "clamp_", "clip", "clamp_min", "clamp_min_", "clamp_max")),
    (T.ZERO_KEEPING, None, (nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.AlphaDropout,
                            nn.FeatureAlphaDropout),
     (F.softsign, F.tanhshrink, F.alpha_dropout, torch.abs, torch.neg, torch.sin, torch.square, torch.sqrt, torch.erf,
      torch.nan_to_num, torch.sign, torch.sgn, torch.ceil, torch.floor, torch.round, torch.trunc, torch.tan,
      torch.atan, torch.sinh, torch.asinh, torch.expm1, torch.log1p),
     ("abs", "abs_", "neg", "neg_", "sqrt", "square", "sin", "erf", "sign", "sgn", "ceil", "floor", "round", "trunc",
      "tan", "atan", "sinh", "asinh", "expm1", "log1p")),
    (IDENTITY, None, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d),
     (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone), ("clone", "contiguous", "detach",
                                                                        "requires_grad_")),
    (T.ZERO_KEEPING | T.PASS | T.CONVERTS, None, (), (),
     ("to", "type", "float", "double", "half", "bfloat16", "cpu", "cuda", "type_as", "long", "int", "short", "bool",
      "byte", "char")),
    (T.ZERO_BREAKING | T.ACTIVATION, None, (nn.Sigmoid, nn.Hardsigmoid), (F.sigmoid, torch.sigmoid, F.hardsigmoid),
     ("sigmoid", "sigmoid_")),
    (T.ZERO_BREAKING, None, (nn.Softplus, nn.LogSigmoid),
     (F.softplus, F.logsigmoid, torch.exp, torch.cos, torch.log, torch.rsqrt, torch.reciprocal, torch.erfc,
      torch.special.expit, torch.cosh, torch.exp2, torch.sinc, torch.log2, torch.log10, torch.bitwise_not,
      torch.logical_not, operator.invert),
     ("exp", "exp_", "cos", "log", "rsqrt", "reciprocal", "erfc", "cosh", "exp2", "sinc", "log2", "log10",
      "bitwise_not", "bitwise_not_", "logical_not", "logical_not_")),
    (T.ACTIVATION, None, (nn.PReLU,), (), ()),
    (MAX, 1, (nn.MaxPool1d, nn.AdaptiveMaxPool1d), (F.max_pool1d, F.adaptive_max_pool1d), ()),
    (MAX, 2, (nn.MaxPool2d, nn.AdaptiveMaxPool2d), (F.max_pool2d, F.adaptive_max_pool2d), ()),
    (MAX, 3, (nn.MaxPool3d, nn.AdaptiveMaxPool3d), (F.max_pool3d, F.adaptive_max_pool3d), ()),
    # return_indices=True: (values, indices), fx records these; the values are a max pooling's
    (T.SPATIAL, 1, (), (F.max_pool1d_with_indices, F.adaptive_max_pool1d_with_indices), ()),
    (T.SPATIAL, 2, (), (F.max_pool2d_with_indices, F.adaptive_max_pool2d_with_indices), ()),
    (T.SPATIAL, 3, (), (F.max_pool3d_with_indices, F.adaptive_max_pool3d_with_indices), ()),
    (AVG, 1, (nn.AvgPool1d, nn.AdaptiveAvgPool1d), (F.avg_pool1d, F.adaptive_avg_pool1d), ()),
    (AVG, 2, (nn.AvgPool2d, nn.AdaptiveAvgPool2d), (F.avg_pool2d, F.adaptive_avg_pool2d), ()),
    (AVG, 3, (nn.AvgPool3d, nn.AdaptiveAvgPool3d), (F.avg_pool3d, F.adaptive_avg_pool3d), ()),
    (AVG, 0, (nn.Upsample,), (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), ()),
    (T.SPATIAL, 1, (nn.LPPool1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d), (F.lp_pool1d,), ()),
    (T.SPATIAL, 2, (nn.LPPool2d, nn.FractionalMaxPool2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
                    nn.CircularPad2d), (F.lp_pool2d,), ()),
    (T.SPATIAL, 3, (nn.LPPool3d, nn.FractionalMaxPool3d, nn.ReflectionPad3d, nn.ReplicationPad3d, nn.CircularPad3d),
     (F.lp_pool3d,), ()),
    (T.REDUCTION | T.LINEAR_POOL, None, (), (torch.sum, torch.mean), ("sum", "mean")),
    (T.REDUCTION | T.MAX_POOL, None, (), (torch.amax,), ("amax",)),
    (T.REDUCTION, None, (), (torch.amin, torch.std, torch.var, torch.logsumexp, torch.prod),
     ("amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean")),
    (T.ZERO_KEEPING, None, (), (operator.neg, operator.pos), ()),
)


def _build() -> OpTable[OpInfo]:
    """The table: one OpInfo per op, the union of the rows that list it."""
    table: OpTable[OpInfo] = OpTable("op vocabulary")
    for traits, spatial, modules, functions, methods in _ROWS:
        info = OpInfo(traits, spatial)
        for store, keys in ((table.modules, modules), (table.functions, functions), (table.methods, methods)):
            for key in keys:
                store[key] = store[key] | info if key in store else info
    return table


VOCABULARY = _build()
_NOTHING = OpInfo()


def op_info(op: str, target: object, module: nn.Module | None = None) -> OpInfo:
    """The traits of an op (``op``, ``target`` as in an fx node; the called module for call_module)."""
    return VOCABULARY.lookup(op, target, module) or _NOTHING


def node_info(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpInfo:
    """The traits of an fx node's op (nothing for placeholders, outputs, attributes)."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return op_info(node.op, node.target, module)


def _with(store: dict, trait: Trait, without: Trait) -> tuple:
    """The keys of a store whose op has every trait in ``trait`` and none in ``without``."""
    return tuple(key for key, info in store.items() if info.has(trait) and not (info.traits & without))


def modules_with(trait: Trait, without: Trait = Trait.NONE) -> tuple[type, ...]:
    """Module types with ``trait`` (and none of ``without``)."""
    return _with(VOCABULARY.modules, trait, without)


def functions_with(trait: Trait, without: Trait = Trait.NONE) -> tuple:
    """Functions with ``trait`` (and none of ``without``)."""
    return _with(VOCABULARY.functions, trait, without)


def methods_with(trait: Trait, without: Trait = Trait.NONE) -> tuple[str, ...]:
    """Tensor-method names with ``trait`` (and none of ``without``)."""
    return _with(VOCABULARY.methods, trait, without)
