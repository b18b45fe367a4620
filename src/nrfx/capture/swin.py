"""torchvision's Swin window attention captured head by head, so that its heads and its token stream can be resized.

torchvision computes a ``ShiftedWindowAttention`` (and ``…V2``) in one ``torch.fx.wrap``-ped function,
``shifted_window_attention``, that reads the channel count ``C`` from its input's shape and splits the heads as
``C // num_heads``: as one node it froze the token stream it reads and writes, the heads and the projections
(torchvision's swin 47–56 % free, where timm's is 93 %).  Rule: fx traces a call of such a module (exactly these types,
not a subclass) as the computation that function performs, written the way nrfx's head rules
read attention: the relative-position bias gathered from the module's table (V2: its ``cpb_mlp``), the windows
(``swin_windows``), ``F.linear`` with ``qkv.weight``, ``reshape(B, N, 3, heads, -1)``, the scaled (V2: cosine)
scores, the bias, the shift mask (``swin_shift_mask``), softmax, dropout, heads merged, ``F.linear`` with
``proj.weight``, the windows put back (``swin_unwindows``).  The three helpers are fx leaves that move positions
(or build a mask from sizes alone) around a channel dim they read from the shape when they run, so a rewritten
width needs nothing spelled; their rules are in ``nrfx.analysis.rules.vision``.  Every window op, mask value,
scale and dropout is torchvision's own in the same order (the outputs are bitwise equal); where the feature map
is no larger than the window, torchvision skips the shift and its mask, here the shift is skipped and the mask,
all zeros, added.  V2 zeroes the key third of the qkv bias on every call (``swin_v2_qkv_bias``) and clamps its
per-head logit scale (``swin_v2_logit_scale``): leaves whose parameter takes the heads it meets.  torch.export
traces the real function and needs none of this (its ``C // num_heads`` becomes a literal).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["OPENED", "swin_shift_mask", "swin_unwindows", "swin_v2_logit_scale", "swin_v2_qkv_bias", "swin_windows",
           "traced_call"]

try:  # torchvision is a dependency, but keep nrfx importable without it
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
except Exception:  # pragma: no cover - torchvision absent, or broken (built for another torch)
    ShiftedWindowAttention = ShiftedWindowAttentionV2 = None

OPENED: tuple[type, ...] = tuple(k for k in (ShiftedWindowAttention, ShiftedWindowAttentionV2) if k is not None)
"""The module types whose calls fx opens (exactly these: a subclass, which may compute something else, stays one
call)."""


def _padded(size: int, window: int) -> int:
    """A feature map's side padded up to a multiple of the window (torchvision's ``pad_r`` / ``pad_b``)."""
    return size + (window - size % window) % window


def _shifts(height: int, width: int, window_size: list[int], shift_size: list[int]) -> tuple[int, int]:
    """The shift torchvision applies: none along a side whose padded size the window covers."""
    padded_h, padded_w = _padded(height, window_size[0]), _padded(width, window_size[1])
    return (shift_size[0] if window_size[0] < padded_h else 0, shift_size[1] if window_size[1] < padded_w else 0)


def swin_windows(x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """(B, H, W, C) -> (B·windows, area, C): padded to whole windows, shifted cyclically, cut into windows."""
    batch, height, width, channels = x.shape
    (wh, ww), (sh, sw) = window_size, _shifts(height, width, window_size, shift_size)
    x = F.pad(x, (0, 0, 0, _padded(width, ww) - width, 0, _padded(height, wh) - height))
    _, padded_h, padded_w, _ = x.shape
    if sh + sw > 0:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = x.view(batch, padded_h // wh, wh, padded_w // ww, ww, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * (padded_h // wh) * (padded_w // ww), wh * ww, channels)


def swin_unwindows(y: torch.Tensor, window_size: list[int], shift_size: list[int], height: int,
                   width: int) -> torch.Tensor:
    """``swin_windows`` undone for a (B, height, width, ·) map: windows joined, shift reversed, padding cut."""
    (wh, ww), (sh, sw) = window_size, _shifts(height, width, window_size, shift_size)
    padded_h, padded_w = _padded(height, wh), _padded(width, ww)
    channels = y.shape[-1]
    batch = y.shape[0] // ((padded_h // wh) * (padded_w // ww))
    y = y.view(batch, padded_h // wh, padded_w // ww, wh, ww, channels)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if sh + sw > 0:
        y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
    return y[:, :height, :width, :].contiguous()


def swin_shift_mask(x: torch.Tensor, window_size: list[int], shift_size: list[int]) -> torch.Tensor:
    """The additive mask (windows, 1, area, area) of shifted windows over a (B, H, W, C) map: -100 between
    regions the shift brought together, 0 elsewhere (all zeros where nothing is shifted)."""
    _, height, width, _ = x.shape
    (wh, ww), (sh, sw) = window_size, _shifts(height, width, window_size, shift_size)
    padded_h, padded_w = _padded(height, wh), _padded(width, ww)
    mask = x.new_zeros((padded_h, padded_w))
    if sh + sw > 0:
        regions = [(h, w) for h in ((0, -wh), (-wh, -sh), (-sh, None)) for w in ((0, -ww), (-ww, -sw), (-sw, None))]
        for count, (h, w) in enumerate(regions):
            mask[h[0]:h[1], w[0]:w[1]] = count
    windows = (padded_h // wh) * (padded_w // ww)
    mask = mask.view(padded_h // wh, wh, padded_w // ww, ww).permute(0, 2, 1, 3).reshape(windows, wh * ww)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    return mask.unsqueeze(1)


def swin_v2_qkv_bias(bias: torch.Tensor) -> torch.Tensor:
    """Swin V2's qkv bias as it is used: its key third zeroed (torchvision clones and zeroes it on every call)."""
    query, key, value = bias.chunk(3)
    return torch.cat((query, torch.zeros_like(key), value))


def swin_v2_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """Swin V2's per-head logit scale as it is used: clamped at log(100), exponentiated."""
    return torch.clamp(logit_scale, max=math.log(100.0)).exp()


for _name in ("swin_windows", "swin_unwindows", "swin_shift_mask", "swin_v2_qkv_bias", "swin_v2_logit_scale"):
    torch.fx.wrap(_name)


def traced_call(m: nn.Module, args: tuple, kwargs: dict) -> Any | None:
    """fx: the head-by-head computation of a torchvision Swin attention call, or None (the call goes on as it is)."""
    if type(m) not in OPENED or not isinstance(getattr(m.qkv, "out_features", None), int):
        return None  # another type, or a qkv that is not a Linear (its width unknown before the graph runs)
    fields = {**dict(zip(("x",), args, strict=False)), **kwargs}
    if set(fields) != {"x"}:
        return None
    return _window_attention(m, fields["x"])


def _relative_bias(m: nn.Module) -> Any:
    """The (1, heads, area, area) relative-position bias: the table (V2: ``16·sigmoid`` of the ``cpb_mlp`` of the
    coordinates) gathered by the position index, as ``_get_relative_position_bias``, its heads read as ``-1``."""
    area = m.window_size[0] * m.window_size[1]
    v2 = isinstance(m, ShiftedWindowAttentionV2)
    table = m.cpb_mlp(m.relative_coords_table).flatten(0, -2) if v2 else m.relative_position_bias_table
    bias = table[m.relative_position_index].view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
    return 16 * torch.sigmoid(bias) if v2 else bias


def _window_attention(m: nn.Module, x: Any) -> Any:
    """``shifted_window_attention`` (torchvision) for module ``m`` on ``x`` (B, H, W, C), its widths read from the
    tensors it meets (see the module doc)."""
    v2 = isinstance(m, ShiftedWindowAttentionV2)
    bias = _relative_bias(m)
    windows = swin_windows(x, m.window_size, m.shift_size)
    qkv_bias = swin_v2_qkv_bias(m.qkv.bias) if v2 and m.qkv.bias is not None else m.qkv.bias
    qkv = F.linear(windows, m.qkv.weight, qkv_bias)
    qkv = qkv.reshape(windows.shape[0], windows.shape[1], 3, m.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if v2:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * swin_v2_logit_scale(m.logit_scale)
    else:
        head_dim = m.qkv.out_features // 3 // m.num_heads  # an int (the weight's shape is a proxy under fx)
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if sum(m.shift_size) > 0:
        mask = swin_shift_mask(x, m.window_size, m.shift_size)
        attn = (attn.unflatten(0, (-1, mask.shape[0])) + mask).flatten(0, 1)
    attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
    y = attn.matmul(v).transpose(1, 2).reshape(windows.shape[0], windows.shape[1], -1)
    y = F.dropout(F.linear(y, m.proj.weight, m.proj.bias), p=m.dropout, training=m.training)
    return swin_unwindows(y, m.window_size, m.shift_size, x.shape[1], x.shape[2])
