"""Training schemes for layers with S and R channels on both sides (paper Sec. 3.3).

``nr``: the plain widened layer (cross blocks W_S→R, W_R→S trainable from zero).
``cr``: cross connections removed: S_out = W_SS*S_in, R_out = W_RR*R_in, two convolutions on
slices of the one weight (the cross blocks are never computed and stay zero).
``ca``: cross attention (Eq. 9–10): S_out = W_SS*S + 2σ(W_SS*S)·(W_RS*R), and symmetrically,
with two convolutions (one per input block, each producing all output rows).

The layers themselves live in ``nrfx.srlayers`` (torch only); this module is the rewrite pass
that installs them.  A layer keeps its parameter names (``weight``, ``bias``), so state_dicts, optimizer state
and the plan's parameter map stay valid.  A layer whose S and R channels are interleaved (a
space made of several atoms) keeps the plain ``nr`` form; the notes say which.
"""

from __future__ import annotations

import torch
from torch import nn

from .srlayers import SR_CLASSES, SRConv1d, SRConv2d, SRConv3d, SRLinear

__all__ = ["apply_scheme", "SRConv1d", "SRConv2d", "SRConv3d", "SRLinear"]


def _split(pmap, dim: int) -> int | None:
    """Number of S slots when a dim is ordered [S…, R…] with both present, else None."""
    m = next((d for d in pmap.dims if d.dim == dim), None) if pmap is not None else None
    if m is None:
        return None
    rejuvenated = (m.source < 0).to(torch.int8)
    s = int((rejuvenated == 0).sum())
    if s == 0 or s == rejuvenated.numel() or bool(rejuvenated[:s].any()):
        return None
    return s


_BASE = {sr: base for base, sr in SR_CLASSES.items()}


def _convert(module: nn.Module, cls: type, **attrs) -> nn.Module:
    """The same layer (same parameters, same names) as an instance of ``cls``."""
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new.__dict__["_parameters"] = dict(module._parameters)
    for key in ("scheme", "s_in", "s_out"):
        new.__dict__.pop(key, None)
    new.__dict__.update(attrs)
    return new


def _replace(gm, name: str, module: nn.Module) -> None:
    """Install ``module`` at ``name`` in the graph module."""
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def apply_scheme(gm, analysis, plan, maps) -> list[str]:
    """Give every plain conv/linear with S and R on both sides the plan's scheme; returns notes.

    Layers split by an earlier round are re-split for this plan's S/R borders (or turned back
    into plain layers when the scheme is nr or the layer has no R any more).
    """
    notes: list[str] = []
    converted = 0
    for _, record in analysis.layers("conv", "linear"):
        name = record.module
        if name is None:
            continue
        module = gm.get_submodule(name)
        base = _BASE.get(type(module), type(module))
        if base not in SR_CLASSES or getattr(module, "groups", 1) != 1:
            continue
        pmap = maps.get(f"{name}.weight")
        s_out, s_in = _split(pmap, 0), _split(pmap, 1)
        if plan.scheme == "nr" or s_out is None or s_in is None:
            if plan.scheme != "nr" and pmap is not None and _both_grow(pmap):
                notes.append(f"{name}: S and R channels interleave (several atoms); kept as nr")
            if base is not type(module):
                _replace(gm, name, _convert(module, base))
            continue
        _replace(gm, name, _convert(module, SR_CLASSES[base], scheme=plan.scheme, s_in=s_in, s_out=s_out))
        converted += 1
    if plan.scheme != "nr":
        notes.append(f"scheme {plan.scheme}: {converted} layers split into S/R blocks")
    return notes


def _both_grow(pmap) -> bool:
    """Whether both the output and input dims of a weight have rejuvenated slots."""
    grown = {d.dim for d in pmap.dims if (d.source < 0).any()}
    return {0, 1} <= grown
