"""``nn.Transformer``, ``nn.TransformerEncoder`` / ``TransformerDecoder`` and their layers traced layer by layer
under fx.

torch.nn's built-in modules are fx leaves, and these five cannot be traced anyway: their ``forward`` tests
tensors (``src.dim() != 3``, ``src.is_nested``) to pick a fused fast path or to check sizes.  As leaves they
are unknown ops: every channel they read froze, their feed-forward hidden dims were never reached, and the
heads inside never seen.  Rule: a call whose masks fx can leave out (none given to an encoder; a decoder's
masks go to its attention modules as they are) is traced as the computation the module's documented slow
path performs, written with the module's own submodules: ``norm1``, ``self_attn`` (opened head by head by
``nrfx.capture.mha`` when it is a plain self-attention), ``dropout1``, ``linear1``, ``activation``,
``dropout``, ``linear2``, ``dropout2``, ``norm2`` (a decoder layer's ``multihead_attn``, ``norm3``,
``dropout3`` too); each layer of a stack, then its ``norm``; a transformer's encoder, then its decoder.  The
fused fast path computes the same function (up to rounding), and the capture is accepted only after one real
forward matches, as every capture is.  A subclass with its own ``forward``, or an encoder called with masks
it must convert first, stays one opaque call (frozen, as before).  torch.export traces the real forward and
needs none of this.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["traced_call"]

_ENCODER_LAYER = ("src", "src_mask", "src_key_padding_mask", "is_causal")
_ENCODER = ("src", "mask", "src_key_padding_mask", "is_causal")
_DECODER = ("tgt", "memory", "tgt_mask", "memory_mask", "tgt_key_padding_mask", "memory_key_padding_mask",
            "tgt_is_causal", "memory_is_causal")
_TRANSFORMER = ("src", "tgt", "src_mask", "tgt_mask", "memory_mask", "src_key_padding_mask", "tgt_key_padding_mask",
                "memory_key_padding_mask", "src_is_causal", "tgt_is_causal", "memory_is_causal")
_SOURCE_MASKS = {"src_mask": "mask", "src_key_padding_mask": "src_key_padding_mask", "src_is_causal": "is_causal"}


def traced_call(m: nn.Module, args: tuple, kwargs: dict) -> Any | None:
    """fx: the layer-by-layer computation of a transformer module call, or None (the call stays a leaf)."""
    for kind, names, trace in _OPENED:
        if isinstance(m, kind) and type(m).forward is kind.forward:
            fields = {**dict(zip(names, args, strict=False)), **kwargs}
            return trace(m, fields) if set(fields) <= set(names) and names[0] in fields else None
    return None


def _encoder_layer(m: nn.TransformerEncoderLayer, f: dict) -> Any | None:
    """Rule: without masks (and without ``is_causal``, a hint about a mask) an encoder layer is its slow path."""
    if f.get("src_mask") is not None or f.get("src_key_padding_mask") is not None or f.get("is_causal"):
        return None
    x = f["src"]
    if m.norm_first:
        x = x + _self_attention(m, m.norm1(x), None, None, False)
        return x + _feed_forward(m, m.norm2(x))
    x = m.norm1(x + _self_attention(m, x, None, None, False))
    return m.norm2(x + _feed_forward(m, x))


def _encoder(m: nn.TransformerEncoder, f: dict) -> Any | None:
    """Rule: without masks (or ``is_causal``) an encoder stack is each layer in turn, then its norm."""
    if f.get("mask") is not None or f.get("src_key_padding_mask") is not None or f.get("is_causal"):
        return None
    x = f["src"]
    for layer in m.layers:
        x = layer(x)
    return m.norm(x) if m.norm is not None else x


def _decoder_layer(m: nn.TransformerDecoderLayer, f: dict) -> Any | None:
    """Rule: a decoder layer is its slow path (it has no other); masks go to its attention modules as given."""
    x, memory = f["tgt"], f.get("memory")
    if memory is None:
        return None
    self_masks = (f.get("tgt_mask"), f.get("tgt_key_padding_mask"), bool(f.get("tgt_is_causal", False)))
    cross_masks = (f.get("memory_mask"), f.get("memory_key_padding_mask"), bool(f.get("memory_is_causal", False)))
    if m.norm_first:
        x = x + _self_attention(m, m.norm1(x), *self_masks)
        x = x + _cross_attention(m, m.norm2(x), memory, *cross_masks)
        return x + _feed_forward(m, m.norm3(x), m.dropout3)
    x = m.norm1(x + _self_attention(m, x, *self_masks))
    x = m.norm2(x + _cross_attention(m, x, memory, *cross_masks))
    return m.norm3(x + _feed_forward(m, x, m.dropout3))


def _decoder(m: nn.TransformerDecoder, f: dict) -> Any | None:
    """Rule: a decoder stack is each layer in turn with the same memory and masks, then its norm; a ``tgt_mask``
    without ``tgt_is_causal`` stays a leaf (torch compares it with a causal mask to decide)."""
    if f.get("memory") is None or (f.get("tgt_mask") is not None and f.get("tgt_is_causal") is None):
        return None
    x, rest = f["tgt"], {k: v for k, v in f.items() if k not in ("tgt", "memory")}
    rest["tgt_is_causal"] = bool(rest.get("tgt_is_causal") or False)
    for layer in m.layers:
        x = layer(x, f["memory"], **rest)
    return m.norm(x) if m.norm is not None else x


def _transformer(m: nn.Transformer, f: dict) -> Any | None:
    """Rule: a transformer is its encoder over ``src``, then its decoder over ``tgt`` and that memory, each called
    with the masks given for it (each call opens, or stays a leaf, on its own; a custom encoder or decoder is
    traced as any module)."""
    if "tgt" not in f:
        return None
    memory = m.encoder(f["src"], **_given({to: f.get(name) for name, to in _SOURCE_MASKS.items()}))
    rest = {k: f.get(k) for k in _TRANSFORMER[2:] if k not in _SOURCE_MASKS}
    return m.decoder(f["tgt"], memory, **_given(rest))


def _given(options: dict) -> dict:
    """The options a call was given (None and False are the defaults)."""
    return {k: v for k, v in options.items() if v is not None and v is not False}


def _self_attention(m: nn.Module, x: Any, mask: Any, padding: Any, causal: bool) -> Any:
    """``_sa_block``: self-attention without weights, then ``dropout1``."""
    out = m.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=causal)[0]
    return m.dropout1(out)


def _cross_attention(m: nn.TransformerDecoderLayer, x: Any, memory: Any, mask: Any, padding: Any,
                     causal: bool) -> Any:
    """``_mha_block``: attention over the memory without weights, then ``dropout2``."""
    out = m.multihead_attn(x, memory, memory, attn_mask=mask, key_padding_mask=padding, is_causal=causal,
                           need_weights=False)[0]
    return m.dropout2(out)


def _feed_forward(m: nn.Module, x: Any, dropout: nn.Module | None = None) -> Any:
    """``_ff_block``: ``linear2(dropout(activation(linear1(x))))``, then ``dropout2`` (a decoder's ``dropout3``)."""
    out = m.linear2(m.dropout(m.activation(m.linear1(x))))
    return (dropout or m.dropout2)(out)


_OPENED = ((nn.TransformerEncoderLayer, _ENCODER_LAYER, _encoder_layer), (nn.TransformerEncoder, _ENCODER, _encoder),
           (nn.TransformerDecoderLayer, _DECODER, _decoder_layer), (nn.TransformerDecoder, _DECODER, _decoder),
           (nn.Transformer, _TRANSFORMER, _transformer))
