"""Training schemes for layers with S and R channels on both sides (paper Sec. 3.3).

``nr``: the plain widened layer (cross blocks W_S→R, W_R→S trainable from zero).
``cr``: cross connections removed: S_out = W_SS*S_in, R_out = W_RR*R_in (the cross blocks are
not stored: zero, never trained).
``ca``: cross attention (Eq. 9–10): S_out = W_SS*S + 2σ(W_SS*S)·(W_SR*R), and symmetrically.

The layers themselves live in ``nrfx.layers.srlayers`` (torch only; they store their blocks as their
own parameters); this module holds the rewrite passes that remove them before a rewrite
(``densify``) and install them after it (``apply_scheme``).  A layer whose S and R channels are interleaved (a
space made of several atoms) keeps the plain ``nr`` form; the notes say which.
"""

from __future__ import annotations

import torch
from torch import nn

from nrfx.capture.guards import tied_names
from nrfx.layers.srlayers import SR_LAYERS, SRConv1d, SRConv2d, SRConv3d, SRLinear, make_sr, sr_class, to_dense

__all__ = ["apply_scheme", "densify", "SRConv1d", "SRConv2d", "SRConv3d", "SRLinear"]


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


def _replace(gm, name: str, module: nn.Module) -> None:
    """Install ``module`` at ``name`` in the graph module."""
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def densify(gm: nn.Module) -> int:
    """Turn every S/R layer of ``gm`` back into its plain layer (dense weight, zero cross blocks); returns how many.

    The rewrite runs on plain layers: an earlier round's S/R layers are re-split for the new
    plan by ``apply_scheme`` at the end.
    """
    found = [name for name, m in gm.named_modules() if isinstance(m, SR_LAYERS)]
    for name in found:
        _replace(gm, name, to_dense(gm.get_submodule(name)))
    return len(found)


def apply_scheme(gm, analysis, plan, maps) -> list[str]:
    """Give every plain conv/linear with S and R on both sides the plan's scheme; returns notes.

    Runs after ``densify``: every layer is plain here; it becomes an S/R layer holding the blocks
    of the scheme, or stays plain (nr, no R on a side, grouped, interleaved S and R).
    """
    notes: list[str] = []
    converted = 0
    tied = _tied_weights(gm)
    for _, record in analysis.layers("conv", "linear"):
        name = record.module
        if name is None:
            continue
        module = gm.get_submodule(name)
        if sr_class(module) is None or getattr(module, "groups", 1) != 1:
            continue
        if name in tied:
            if plan.scheme != "nr":
                notes.append(f"{name}: its weight is tied to another layer's (S/R blocks are one layer's); kept as nr")
            continue
        pmap = maps.get(f"{name}.weight")
        s_out, s_in = _split(pmap, 0), _split(pmap, 1)
        if plan.scheme == "nr" or s_out is None or s_in is None:
            if plan.scheme != "nr" and pmap is not None and _both_grow(pmap):
                notes.append(f"{name}: S and R channels interleave (several atoms); kept as nr")
            continue
        _replace(gm, name, make_sr(module, plan.scheme, s_in, s_out))
        converted += 1
    if plan.scheme != "nr":
        notes.append(f"scheme {plan.scheme}: {converted} layers split into S/R blocks")
    return notes


def _tied_weights(gm: nn.Module) -> set[str]:
    """Modules whose weight another module holds too (``c3.weight = c2.weight``)."""
    holders = ([name.rpartition(".")[0] for name in group if name.endswith(".weight")]
               for group in tied_names(gm, buffers=False))
    return {path for paths in holders if len(paths) > 1 for path in paths}


def _both_grow(pmap) -> bool:
    """Whether both the output and input dims of a weight have rejuvenated slots."""
    grown = {d.dim for d in pmap.dims if (d.source < 0).any()}
    return {0, 1} <= grown
