"""rewrite: build the rejuvenated GraphModule from a plan; the input model is never touched.

Every space is ordered [S…, R…].  For each parameter, along every dim that carries a
layout: S×S entries are copied, all-R entries come from the layer's own initialiser at the
new shape (seeded), and mixed entries (W_S→R, W_R→S) are zero.  A dim whose space is
frozen is all S, so consumers that are not rejuvenated read R inputs through zeros.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx
from torch import nn

from .errors import RewriteError
from .gates import Gate
from .maps import DimMap, ParamMap, dim_map, param_maps

__all__ = ["DimMap", "ParamMap", "dim_map", "param_maps", "rewrite_params", "copy_for_rewrite", "copy_block",
           "fix_attributes", "set_group_norm_width", "verify", "matched_gamma"]


def _combine(old: torch.Tensor, fresh: torch.Tensor, pmap: ParamMap) -> torch.Tensor:
    """S×S from old, all-R from fresh, mixed S/R entries zero."""
    new = torch.zeros(fresh.shape, dtype=old.dtype, device=old.device)
    with torch.no_grad():
        copy_block(new, fresh.detach(), pmap, rejuvenated=True)
        copy_block(new, old.detach(), pmap, rejuvenated=False)
    return new


def copy_block(new: torch.Tensor, source: torch.Tensor, pmap: ParamMap, rejuvenated: bool) -> None:
    """Copy the all-R block (from the fresh tensor) or the all-S block (from the old one)."""
    target = [slice(None)] * new.dim()
    block = source
    for m in pmap.dims:
        positions = torch.nonzero(m.source < 0).flatten() if rejuvenated else m.kept
        if positions.numel() == 0:
            return
        picked = positions if rejuvenated else m.source[positions]
        block = block.index_select(m.dim, picked.to(block.device))
        target[m.dim] = _as_slice(positions)
    _assign(new, target, block.to(new.device, new.dtype))


def _as_slice(index: torch.Tensor):
    """A slice when the index is a contiguous ascending run, else the index itself."""
    first, n = int(index[0]), index.numel()
    if int(index[-1]) - first == n - 1 and (n == 1 or bool(torch.all(index[1:] > index[:-1]))):
        return slice(first, first + n)
    return index


def _assign(new: torch.Tensor, target: list, block: torch.Tensor) -> None:
    """new[target] = block, where target mixes slices and per-dim index tensors (outer product)."""
    if all(isinstance(t, slice) for t in target):
        new[tuple(target)] = block
        return
    full = [torch.arange(new.shape[d])[t] if isinstance(t, slice) else t for d, t in enumerate(target)]
    ndim = new.dim()
    index = []
    for d, t in enumerate(full):
        shape = [1] * ndim
        shape[d] = -1
        index.append(t.reshape(shape).to(new.device))
    new[tuple(index)] = block


_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.Embedding,
                nn.PReLU, Gate)
_SCALES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, Gate)  # per-channel scales: R entries start at γ0


def _fresh_tensors(module: nn.Module, shapes: dict[str, tuple[int, ...]],
                   gamma0: float | None) -> dict[str, torch.Tensor]:
    """The layer's own initial values at the new shapes (reset_parameters on a detached copy)."""
    clone = copy.copy(module)
    clone._parameters = {k: None if v is None else nn.Parameter(torch.empty_like(v, device="cpu"), v.requires_grad)
                         for k, v in module._parameters.items()}
    clone._buffers = {k: None if v is None else torch.empty_like(v, device="cpu") for k, v in module._buffers.items()}
    for attr, shape in shapes.items():
        old = getattr(module, attr)
        tensor = torch.empty(shape, dtype=old.dtype, device="cpu")
        if attr in clone._parameters:
            clone._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            clone._buffers[attr] = tensor
    fix_attributes(clone)
    with torch.no_grad():
        if isinstance(clone, nn.modules.batchnorm._NormBase):
            clone.reset_running_stats()
            if clone.affine:
                nn.init.ones_(clone.weight) if gamma0 is None else nn.init.constant_(clone.weight, gamma0)
                nn.init.zeros_(clone.bias)
        elif isinstance(clone, (Gate, nn.GroupNorm)):
            if clone.weight is not None:
                nn.init.ones_(clone.weight) if gamma0 is None else nn.init.constant_(clone.weight, gamma0)
            if getattr(clone, "bias", None) is not None:
                nn.init.zeros_(clone.bias)
        elif hasattr(clone, "reset_parameters"):
            clone.reset_parameters()
    return {attr: getattr(clone, attr) for attr in shapes}


def _generic_fresh(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial values for a bare parameter: PyTorch's default linear/conv init, zeros for vectors."""
    tensor = torch.empty(shape, dtype=old.dtype, device="cpu")
    if tensor.dim() >= 2:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    else:
        nn.init.zeros_(tensor)
    return tensor


def copy_for_rewrite(gm: torch.fx.GraphModule, maps: dict[str, ParamMap]) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` that shares (does not copy) the tensors the rewrite replaces anyway."""
    tensors = dict(gm.named_parameters())
    tensors.update(gm.named_buffers())
    memo = {id(tensors[name]): tensors[name] for name in maps if name in tensors}
    return copy.deepcopy(gm, memo)


def rewrite_params(gm: torch.fx.GraphModule, analysis, plan, maps: dict[str, ParamMap]) -> list[str]:
    """Rewrite pass: replace, in the copy ``gm``, every parameter and buffer whose spaces change."""
    by_owner: dict[str, dict[str, ParamMap]] = {}
    for name, pmap in maps.items():
        path, _, attr = name.rpartition(".")
        by_owner.setdefault(path, {})[attr] = pmap
    with torch.random.fork_rng(devices=[]):  # R weights drawn on the CPU: the same on every device
        torch.default_generator.manual_seed(plan.seed)
        for path in sorted(by_owner):
            _rewrite_module(gm, path, by_owner[path], plan.gamma0)
    return []


def matched_gamma(survivors: torch.Tensor) -> float:
    """γ0 = "match": the median |γ| of a norm's surviving channels (zeros ignored; 1 when there are none)."""
    values = survivors.detach().abs().flatten()
    values = values[values != 0]
    return float(values.median()) if values.numel() else 1.0


def _rewrite_module(gm: nn.Module, path: str, attrs: dict[str, ParamMap], gamma0: float | str | None) -> None:
    """New tensors for the changed attributes of one module, then its size attributes."""
    module = gm.get_submodule(path) if path else gm
    shapes = {attr: pmap.new_shape for attr, pmap in attrs.items()}
    if gamma0 == "match":  # per norm: its survivors' γ, read from the old weight before it is replaced
        weight = attrs.get("weight")
        is_norm = isinstance(module, _SCALES) and weight is not None and bool(weight.dims)
        gamma0 = matched_gamma(module.weight[weight.dims[0].source[weight.dims[0].kept]]) if is_norm else None
    if isinstance(module, _LAYER_TYPES):
        fresh = _fresh_tensors(module, shapes, gamma0)
    else:
        fresh = {attr: _generic_fresh(getattr(module, attr), shape) for attr, shape in shapes.items()}
    for attr, pmap in attrs.items():
        old = getattr(module, attr)
        new = _combine(old, fresh[attr], pmap)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new
    fix_attributes(module)


def fix_attributes(module: nn.Module) -> None:
    """Set a layer's size attributes (in/out channels, features, groups) from its weights."""
    if isinstance(module, nn.modules.conv._ConvNd):
        _fix_conv(module)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = module.weight if module.weight is not None else module.running_mean
        if source is not None:
            module.num_features = source.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, Gate):
        module.num_features = module.weight.numel()
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        set_group_norm_width(module, module.weight.numel())


def set_group_norm_width(norm: nn.GroupNorm, channels: int) -> None:
    """GroupNorm over ``channels``: channels per group unchanged, ``num_groups`` follows the width."""
    per_group = norm.num_channels // norm.num_groups
    norm.num_channels, norm.num_groups = channels, channels // per_group


def _fix_conv(conv: nn.modules.conv._ConvNd) -> None:
    """Conv attributes: channels per group unchanged, ``groups`` follows the width (depthwise: groups == channels)."""
    w = conv.weight
    if conv.transposed:
        if conv.groups > 1:
            conv.groups = w.shape[0] // (conv.in_channels // conv.groups)
        conv.in_channels = w.shape[0]
        conv.out_channels = w.shape[1] * conv.groups
    else:
        if conv.groups > 1:
            conv.groups = w.shape[0] // (conv.out_channels // conv.groups)
        conv.out_channels = w.shape[0]
        conv.in_channels = w.shape[1] * conv.groups


def verify(gm: torch.fx.GraphModule) -> None:
    """Module invariants after a rewrite (sizes agree with weights) and graph lint."""
    gm.graph.lint()
    for name, module in gm.named_modules():
        problem = _invariant_problem(module)
        if problem:
            raise RewriteError(f"rewritten module '{name}' ({type(module).__name__}) is inconsistent: {problem}")


def _invariant_problem(module: nn.Module) -> str | None:
    """What is wrong with a layer's sizes, or None."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        w = module.weight
        if w.shape[0] != module.out_channels or w.shape[1] * module.groups != module.in_channels:
            return f"weight {tuple(w.shape)} vs in={module.in_channels} out={module.out_channels} g={module.groups}"
        if module.bias is not None and module.bias.shape[0] != module.out_channels:
            return f"bias {tuple(module.bias.shape)} vs out={module.out_channels}"
    if isinstance(module, nn.Linear) and tuple(module.weight.shape) != (module.out_features, module.in_features):
        return f"weight {tuple(module.weight.shape)} vs ({module.out_features}, {module.in_features})"
    if isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
        return f"num_channels={module.num_channels} is not a multiple of num_groups={module.num_groups}"
    if isinstance(module, nn.GroupNorm) and module.weight is not None and module.weight.numel() != module.num_channels:
        return f"weight {tuple(module.weight.shape)} vs num_channels={module.num_channels}"
    if isinstance(module, Gate) and module.weight.numel() != module.num_features:
        return f"weight {tuple(module.weight.shape)} vs num_features={module.num_features}"
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        if module.running_mean.shape[0] != module.num_features:
            return f"running_mean {tuple(module.running_mean.shape)} vs num_features={module.num_features}"
    return None
