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
    with torch.no_grad():
        for _, norm, segments in analysis.norm_spaces(model):
            _randomise(norm, gen)
            for s, entries in segments:
                if s in dead:
                    norm.weight[entries].view(len(dead[s]), -1)[dead[s]] = 0
                    norm.bias[entries].view(len(dead[s]), -1)[dead[s]] = 0
    return dead


def _randomise(norm: nn.Module, gen: torch.Generator) -> None:
    """Random affine and running statistics (eval-mode norms that are far from identity)."""
    n = norm.weight.numel()
    norm.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    norm.bias.copy_(torch.randn(n, generator=gen))
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean.copy_(torch.randn(n, generator=gen))
        norm.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def kill_per_norm(model: nn.Module, analysis, fraction: float = 0.4, seed: int = 0) -> int:
    """Zero γ and β of random channels drawn *independently for every norm* (not per space).

    A channel dead at one norm of a space may be alive at another: a norm reading a zero
    channel emits a constant (running mean, β), which the rewrite must fold or keep.  Also
    randomises the live entries.  Returns how many (norm, channel) entries were zeroed.
    """
    gen = torch.Generator().manual_seed(seed)
    killed = 0
    with torch.no_grad():
        for _, norm, segments in analysis.norm_spaces(model):
            _randomise(norm, gen)
            for s, entries in segments:
                if analysis.spaces[s].is_frozen:
                    continue
                dead = torch.rand(analysis.spaces[s].width, generator=gen) < fraction
                norm.weight[entries].view(len(dead), -1)[dead] = 0
                norm.bias[entries].view(len(dead), -1)[dead] = 0
                killed += int(dead.sum())
    return killed


def norms_per_space(model: nn.Module, analysis) -> int:
    """The largest number of norm scales on one free space (1 or less: per-norm = per-space)."""
    count: dict[int, int] = {}
    for _, _, segments in analysis.norm_spaces(model):
        for s, _ in segments:
            if not analysis.spaces[s].is_frozen:
                count[s] = count.get(s, 0) + 1
    return max(count.values(), default=0)
