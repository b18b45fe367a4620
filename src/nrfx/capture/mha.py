"""``nn.MultiheadAttention`` captured head by head, so that its heads can be kept and added whole.

Rule: a self-attention call of an ``nn.MultiheadAttention`` (query, key and value one tensor; packed
``in_proj_weight``; no ``bias_k``/``bias_v`` or ``add_zero_attn``; no dropout while training) is
captured as the computation it stands for, written the way nrfx's head rules read attention:
``F.linear`` with the packed weight, ``reshape(B, N, 3, H, d)``, SDPA (``attn_mask`` and
``key_padding_mask`` as one additive mask), heads merged back, ``out_proj``.  fx traces it in place
of the leaf call (``NrfxTracer.call_module``), torch.export runs it in place of the module's forward
for the duration of the export (``heads_exposed``); the module stays in the GraphModule
(``keep_opened_modules``).  The
parameters are the module's own (``attn.in_proj_weight``, ``attn.out_proj``), so the analysis, the
masks and the rewrite name them as the user does.  Any other call stays one opaque module call,
frozen as before; the capture is accepted only after one real forward matches the module's, as
every capture is.  Masks and averaged attention weights (``need_weights=True``) are spelled only
under export (a mask's dtype decides its meaning; export drops weights nothing reads); under fx
such a call stays opaque.  A per-head mask ((B·H, L, S)) keeps the heads frozen (its head dim is
plain), a shared one ((L, S), padding) leaves them free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["expandable", "heads_forward", "heads_exposed", "traced_call", "keep_opened_modules"]


def expandable(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, *, key_padding_mask: Any = None,
               need_weights: bool = True, attn_mask: Any = None, is_causal: bool = False,
               concrete: bool = True, **_: Any) -> bool:
    """Whether this call is a self-attention that ``heads_forward`` computes exactly (see module doc).

    ``concrete``: the inputs are tensors (export), so masks (their dtype) and the weights can be spelled;
    on fx proxies only a call without them opens."""
    plain_module = (m._qkv_same_embed_dim and m.in_proj_weight is not None and m.bias_k is None
                    and m.bias_v is None and not m.add_zero_attn and (m.dropout == 0 or not m.training))
    masks = key_padding_mask is not None or attn_mask is not None
    plain_call = query is key and key is value and (concrete or not (masks or is_causal or need_weights))
    batched = not isinstance(query, torch.Tensor) or query.dim() == 3  # a Proxy: checked by the capture's forward
    return bool(plain_module and plain_call and batched and (attn_mask is not None or not is_causal))


def heads_forward(m: nn.MultiheadAttention, query: torch.Tensor, *_: Any, key_padding_mask: Any = None,
                  need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                  **__: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``m(query, query, query)`` computes, spelled as packed projection, heads, SDPA, merge, out_proj."""
    x = query if m.batch_first else query.transpose(0, 1)
    batch, tokens = x.shape[0], x.shape[1]
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    qkv = qkv.reshape(batch, tokens, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    mask = _additive_mask(m, attn_mask, key_padding_mask, batch, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=m.dropout if m.training else 0.0)
    out = m.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
    out = out if m.batch_first else out.transpose(0, 1)
    if not need_weights:
        return out, None
    scores = q @ k.transpose(-2, -1) * m.head_dim ** -0.5
    weights = (scores if mask is None else scores + mask).softmax(-1)
    return out, weights.mean(1) if average_attn_weights else weights


def _additive_mask(m: nn.MultiheadAttention, attn_mask: Any, key_padding_mask: Any, batch: Any,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """MultiheadAttention's masks as one additive mask for SDPA (True in a bool mask: not attended, -inf):
    ``attn_mask`` (L, S) or (B·H, L, S), ``key_padding_mask`` (B, S)."""
    total = None
    if attn_mask is not None:
        total = _as_additive(attn_mask, dtype)
        total = total.view(batch, m.num_heads, *total.shape[-2:]) if total.dim() == 3 else total
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype).view(batch, 1, 1, key_padding_mask.shape[-1])
        total = padding if total is None else total + padding
    return total


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: masked out) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _fields(args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (``nn.MultiheadAttention.forward``'s order)."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def traced_call(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
    """fx: the head-by-head computation of a self-attention call, or None (the call stays a leaf)."""
    fields = _fields(args, kwargs)
    if type(m).forward is not nn.MultiheadAttention.forward or not all(k in fields for k in ("query", "key", "value")):
        return None  # a subclass with its own forward computes something else
    if not expandable(m, **fields, concrete=False):
        return None
    return heads_forward(m, fields["query"], need_weights=False)


@contextlib.contextmanager
def heads_exposed() -> Iterator[None]:
    """torch.export: every ``nn.MultiheadAttention`` self-attention runs ``heads_forward`` while the block runs."""
    original = nn.MultiheadAttention.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        fields = _fields(args, kwargs)
        if all(k in fields for k in ("query", "key", "value")) and expandable(self, **fields):
            return heads_forward(self, fields["query"], **{k: v for k, v in fields.items() if k != "query"})
        return original(self, *args, **kwargs)

    nn.MultiheadAttention.forward = forward
    try:
        yield
    finally:
        nn.MultiheadAttention.forward = original


def keep_opened_modules(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Rule: every ``nn.MultiheadAttention`` the capture opened (its ``in_proj_weight`` read by the graph) stays
    the module itself in the GraphModule, not an empty holder of its parameters: code around an island reads
    its attributes (``nn.TransformerDecoder`` reads ``layers[0].self_attn.batch_first``)."""
    read = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for path, module in model.named_modules():
        weight = f"{path}.in_proj_weight" if path else "in_proj_weight"
        if path and isinstance(module, nn.MultiheadAttention) and weight in read:
            parent, _, name = path.rpartition(".")
            holder = gm.get_submodule(parent) if parent else gm
            if not isinstance(getattr(holder, name, None), nn.MultiheadAttention):
                setattr(holder, name, module)
