"""How a plan maps old channels to new ones: per parameter dim, the old index each new slot copies.

Plain data derived from (analysis, plan): every space is ordered [S…, R…]; a rejuvenated (R)
slot maps to -1.  The planner's fold measurement and the rewrite both read these maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DimMap", "ParamMap", "dim_map", "param_maps"]


@dataclass(frozen=True)
class DimMap:
    """Along one dim: for each new index, the old index it copies (-1 for a rejuvenated slot)."""

    dim: int
    source: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        """New positions that carry an old channel (S)."""
        return torch.nonzero(self.source >= 0).flatten()


@dataclass(frozen=True)
class ParamMap:
    """How an old parameter maps into the new one: a DimMap per dim that changed."""

    name: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    dims: tuple[DimMap, ...]


def dim_map(analysis, plan, layout, dim: int) -> DimMap:
    """New-to-old index map of a layout: per space, its kept channels then -1 for each R slot."""
    parts, offset = [], 0
    for s in analysis.space_ids(layout):
        width = analysis.spaces[s].width
        parts.append(torch.tensor(plan.keep[s], dtype=torch.long) + offset)
        parts.append(torch.full((plan.grow[s],), -1, dtype=torch.long))
        offset += width
    channels = torch.cat(parts)
    if layout.inner == 1:
        return DimMap(dim, channels)
    block = torch.arange(layout.inner)
    features = torch.where(channels[:, None] >= 0, channels[:, None] * layout.inner + block, -1)
    return DimMap(dim, features.reshape(-1))


def param_maps(analysis, plan) -> dict[str, ParamMap]:
    """ParamMap of every parameter and buffer whose spaces change under the plan."""
    maps = {}
    for name, info in analysis.param_info.items():
        dims = tuple(dim_map(analysis, plan, lay, d) for d, lay in enumerate(info.dims) if lay is not None)
        changed = [m for m in dims if not torch.equal(m.source, torch.arange(info.shape[m.dim]))]
        if not changed:
            continue
        new_shape = list(info.shape)
        for m in dims:
            new_shape[m.dim] = m.source.numel()
        maps[name] = ParamMap(name, info.shape, tuple(new_shape), dims)
    return maps
