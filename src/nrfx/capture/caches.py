"""Cache objects in a model's output (Hugging Face ``DynamicCache``, ``EncoderDecoderCache``) as pytree nodes.

Rule: ``torch.export`` refuses an output that holds an object it cannot flatten, and every
generative HF model returns its key/value cache by default (GPT-2: ``DynamicCache``; T5,
Whisper: ``EncoderDecoderCache``).  Before an export, when transformers is already imported
(an HF model can only exist then), its cache classes are registered as pytree nodes: a cache
flattens to its key and value tensors and comes back as the same class, so the captured graph
and every rewrite of it return the cache the model returns, under the user's call signature.
``DynamicCache`` is registered by transformers' own helper (``register_dynamic_cache_export_support``,
the one its ExecuTorch export uses); ``EncoderDecoderCache`` flattens to its two ``DynamicCache``s.
The registration is process-wide and permanent (the result's forward unflattens its output
with it) and happens once; a class someone registered already is left as it is.

A cache in the output is the model's own state, not a result the user reads channel by channel:
its key and value tensors do not pin the channels they carry (``cache_output_leaves``), so the
attention heads stay free and a rewritten model returns caches with its new head counts (which
its next call reads consistently).
"""

from __future__ import annotations

import sys
from typing import Any

import torch.fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

__all__ = ["register_cache_pytrees", "cache_output_leaves"]


def register_cache_pytrees() -> None:
    """Register transformers' cache classes as pytree nodes, once, when transformers is imported."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    except ImportError:  # a transformers without these classes has nothing to register
        return
    if DynamicCache not in pytree.SUPPORTED_NODES:
        _register_dynamic_cache()
    if EncoderDecoderCache not in pytree.SUPPORTED_NODES and DynamicCache in pytree.SUPPORTED_NODES:
        _register_encoder_decoder_cache(EncoderDecoderCache)


def _register_dynamic_cache() -> None:
    """``DynamicCache`` by transformers' own helper (its keys and values per layer, sliding windows kept)."""
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return
    register_dynamic_cache_export_support()


def _register_encoder_decoder_cache(cls: type) -> None:
    """``EncoderDecoderCache`` flattens to (self-attention cache, cross-attention cache) and is rebuilt from them."""
    names = ("self_attention_cache", "cross_attention_cache")

    def flatten(cache: Any) -> tuple[list[Any], None]:
        return [getattr(cache, name) for name in names], None

    def flatten_with_keys(cache: Any) -> tuple[list[tuple[Any, Any]], None]:
        return [(pytree.GetAttrKey(name), getattr(cache, name)) for name in names], None

    def unflatten(children: Any, _context: None) -> Any:
        return cls(*children)

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__name__}")
    fx_pytree.register_pytree_flatten_spec(cls, lambda cache, _spec: flatten(cache)[0])


def cache_output_leaves(gm: torch.fx.GraphModule) -> set[int]:
    """Positions among the graph's flat outputs of the tensors inside a cache object (a class named ``*Cache``)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return set()
    found: set[int] = set()
    _mark_cache_leaves(info.out_spec, 0, False, found)
    return found


def _mark_cache_leaves(spec: pytree.TreeSpec, start: int, inside: bool, found: set[int]) -> int:
    """Walk a TreeSpec from leaf position ``start``; record the leaves under a cache node; return the next position."""
    if spec.is_leaf():
        if inside:
            found.add(start)
        return start + 1
    inside = inside or (isinstance(spec.type, type) and spec.type.__name__.endswith("Cache"))
    for child in spec.children() if hasattr(spec, "children") else spec.children_specs:
        start = _mark_cache_leaves(child, start, inside, found)
    return start
