"""Channel masks: read from norm scales, or given by the user as {module_name: BoolTensor}.

True means alive.  A channel is dead when ``|γ| < threshold · max|γ|`` of its norm layer
(the paper's rule, threshold 0.01) or when ``γ == 0`` exactly (so a norm whose scales are all
zero is wholly dead, not wholly alive).  User masks are keyed by a norm or by a layer that
produces channels (conv, linear); they replace the masks read from the norms.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nrfx.errors import MaskError, NrfxWarning
from nrfx.ops.layer_kinds import is_scale

__all__ = ["alive_scales", "norm_masks", "check_masks", "whole_blocks"]


def norm_masks(model: nn.Module, threshold: float = 0.01) -> dict[str, torch.BoolTensor]:
    """Live channels of every per-channel norm scale (BatchNorm, InstanceNorm, GroupNorm) and ``nrfx.Gate``:
    ``|γ| > 0 and |γ| >= threshold · max|γ|``."""
    if not 0.0 <= threshold < 1.0:
        raise MaskError(f"threshold must be in [0, 1), got {threshold}")
    masks: dict[str, torch.BoolTensor] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not is_scale(module) or weight is None:
            continue
        gamma = weight.detach().abs()
        if gamma.is_meta:
            continue
        if not torch.isfinite(gamma).all():
            raise MaskError(
                f"norm '{name}' has non-finite scales (γ contains NaN or inf); the model has diverged: "
                "restore a checkpoint or lower the learning rate before measuring utilization"
            )
        masks[name] = alive_scales(gamma, threshold).cpu()
    return masks


def alive_scales(gamma: torch.Tensor, threshold: float = 0.01) -> torch.BoolTensor:
    """Rule: a scale is alive iff ``|γ| > 0`` and ``|γ| >= threshold · max|γ|`` (a zero scale is dead)."""
    magnitude = gamma.detach().abs()
    if not magnitude.numel():
        return magnitude.bool()
    return (magnitude > 0) & (magnitude >= threshold * magnitude.max())


def check_masks(masks: dict[str, torch.Tensor], sites: dict[str, int], model: nn.Module) -> dict[str, torch.Tensor]:
    """Validate user masks against the analysed mask sites; masks on frozen or unused layers warn."""
    if not isinstance(masks, dict):
        raise MaskError(f"masks must be a dict {{module_name: BoolTensor}}, got {type(masks).__name__}")
    modules = dict(model.named_modules())
    checked: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise MaskError(f"mask keys are module names (str) as in model.named_modules(), got {name!r} "
                            f"({type(name).__name__})")
        if name not in modules:
            close = [m for m in modules if m and (name in m or m in name)][:3]
            raise MaskError(f"mask for unknown module '{name}'" + (f"; did you mean {close}?" if close else ".") +
                            " Keys are module names as in model.named_modules().")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise MaskError(f"mask for '{name}' must be a torch.bool tensor (True = alive), got {got}; "
                            "use e.g. gamma.abs() > 1e-3")
        if name not in sites:
            warnings.warn(f"mask for '{name}' is ignored: it is not a norm or channel-producing layer "
                          "whose channels nrfx follows", NrfxWarning, stacklevel=3)
            continue
        if mask.dim() != 1 or mask.numel() != sites[name]:
            raise MaskError(f"mask for '{name}' has shape {tuple(mask.shape)}, expected ({sites[name]},): "
                            "one entry per output channel of that layer")
        checked[name] = mask.detach().cpu()
        _warn_live_marked_dead(name, modules[name], checked[name])
    return checked


def _warn_live_marked_dead(name: str, module: nn.Module, mask: torch.Tensor) -> None:
    """Rule: a norm's mask that marks dead a channel whose scale is at least half its largest (alive by any
    threshold) is warned about: removing it changes the function, and a mask with True for dead does that."""
    weight = getattr(module, "weight", None)
    if not is_scale(module) or not isinstance(weight, torch.Tensor) or weight.is_meta or weight.numel() != mask.numel():
        return
    gamma = weight.detach().abs().flatten().cpu()
    strong = ~mask & (gamma >= 0.5 * gamma.max()) & (gamma > 0)
    if strong.any():
        warnings.warn(f"mask for '{name}' marks {int(strong.sum())} of {int((~mask).sum())} dead channels whose "
                      f"scale is far from 0 (|γ| up to {float(gamma[strong].max()):.3g}, the largest "
                      f"{float(gamma.max()):.3g}): they are removed as dead, which changes the model's function. "
                      "Masks mark live channels True (e.g. gamma.abs() > 1e-3); invert one that marks the dead",
                      NrfxWarning, stacklevel=3)


def whole_blocks(spaces, alive: list[torch.Tensor], informed: list[bool] | None = None) -> tuple[torch.Tensor, ...]:
    """Rule: a block of a space (``space.block`` channels) is alive when any of its channels is alive in
    any space of the same planning unit (``space.unit``) that some weight reads (``informed``; a space no
    weight reads, such as T5's per-head bias table or the kv heads of grouped-query attention, follows
    the others); block k of one space goes with block k of the others."""
    informed = informed if informed is not None else [True] * len(spaces)
    voting = {space.unit for space, known in zip(spaces, informed, strict=True) if known}
    units: dict[int, torch.Tensor] = {}
    for space, mask, known in zip(spaces, alive, informed, strict=True):
        if not known and space.unit in voting:
            continue
        blocks = mask.reshape(-1, space.block).any(1)
        units[space.unit] = blocks if space.unit not in units else units[space.unit] | blocks
    return tuple(units[space.unit].repeat_interleave(space.block) for space in spaces)
