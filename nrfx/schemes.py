"""Training schemes for layers with S and R channels on both sides (paper Sec. 3.3).

``nr``: the plain widened layer (cross blocks W_S→R, W_R→S trainable from zero).
``cr``: cross connections removed: S_out = W_SS*S_in, R_out = W_RR*R_in, two convolutions on
slices of the one weight (the cross blocks are never computed and stay zero).
``ca``: cross attention (Eq. 9–10): S_out = W_SS*S + 2σ(W_SS*S)·(W_RS*R), and symmetrically.

The layer keeps its parameter names (``weight``, ``bias``), so state_dicts, optimizer state
and the plan's parameter map stay valid.  A layer whose S and R channels are interleaved (a
space made of several atoms) keeps the plain ``nr`` form; the notes say which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["apply_scheme", "SRConv1d", "SRConv2d", "SRConv3d", "SRLinear"]


class _SRMixin:
    """Forward of a layer split into S and R blocks: S first, then R, along the channel dims."""

    scheme: str
    s_in: int
    s_out: int

    def _blocks(self, x: torch.Tensor, dim: int):
        """Input S and R parts."""
        return x.narrow(dim, 0, self.s_in), x.narrow(dim, self.s_in, x.shape[dim] - self.s_in)

    def _weight(self, rows: slice, cols: slice) -> torch.Tensor:
        """One block of the weight (output rows × input columns)."""
        return self.weight[rows, cols]

    def _sr_forward(self, x: torch.Tensor, dim: int, op) -> torch.Tensor:
        """S and R outputs from their own blocks; cross attention gates the cross terms."""
        if self.scheme == "ca":
            return self._ca_forward(x, dim, op)
        xs, xr = self._blocks(x, dim)
        s, r = slice(0, self.s_out), slice(self.s_out, None)
        si, ri = slice(0, self.s_in), slice(self.s_in, None)
        bias_s = None if self.bias is None else self.bias[s]
        bias_r = None if self.bias is None else self.bias[r]
        out_s = op(xs, self._weight(s, si), bias_s)
        out_r = op(xr, self._weight(r, ri), bias_r)
        return torch.cat([out_s, out_r], dim)

    def _ca_forward(self, x: torch.Tensor, dim: int, op) -> torch.Tensor:
        """Eq. 9–10 with two convolutions: one per input block, each producing S and R rows.

        From S inputs: [W_SS*S ; W_SR*S]; from R inputs: [W_RS*R ; W_RR*R].  The diagonal
        terms (plus bias) gate the cross terms: S = d_S + 2σ(d_S)·c_S, R = d_R + 2σ(d_R)·c_R.
        """
        xs, xr = self._blocks(x, dim)
        bias_s = bias_r = None
        if self.bias is not None:  # the diagonal blocks carry the bias: [b_S ; 0] and [0 ; b_R]
            bias_s = torch.cat([self.bias[: self.s_out], torch.zeros_like(self.bias[self.s_out:])])
            bias_r = torch.cat([torch.zeros_like(self.bias[: self.s_out]), self.bias[self.s_out:]])
        from_s = op(xs, self.weight[:, : self.s_in], bias_s)
        from_r = op(xr, self.weight[:, self.s_in:], bias_r)
        r_out = from_s.shape[dim] - self.s_out
        diag_s, cross_r = from_s.narrow(dim, 0, self.s_out), from_s.narrow(dim, self.s_out, r_out)
        cross_s, diag_r = from_r.narrow(dim, 0, self.s_out), from_r.narrow(dim, self.s_out, r_out)
        out_s = torch.addcmul(diag_s, torch.sigmoid(diag_s), cross_s, value=2)
        out_r = torch.addcmul(diag_r, torch.sigmoid(diag_r), cross_r, value=2)
        return torch.cat([out_s, out_r], dim)


class SRConv1d(_SRMixin, nn.Conv1d):
    """Conv1d trained with the cr or ca scheme."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward (see module docstring)."""
        return self._sr_forward(x, x.dim() - 2, self._conv_forward)


class SRConv2d(_SRMixin, nn.Conv2d):
    """Conv2d trained with the cr or ca scheme."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward (see module docstring)."""
        return self._sr_forward(x, x.dim() - 3, self._conv_forward)


class SRConv3d(_SRMixin, nn.Conv3d):
    """Conv3d trained with the cr or ca scheme."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward (see module docstring)."""
        return self._sr_forward(x, x.dim() - 4, self._conv_forward)


class SRLinear(_SRMixin, nn.Linear):
    """Linear trained with the cr or ca scheme."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward over the last dim."""
        return self._sr_forward(x, x.dim() - 1, F.linear)


_SR_CLASSES = {nn.Conv1d: SRConv1d, nn.Conv2d: SRConv2d, nn.Conv3d: SRConv3d, nn.Linear: SRLinear}


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


_BASE = {sr: base for base, sr in _SR_CLASSES.items()}


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
    for record in analysis.records.values():
        name = record.get("module")
        if record.get("kind") not in ("conv", "linear") or name is None:
            continue
        module = gm.get_submodule(name)
        base = _BASE.get(type(module), type(module))
        if base not in _SR_CLASSES or getattr(module, "groups", 1) != 1:
            continue
        pmap = maps.get(f"{name}.weight")
        s_out, s_in = _split(pmap, 0), _split(pmap, 1)
        if plan.scheme == "nr" or s_out is None or s_in is None:
            if plan.scheme != "nr" and pmap is not None and _both_grow(pmap):
                notes.append(f"{name}: S and R channels interleave (several atoms); kept as nr")
            if base is not type(module):
                _replace(gm, name, _convert(module, base))
            continue
        _replace(gm, name, _convert(module, _SR_CLASSES[base], scheme=plan.scheme, s_in=s_in, s_out=s_out))
        converted += 1
    if plan.scheme != "nr":
        notes.append(f"scheme {plan.scheme}: {converted} layers split into S/R blocks")
    return notes


def _both_grow(pmap) -> bool:
    """Whether both the output and input dims of a weight have rejuvenated slots."""
    grown = {d.dim for d in pmap.dims if (d.source < 0).any()}
    return {0, 1} <= grown
