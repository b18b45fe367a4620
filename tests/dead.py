"""Test helper: give a model dead channels that output exact zeros (γ = β = 0 in every norm of the space)."""

from __future__ import annotations

import torch
from torch import nn


def kill_channels(model: nn.Module, analysis, fraction: float = 0.4, seed: int = 0) -> dict[int, torch.Tensor]:
    """Pick dead channels per free space; zero γ and β there in every norm on that space.

    Also randomises β, running mean and running var of the live channels so that eval-mode
    norms are far from the identity.  Returns the dead mask per space index.
    """
    gen = torch.Generator().manual_seed(seed)
    dead = {s.index: torch.rand(s.width, generator=gen) < fraction for s in analysis.spaces if not s.is_frozen}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for record in analysis.records.values():
            norm = modules.get(record.get("module"))
            layout = record.get("output")
            if record.get("kind") != "norm" or layout is None or getattr(norm, "weight", None) is None:
                continue
            _randomise(norm, gen)
            offset = 0
            for s in analysis.space_ids(layout):
                width = analysis.spaces[s].width
                if s in dead:
                    idx = torch.nonzero(dead[s]).flatten() + offset
                    norm.weight[idx] = 0
                    norm.bias[idx] = 0
                offset += width
    return dead


def _randomise(norm: nn.Module, gen: torch.Generator) -> None:
    """Random affine and running statistics (eval-mode norms that are far from identity)."""
    n = norm.weight.numel()
    norm.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    norm.bias.copy_(torch.randn(n, generator=gen))
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean.copy_(torch.randn(n, generator=gen))
        norm.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
