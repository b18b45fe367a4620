"""What the analysis attaches to every tensor value: its layouts and how its zeros arise."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils import _pytree as pytree

from nrfx.analysis.spaces import Layout

__all__ = ["Segment", "Zero", "TensorSpec", "ChannelCount", "iter_tensor_specs"]


@dataclass(frozen=True)
class Segment:
    """Channels ``[start, stop)`` of dimension ``dim`` of value ``vid``."""

    vid: int
    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Zero:
    """Rule for which channels of an output dim are known zero under masks.

    ``op`` is ``none`` (nothing known), ``copy`` (the concatenation of ``sources[0]``'s
    segments), ``and`` (zero where every source is zero: add, sub) or ``or`` (zero where
    any source is zero: mul).  ``mask`` names a module whose mask, when given, also zeroes
    the channels it marks dead.
    """

    op: str
    sources: tuple[tuple[Segment, ...], ...] = ()
    mask: str | None = None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor value: its shape, the layout each dim carries (or None), and its zero rules."""

    vid: int
    shape: tuple[int, ...]
    dims: tuple[Layout | None, ...]
    zero: tuple[Zero | None, ...]

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    def whole(self, dim: int, channels: int) -> tuple[Segment, ...]:
        """The segment list covering all ``channels`` of ``dim``."""
        return (Segment(self.vid, dim, 0, channels),)


@dataclass(frozen=True)
class ChannelCount:
    """A channel dim's size read as a number (``b, c, h, w = x.shape``), read at ``where``.

    The graph reads it again when it runs, so it follows a rewrite wherever it only sizes a view or reshape of
    its own channels (``x.transpose(1, 2).view(b, c, h, w)``); any other use (arithmetic, a factory, an unknown
    op, the output) freezes its space."""

    layout: Layout
    where: str


def iter_tensor_specs(spec: Any) -> Iterator[TensorSpec]:
    """Every TensorSpec inside a nested structure of specs (lists, tuples, dicts)."""
    return (leaf for leaf in pytree.tree_leaves(spec) if isinstance(leaf, TensorSpec))
