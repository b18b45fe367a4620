"""S/R layers (paper Sec. 3.3): a conv or linear whose channels are ordered [S…, R…] on both sides.

``cr``: cross connections removed: S_out = W_SS*S_in, R_out = W_RR*R_in, two convolutions on
slices of the one weight (the cross blocks are never computed and stay zero).
``ca``: cross attention (Eq. 9–10): S_out = W_SS*S + 2σ(W_SS*S)·(W_RS*R), and symmetrically,
with two convolutions (one per input block, each producing all output rows).

The layers keep their parameter names (``weight``, ``bias``).  This module imports only
torch: the analysis rules and the tracer may depend on it without depending on the rewrite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SRConv1d", "SRConv2d", "SRConv3d", "SRLinear", "SR_LAYERS", "SR_CLASSES", "unused_weights"]


class _SRMixin:
    """Forward of a layer split into S and R blocks: S first, then R, along the channel dims.

    With autograd the blocks are combined by differentiable ops.  Without it (inference) a
    batch is cut into tiles of about ``_TILE_BYTES`` of output, each written into one
    preallocated output, so the block outputs stay in cache and no full-size temporary is
    made; a single tile is gated in place.
    """

    scheme: str
    s_in: int
    s_out: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """S/R block forward over the channel dim (last for linear, before the kernel dims for convs)."""
        if isinstance(self, nn.Linear):
            return self._sr_forward(x, x.dim() - 1, F.linear)
        return self._sr_forward(x, x.dim() - len(self.kernel_size) - 1, self._conv_forward)

    def _blocks(self, x: torch.Tensor, dim: int):
        """Input S and R parts."""
        return x.tensor_split([self.s_in], dim)

    def _parts(self, x: torch.Tensor, dim: int, op) -> tuple[torch.Tensor, torch.Tensor]:
        """The two block ops: cr (W_SS*S, W_RR*R); ca (all rows from S inputs, all rows from R inputs)."""
        xs, xr = self._blocks(x, dim)
        s, r = slice(0, self.s_out), slice(self.s_out, None)
        si, ri = slice(0, self.s_in), slice(self.s_in, None)
        bias = self.bias
        if self.scheme == "cr":
            return (op(xs, self.weight[s, si], None if bias is None else bias[s]),
                    op(xr, self.weight[r, ri], None if bias is None else bias[r]))
        bias_s = bias_r = None
        if bias is not None:  # the diagonal blocks carry the bias: [b_S ; 0] and [0 ; b_R]
            bias_s = torch.cat([bias[s], torch.zeros_like(bias[r])])
            bias_r = torch.cat([torch.zeros_like(bias[s]), bias[r]])
        return op(xs, self.weight[:, si], bias_s), op(xr, self.weight[:, ri], bias_r)

    def _sr_forward(self, x: torch.Tensor, dim: int, op) -> torch.Tensor:
        """S and R outputs from their own blocks; cross attention gates the cross terms."""
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self._differentiable(x, dim, op)
        if dim == 0 or x.shape[0] <= 1:
            return self._combine(x, dim, op)
        first = self._combine(x[:1], dim, op)  # its size gives the tile size; it is not computed twice
        rows = _rows_per_tile(first)
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        out[:1].copy_(first)
        for start in range(1, x.shape[0], rows):
            self._combine(x[start:start + rows], dim, op, out=out[start:start + rows])
        return out

    def _differentiable(self, x: torch.Tensor, dim: int, op) -> torch.Tensor:
        """The scheme's output built from differentiable ops (training)."""
        a, b = self._parts(x, dim, op)
        if self.scheme == "cr":
            return torch.cat([a, b], dim)
        (a_s, a_r), (b_s, b_r) = (t.tensor_split([self.s_out], dim) for t in (a, b))
        return torch.cat([_gate(a_s, b_s), _gate(b_r, a_r)], dim)

    def _combine(self, x: torch.Tensor, dim: int, op, out: torch.Tensor | None = None) -> torch.Tensor:
        """The scheme's output without autograd, into ``out`` (ca: the S-input block's own output when None)."""
        a, b = self._parts(x, dim, op)
        if self.scheme == "cr":
            return torch.cat([a, b], dim) if out is None else torch.cat([a, b], dim, out=out)
        out = a if out is None else out
        (a_s, a_r), (b_s, b_r), (o_s, o_r) = (t.tensor_split([self.s_out], dim) for t in (a, b, out))
        _gate_into(o_s, a_s, b_s)  # S = W_SS*S + 2σ(W_SS*S)·(W_RS*R)
        _gate_into(o_r, b_r, a_r)  # R = W_RR*R + 2σ(W_RR*R)·(W_SR*S)
        return out


_TILE_BYTES = 1 << 21


def _rows_per_tile(row: torch.Tensor) -> int:
    """Rows of dim 0 making about ``_TILE_BYTES`` (at least one), from the size of one row."""
    return max(1, _TILE_BYTES // max(1, row.numel() * row.element_size()))


def _gate(diag: torch.Tensor, cross: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cross attention (Eq. 9–10): diag + 2σ(diag)·cross."""
    return torch.addcmul(diag, torch.sigmoid(diag), cross, value=2, out=out)


def _gate_into(out: torch.Tensor, diag: torch.Tensor, cross: torch.Tensor) -> None:
    """``_gate`` into ``out``, in chunks along dim 0 so the σ buffer stays small.

    ``out`` may be ``diag`` or ``cross`` itself (the same view): the op is elementwise.
    """
    if diag.dim() == 0 or diag.numel() == 0:
        _gate(diag, cross, out)
        return
    rows = _rows_per_tile(diag[0])
    for o, d, c in zip(out.split(rows), diag.split(rows), cross.split(rows), strict=True):
        _gate(d, c, o)


class SRConv1d(_SRMixin, nn.Conv1d):
    """Conv1d trained with the cr or ca scheme."""


class SRConv2d(_SRMixin, nn.Conv2d):
    """Conv2d trained with the cr or ca scheme."""


class SRConv3d(_SRMixin, nn.Conv3d):
    """Conv3d trained with the cr or ca scheme."""


class SRLinear(_SRMixin, nn.Linear):
    """Linear trained with the cr or ca scheme."""


SR_CLASSES: dict[type, type] = {nn.Conv1d: SRConv1d, nn.Conv2d: SRConv2d, nn.Conv3d: SRConv3d, nn.Linear: SRLinear}
SR_LAYERS: tuple[type, ...] = tuple(SR_CLASSES.values())


def unused_weights(layer: nn.Module) -> int:
    """Weight entries an S/R layer stores but never computes: the cross blocks of cr (0 otherwise)."""
    if not isinstance(layer, SR_LAYERS) or layer.scheme != "cr":
        return 0
    w = layer.weight
    cout, cin, kernel = w.shape[0], w.shape[1], w[0, 0].numel()
    return kernel * (layer.s_out * (cin - layer.s_in) + (cout - layer.s_out) * layer.s_in)
