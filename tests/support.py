"""The tests' shared helpers, in one module: dead channels, function preservation, aten call counts.

Dead channels: ``kill_channels`` (per channel space, exact zeros), ``kill_per_norm`` (drawn per
norm), ``kill_groups`` (whole blocks), ``kill_gates`` (nrfx.Gate values), ``zero_scales`` (γ only,
no analysis needed).  Checks: ``assert_preserved`` (every scheme × rescale keeps the function, the
model untouched), ``assert_aligned`` (a plan's alignment), ``assert_same_outputs`` and
``assert_same_structure`` (outputs of third-party models).  ``AtenCalls`` counts aten calls (meta
device too).  ``small_cnn``, ``Task`` and ``EXAMPLE``: the driver's small learnable task.
"""

from __future__ import annotations

import collections
import hashlib

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import nrfx
from nrfx.layers.gates import Gate
from nrfx.ops.layer_kinds import is_scale
from nrfx.plan.planner import align_steps, planning_units

RTOL, RTOL_FLOAT32 = 1e-9, 1e-4  # assert_same_outputs: float64 and float32 outputs


class AtenCalls(TorchDispatchMode):
    """Every aten call under it: ``ops`` in order by full name (``aten::_foreach_sign``), ``calls`` counted by op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def assert_aligned(analysis, plan) -> int:
    """Every space of a free unit whose widths are multiples of ``plan.align`` keeps |S| and |S| + |R| so.

    (A unit narrower than one alignment step keeps its unaligned behaviour.)  Returns how many spaces were checked.
    """
    units = planning_units(analysis)
    full = [analysis.spaces[u.spaces[0]].width // u.blocks[0] for u in units]
    checked = 0
    for unit, step, n in zip(units, align_steps(units, full, plan.align), full, strict=True):
        widths = [analysis.spaces[s].width for s in unit.spaces]
        if unit.frozen or any(w % plan.align for w in widths) or n < step:
            continue
        for s in unit.spaces:
            width = len(plan.keep[s]) + plan.grow[s]
            assert len(plan.keep[s]) % plan.align == 0 and width % plan.align == 0, (s, len(plan.keep[s]), width)
            checked += 1
    return checked


def kill_channels(model: nn.Module, analysis, fraction: float = 0.4, seed: int = 0) -> dict[int, torch.Tensor]:
    """Pick dead channels per free space; zero γ and β there in every norm on that space.

    Also randomises β, running mean and running var of the live channels so that eval-mode
    norms are far from the identity.  Returns the dead mask per space index.
    """
    gen = torch.Generator().manual_seed(seed)
    dead = {s.index: torch.rand(s.width, generator=gen) < fraction for s in analysis.spaces if not s.is_frozen}
    with torch.no_grad():
        for _, norm, segments in analysis.norm_spaces(model):
            randomise_norm(norm, gen)
            for s, entries in segments:
                if s in dead:
                    norm.weight[entries].view(len(dead[s]), -1)[dead[s]] = 0
                    norm.bias[entries].view(len(dead[s]), -1)[dead[s]] = 0
    return dead


def randomise_norm(norm: nn.Module, gen: torch.Generator) -> None:
    """Random affine and running statistics (eval-mode norms that are far from identity)."""
    n = norm.weight.numel()
    norm.weight.copy_(torch.rand(n, generator=gen) + 0.5)
    norm.bias.copy_(torch.randn(n, generator=gen))
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean.copy_(torch.randn(n, generator=gen))
        norm.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def kill_per_norm(model: nn.Module, analysis, fraction: float = 0.4, seed: int = 0, block: int = 1,
                  constants: bool = False) -> int:
    """Zero γ of random channels (blocks of ``block``) drawn *independently for every norm* (not per space); β
    zero too, or with ``constants`` random with |β| ≥ 0.5 (the dead channel then emits a constant).

    A channel dead at one norm of a space may be alive at another: a norm reading a zero
    channel emits a constant (running mean, β), which the rewrite must fold or keep.  Also
    randomises the live entries.  Returns how many (norm, channel) entries were zeroed.
    """
    gen = torch.Generator().manual_seed(seed)
    killed = 0
    with torch.no_grad():
        for _, norm, segments in analysis.norm_spaces(model):
            randomise_norm(norm, gen)
            for s, entries in segments:
                if analysis.spaces[s].is_frozen:
                    continue
                width = analysis.spaces[s].width
                dead = (torch.rand(width // block, generator=gen) < fraction).repeat_interleave(block)
                norm.weight[entries].view(width, -1)[dead] = 0
                norm.bias[entries].view(width, -1)[dead] = _shifts(int(dead.sum()), gen, constants, norm.bias.dtype)
                killed += int(dead.sum())
    return killed


def _shifts(count: int, gen: torch.Generator, constants: bool, dtype: torch.dtype) -> torch.Tensor | float:
    """β of the dead channels: 0, or random signs and sizes in [0.5, 1.5) (constants)."""
    if not constants:
        return 0
    sign = torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * (0.5 + torch.rand(count, generator=gen)))[:, None].to(dtype)


def norms_per_space(model: nn.Module, analysis) -> int:
    """The largest number of norm scales on one free space (1 or less: per-norm = per-space)."""
    count: dict[int, int] = {}
    for _, _, segments in analysis.norm_spaces(model):
        for s, _ in segments:
            if not analysis.spaces[s].is_frozen:
                count[s] = count.get(s, 0) + 1
    return max(count.values(), default=0)


def kill_groups(model: nn.Module, analysis, fraction: float = 0.3, seed: int = 0) -> None:
    """Zero γ and β of random whole blocks (the same blocks in every space of a planning unit)."""
    gen = torch.Generator().manual_seed(seed)
    dead = {}
    for unit in planning_units(analysis):
        if unit.frozen or max(unit.blocks) == 1:
            continue
        blocks = torch.rand(analysis.spaces[unit.spaces[0]].width // unit.blocks[0], generator=gen) < fraction
        dead.update({s: blocks.repeat_interleave(b) for s, b in zip(unit.spaces, unit.blocks, strict=True)})
    with torch.no_grad():
        for _, norm, segments in analysis.norm_spaces(model):
            for s, entries in segments:
                if s in dead:
                    norm.weight[entries][dead[s]] = 0
                    norm.bias[entries][dead[s]] = 0


def kill_gates(model: nn.Module, fraction: float = 0.4, seed: int = 0) -> int:
    """Random gate values in [0.5, 1.5), exact zeros at a random ``fraction``; returns how many were zeroed."""
    gen = torch.Generator().manual_seed(seed)
    killed = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gate):
                w = module.weight
                w.copy_(torch.rand(w.numel(), generator=gen, dtype=w.dtype) + 0.5)
                dead = torch.rand(w.numel(), generator=gen) < fraction
                w[dead] = 0
                killed += int(dead.sum())
    return killed


SCHEMES = [(s, r) for s in ("nr", "cr", "ca") for r in (False, True)]


def snapshot(model: nn.Module, exact: bool = True) -> dict[str, torch.Tensor | str]:
    """A copy of every tensor of a model's state, or (exact=False: models of several GB) a digest of its bytes."""
    if exact:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: _digest(v) for k, v in model.state_dict().items()}


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (no copy for contiguous CPU tensors; SHA-256 runs on the CPU's
    SHA instructions, twice BLAKE2's speed here: the zoo's largest models digest 5 GB twice)."""
    t = tensor.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{t.dtype}{tuple(t.shape)}" + hashlib.sha256(data).hexdigest()


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor | str]) -> None:
    """The model's state is bit-for-bit what it was."""
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        same = _digest(after[key]) == value if isinstance(value, str) else torch.equal(value, after[key])
        assert same, key


def assert_preserved(model: nn.Module, x: torch.Tensor, analysis, schemes=SCHEMES, exact_snapshot: bool = True) -> None:
    """Every scheme × rescale gives the original outputs (float64, rtol 1e-7); the model is untouched.

    Without rescaling the default ``align=8`` is used, with it ``align=1`` (both widths checked).
    """
    before = snapshot(model, exact_snapshot)
    with torch.no_grad():
        expected = model(x)
    for scheme, rescale in schemes:
        align = 1 if rescale else 8
        new = nrfx.rejuvenate(model, None, None, example_inputs=x, scheme=scheme, rescale=rescale, analysis=analysis,
                              align=align)
        assert_aligned(analysis, new.nrfx_plan)
        dead = analysis.utilization(analysis.masks_from(model)).live_params < analysis.params
        assert not dead or new.nrfx_plan.cost_live < new.nrfx_plan.cost_before  # dead channels were removed
        with torch.no_grad():
            got = new(x)
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9 * scale, msg=f"{scheme} rescale={rescale}")
        assert sum(p.numel() for p in new.parameters()) <= analysis.params
        del new, got  # one rewritten copy alive at a time (the zoo's largest models are ~5 GB in float64)
    assert_unchanged(model, before)


def assert_kept_exactly(model: nn.Module, x: torch.Tensor, *, schemes=("nr",), budgets=(None,), align: int = 1,
                        analysis=None, others: tuple = ()) -> nn.Module:
    """Every scheme × budget with ``constants="keep"`` gives the model's outputs on ``x`` and on ``others``
    (float64: rtol 1e-9, atol 1e-12) within its budget; returns the last rewritten model."""
    new = None
    for scheme in schemes:
        for budget in budgets:
            new = nrfx.rejuvenate(model, None, budget, example_inputs=x, scheme=scheme, align=align, constants="keep",
                                  analysis=analysis)
            for inputs in (x, *others):
                torch.testing.assert_close(new(inputs), model(inputs), rtol=1e-9, atol=1e-12,
                                           msg=lambda m, s=scheme, b=budget: f"{s} budget={b}: {m}")
            assert new.nrfx_plan.cost_after <= new.nrfx_plan.budget
    return new


def _tensors(output) -> list[torch.Tensor]:
    """The tensor leaves of a model output (tuples, lists, dicts, HF ModelOutput)."""
    if hasattr(output, "to_tuple"):  # HF ModelOutput
        output = output.to_tuple()
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def assert_same_outputs(got, expected, msg: str = "") -> None:
    """Every tensor leaf equal to rtol 1e-9 (atol 1e-9 of the leaf's largest entry; 1e-4 in float32)."""
    got_t, expected_t = _tensors(got), _tensors(expected)
    assert len(got_t) == len(expected_t), msg
    for g, e in zip(got_t, expected_t, strict=True):
        scale = e.abs().max().item() if e.numel() and e.is_floating_point() else 1.0
        rtol = RTOL if e.dtype == torch.float64 else RTOL_FLOAT32
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol * max(scale, 1e-30), msg=msg)


def assert_same_structure(got, expected, where: str = "output") -> None:
    """The same containers all the way down: classes (HF ModelOutput, tuples, dicts), keys, lengths.

    A plain ``collections.OrderedDict`` may come back as a ``dict`` with the same keys in order
    (torchvision segmentation under fx): the same API.  A subclass (HF ModelOutput) must stay itself.
    """
    if type(expected) is collections.OrderedDict and type(got) is dict:
        pass
    else:
        assert type(got) is type(expected), f"{where}: {type(got).__name__} instead of {type(expected).__name__}"
    if isinstance(expected, dict):
        assert list(got.keys()) == list(expected.keys()), where
        for key in expected:
            assert_same_structure(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert_same_structure(g, e, f"{where}[{i}]")


EXAMPLE = torch.zeros(2, 1, 8, 8)


def small_cnn(width: int = 16, seed: int = 0) -> nn.Module:
    """conv-bn-relu ×3, pool, linear: 4 classes from 8×8 single-channel inputs."""
    torch.manual_seed(seed)
    layers, channels = [], 1
    for _ in range(3):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 4))


class Task:
    """Class = sign pattern of a fixed random 2-d projection of the input (4 classes)."""

    def __init__(self, seed: int = 1) -> None:
        self.projection = torch.randn(64, 2, generator=torch.Generator().manual_seed(123))
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 1, 8, 8, generator=self.generator)
        signs = (x.flatten(1) @ self.projection > 0).long()
        return x, signs[:, 0] * 2 + signs[:, 1]


# zoo sweeps: over ~100M parameters or slow at their smallest input (one variant each; BIGGEST in a fresh process)
HEAVY = {"regnet_y_128gf", "vit_h_14", "regnet_y_32gf", "regnet_y_16gf", "vit_l_16", "vit_l_32", "efficientnet_v2_l",
         "swin_v2_b", "swin_b", "maxvit_t", "vgg19_bn", "vgg19", "vgg16", "vgg16_bn", "vgg13", "vgg13_bn", "vgg11",
         "convnext_large", "convnext_base"}
BIGGEST = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32"}  # over 300M parameters: 5 GB and more in float64


def zoo_input_size(name: str) -> int:
    """Smallest input the model accepts, for speed."""
    if name.startswith(("vit", "swin", "maxvit")):
        return 224
    return 299 if name == "inception_v3" else 64


def zero_scales(model: nn.Module, fraction: float = 0.5, seed: int | None = None, shifts: bool = False) -> int:
    """Zero γ of ``fraction`` of the channels of every per-channel scale layer (BatchNorm, GroupNorm, Gate, a
    registered one): the first ones (``seed`` None) or drawn per layer; ``shifts``: β too.  Returns how many."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    killed = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not is_scale(module) or weight is None:
                continue
            n = weight.numel()
            if gen is None:
                dead = torch.arange(int(fraction * n))
            else:
                dead = torch.randperm(n, generator=gen)[: round(fraction * n)]
            weight.view(-1)[dead] = 0
            if shifts and getattr(module, "bias", None) is not None:
                module.bias.view(-1)[dead] = 0
            killed += len(dead)
    return killed
