"""What the analysis remembers per node for the later stages: typed, immutable records.

``LayerRecord``: a layer with weights whose channels the rewrite resizes (conv, linear,
embedding, norm).  ``SliceRecord``: literal channel bounds (slice, split sizes, narrow) that
the rewrite moves to the new widths.  ``SumRecord``: a sum or mean over a free channel dim,
which the rewrite restricts to the surviving channels (with the original divisor for a mean).
``ViewRecord``: the sizes of a view / reshape that splits channels into attention heads (or merges
them back), which the rewrite sets to the new widths.
``Analysis.records`` maps node names to them.
"""

from __future__ import annotations

from dataclasses import dataclass

from nrfx.analysis.spaces import Layout

__all__ = ["LayerRecord", "SliceRecord", "SumRecord", "ViewRecord", "Record"]


@dataclass(frozen=True)
class LayerRecord:
    """A weighted layer: its module (module call) or weight/bias names (functional call) and layouts.

    ``groups_arg`` is the position of a literal ``groups`` argument of a functional depthwise
    conv (it must follow the new width); ``unused_params``/``unused_macs`` are stored weights a
    cr S/R layer never computes (its cross blocks).  ``input_dim`` is the dim of the layer's input, counted
    from the end (-1: a linear's features; a conv's channels before its spatial dims), that carries ``input``:
    where the constants its removed inputs carry are measured and zeroed.
    """

    kind: str
    module: str | None = None
    weight: str | None = None
    bias: str | None = None
    input: Layout | None = None
    output: Layout | None = None
    groups: int = 1
    transposed: bool = False
    groups_arg: int | str | None = None
    unused_params: int = 0
    unused_macs: int = 0
    input_dim: int | None = None


@dataclass(frozen=True)
class SliceRecord:
    """Literal feature bounds ``[a, b)`` of a free channel dim, and how the node spells them."""

    style: str  # "split", "narrow" or "getitem"
    layout: Layout
    dim: int
    bounds: tuple[tuple[int, int], ...]
    position: int | None = None  # getitem: which index item is the channel slice

    kind: str = "slice"


@dataclass(frozen=True)
class SumRecord:
    """A sum or mean over one free channel dim (and any plain dims): its layout, dim and original divisor.

    ``count``: how many elements the original mean divided by (1 for a sum).
    """

    layout: Layout
    dim: int
    count: int

    kind: str = "sum"


@dataclass(frozen=True)
class ViewRecord:
    """Sizes of a view / reshape that the rewrite sets to the new widths (attention heads).

    ``sizes``: (out dim, layout) per size to set: the new size is the layout's new channel count times its
    ``inner`` (a head count, or heads × head dim where heads merge back into channels).  ``merge``: the view
    merges heads back into channels (``x.transpose(1, 2).reshape(B, N, C)``).
    """

    sizes: tuple[tuple[int, Layout], ...]
    merge: bool = False

    kind: str = "view"


Record = LayerRecord | SliceRecord | SumRecord | ViewRecord
