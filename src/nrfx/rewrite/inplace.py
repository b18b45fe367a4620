"""inplace: a rejuvenated GraphModule's layers and tensors moved into the user's own model object.

The rewrite builds the rejuvenated GraphModule as always; ``transplant`` then makes the user's
model compute the same function without replacing it:

- every tensor of the GraphModule goes into the user's tensor of the same name through
  ``.data``: parameters and buffers keep their identity, resized (a resized parameter's
  ``grad`` is cleared);
- a layer that became an S/R layer (or an S/R layer that became plain again) is swapped in
  under every name the old one had, with the old one's hooks; per dense weight and bias, the
  stored block paired with an old parameter (same name, else the first one) *is* that old
  ``nn.Parameter`` object, so an optimizer built on ``model.parameters()`` still holds it;
- size attributes (``in_channels``, ``num_features``, ``num_groups``, …) are copied from the
  rewritten layer of the same type.

The forward stays the user's Python code: a channel bound that the GraphModule path rewrites
in the graph (slice bounds, split sizes, a functional conv's ``groups``, a channel mean's divisor) is a
literal there,
so ``freeze_for_inplace`` freezes its spaces before planning, with the reason.  After the
transplant the user's model and the GraphModule run once on the example inputs; if any output
differs, every change is undone (``Journal``) and a ``RewriteError`` names the output.

The plans of every in-place round travel with ``model.state_dict()`` as one uint8 tensor
under ``nrfx_plans`` (JSON), so a checkpoint names the architecture it needs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from nrfx.analysis.records import SumRecord
from nrfx.capture import swin
from nrfx.capture.guards import HOOK_STATE, untouched
from nrfx.errors import RewriteError
from nrfx.layers.srlayers import SR_LAYERS
from nrfx.plan.planner import Plan
from nrfx.rewrite.optim_state import dense_parameters

__all__ = ["carry_hooks", "freeze_for_inplace", "transplant", "Journal", "check_same_outputs", "record_round",
           "recorded_rounds", "PLANS_KEY", "set_data", "encode_rounds", "decode_rounds", "saves_plans", "pair_members",
           "skeleton", "materialise", "pinned_notes", "same_history"]

PLANS_KEY = "nrfx_plans"  # state-dict key (under the model's prefix) of the in-place rounds' plans
Rounds = list[dict[str, dict[str, Any]]]  # per round: {island path or "": plan as a dict}


# -- planning: what the user's code pins ------------------------------------------------------
def freeze_for_inplace(analysis, model: nn.Module | None = None):
    """Rule: every space under a literal the graph rewrite would move (slice bounds, split sizes, a
    functional conv's or group_norm's ``groups``, a sum/mean over channels) is frozen, since in place
    the user's code keeps it; so is every dim of the parameters of an attention module the capture opened
    (``nn.MultiheadAttention``, torchvision's Swin attention) in ``model``: its own code runs, with its
    ``embed_dim`` / input width and ``num_heads``."""
    reasons: dict[int, str] = _attention_modules(analysis, model)
    for name, record in analysis.slices():
        for s in analysis.space_ids(record.layout):
            reasons.setdefault(s, f"in place: node '{name}' spells channel bounds in the model's own code")
    for name, record in analysis.records.items():
        if isinstance(record, SumRecord):
            for s in analysis.space_ids(record.layout):
                reasons.setdefault(s, f"in place: node '{name}' sums these channels in the model's own code")
    for name, record in analysis.records.items():
        for _, layout in getattr(record, "sizes", ()) if getattr(record, "kind", None) == "view" else ():
            for s in analysis.space_ids(layout):
                reasons.setdefault(s, f"in place: node '{name}' spells attention heads in the model's own code")
    for name, record in analysis.layers("conv", "group_norm"):
        layout = record.input if record.transposed else record.output
        if record.groups > 1 and record.groups_arg is not None and layout is not None:
            for s in analysis.space_ids(layout):
                reasons.setdefault(s, f"in place: node '{name}' spells its groups in the model's own code")
    if not reasons:
        return analysis
    frozen = copy.copy(analysis)
    frozen.spaces = [dataclasses.replace(sp, frozen=(*sp.frozen, reasons[sp.index]))
                     if sp.index in reasons and not sp.is_frozen else sp for sp in analysis.spaces]
    return frozen


def _attention_modules(analysis, model: nn.Module | None) -> dict[int, str]:
    """Spaces of the parameters of every attention module in ``model`` that the capture opens
    (``nn.MultiheadAttention``: capture/mha; torchvision's Swin attention: capture/swin), with the reason they
    stay in place."""
    reasons: dict[int, str] = {}
    for path, module in model.named_modules() if model is not None else ():
        if not isinstance(module, (nn.MultiheadAttention, *swin.OPENED)):
            continue
        for name, _ in module.named_parameters():
            info = analysis.param_info.get(f"{path}.{name}" if path else name)
            for layout in info.dims if info is not None else ():
                for s in analysis.space_ids(layout) if layout is not None else ():
                    reasons.setdefault(s, f"in place: '{path}' is a {type(module).__name__}, whose code reads its "
                                          "widths and num_heads")
    return reasons


def pinned_notes(analysis, pinned) -> list[str]:
    """Plan notes naming every space ``freeze_for_inplace`` froze, with its reason."""
    return [f"space {new.index} ({new.width} channels) frozen {new.frozen[-1]}"
            for old, new in zip(analysis.spaces, pinned.spaces, strict=True) if new is not old]


# -- the transplant, undoable -----------------------------------------------------------------
@dataclass
class Journal:
    """What a transplant changed, newest last: tensor data, cleared grads, attributes (sizes, module slots)."""

    data: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    grads: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    attrs: list[tuple[dict, str, Any]] = field(default_factory=list)

    def set_data(self, tensor: torch.Tensor, data: torch.Tensor) -> None:
        """tensor.data = data, remembered."""
        self.data.append((tensor, tensor.data))
        set_data(tensor, data)

    def clear_grad(self, tensor: torch.Tensor) -> None:
        """tensor.grad = None, remembered."""
        self.grads.append((tensor, tensor.grad))
        tensor.grad = None

    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        """setattr(owner, name, value), remembered (modules through their dicts, so nothing is re-registered)."""
        self.set_item(_slot_dict(owner, name), name, value)

    def set_item(self, store: dict, name: str, value: Any) -> None:
        """store[name] = value, remembered."""
        self.attrs.append((store, name, store.get(name, _MISSING)))
        store[name] = value

    def undo(self) -> None:
        """Put back every tensor's data, then its grad (matching its data again), then every attribute."""
        for tensor, old in reversed(self.data):
            set_data(tensor, old)
        for tensor, grad in reversed(self.grads):
            tensor.grad = grad
        for store, name, old in reversed(self.attrs):
            if old is _MISSING:
                store.pop(name, None)
            else:
                store[name] = old
        self.data.clear()
        self.grads.clear()
        self.attrs.clear()


_MISSING = object()


def _slot_dict(owner: Any, name: str) -> dict:
    """The dict an attribute of ``owner`` lives in: a module's _modules/_parameters/_buffers or its __dict__."""
    if isinstance(owner, nn.Module):
        for store in (owner._modules, owner._parameters, owner._buffers):
            if name in store:
                return store
    return owner.__dict__


def set_data(tensor: torch.Tensor, data: torch.Tensor) -> None:
    """``tensor.data = data``; on a shape change autograd's cached gradient accumulator is dropped too.

    A graph still referenced (a ``loss`` kept across ``step()``) holds the parameter's accumulator,
    which remembers the old shape; autograd drops it only when the dtype changes, so the data
    passes through an empty tensor of another dtype first.
    """
    if tuple(tensor.shape) != tuple(data.shape):
        other = torch.float16 if data.dtype != torch.float16 else torch.float32
        tensor.data = torch.empty(0, dtype=other, device=data.device)
    tensor.data = data


def transplant(model: nn.Module, gm: torch.fx.GraphModule, journal: Journal) -> None:
    """Make ``model`` hold ``gm``'s layers and tensors: same objects where they survive, data resized."""
    paths = _paths_by_module(model)
    rewritten = set(getattr(gm, "nrfx_param_map", {}))
    for path, new in gm.named_modules():
        if not path or not (new._parameters or new._buffers):
            continue
        old = _user_module(model, path)
        if isinstance(new, SR_LAYERS) or isinstance(old, SR_LAYERS):
            if type(new) is not type(old) or new is not old:
                _swap(model, paths[id(old)], old, new, journal)
                continue
        _move_tensors(old, new, journal, {n for n in _own_names(new) if f"{path}.{n}" in rewritten})
        if type(new) is type(old):
            _copy_sizes(old, new, journal)
        if isinstance(old, nn.RNNBase):
            old.flatten_parameters()  # resized weights in one cuDNN chunk again (a no-op on the CPU)


def _user_module(model: nn.Module, path: str) -> nn.Module:
    """The user's module at a GraphModule path (the capture keeps the user's names)."""
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise RewriteError(f"in place: the rewritten module '{path}' has no counterpart in the model; "
                           "use inplace=False (a new GraphModule) for this model") from error


def _paths_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module object appears (shared modules have several)."""
    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    return paths


def _own_names(module: nn.Module) -> list[str]:
    """The names of a module's own parameters and buffers."""
    return [*module._parameters, *module._buffers]


def _move_tensors(old: nn.Module, new: nn.Module, journal: Journal, rewritten: set[str]) -> None:
    """Each of ``new``'s own parameters and buffers into the user's tensor of the same name (data only; those the
    plan ``rewritten`` lose their grad); one the user's layer lacks (a bias a constant fold created) is registered
    on it as is."""
    for store in ("_parameters", "_buffers"):
        mine = getattr(old, store)
        for name, tensor in getattr(new, store).items():
            target = mine.get(name)
            if tensor is None or tensor is target:
                continue
            if target is None:
                journal.set_item(mine, name, tensor)
                continue
            _resize(target, tensor, journal, name in rewritten)


def _resize(target: torch.Tensor, source: torch.Tensor, journal: Journal, rewritten: bool = True) -> None:
    """target keeps its identity and takes source's data; rewritten (its entries moved: survivors first) or
    resized, its grad is stale and cleared (a step right after would apply it to other channels)."""
    if (rewritten or tuple(target.shape) != tuple(source.shape)) and target.grad is not None:
        journal.clear_grad(target)
    journal.set_data(target, source.detach())


def _is_size(value: Any) -> bool:
    """An int (not a bool) or a tuple/list of ints: a layer's size attribute."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_size(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _copy_sizes(old: nn.Module, new: nn.Module, journal: Journal) -> None:
    """Size attributes the rewrite set on the layer (channels, features, groups) copied onto the user's."""
    for name, value in vars(new).items():
        if not name.startswith("_") and _is_size(value) and vars(old).get(name, value) != value:
            journal.set_attr(old, name, value)


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` takes ``old``'s forward, pre-forward and backward hooks (the same dicts: a hook removed later from
    one is removed from both)."""
    for name in HOOK_STATE:
        if name in vars(old):
            new.__dict__[name] = vars(old)[name]


def _swap(model: nn.Module, paths: list[str], old: nn.Module, new: nn.Module, journal: Journal) -> None:
    """Install ``new`` under every name of ``old``: hooks carried, its paired blocks are old's Parameters."""
    carry_hooks(old, new)
    new.train(old.training)
    _adopt_parameters(old, new, journal)
    for path in paths:
        parent, _, attr = path.rpartition(".")
        journal.set_attr(model.get_submodule(parent) if parent else model, attr, new)


def _adopt_parameters(old: nn.Module, new: nn.Module, journal: Journal) -> None:
    """Per dense weight/bias: each block of ``new`` paired with one of ``old``'s parameters becomes that object."""
    before = dense_parameters(old)
    for dense, (_, _, _, members) in dense_parameters(new).items():
        if dense not in before:
            continue
        for slot, old_param in pair_members(before[dense][3], members).items():
            fresh = new._parameters[slot]
            _resize(old_param, fresh, journal)
            old_param.requires_grad_(fresh.requires_grad)
            new._parameters[slot] = old_param


def pair_members(old: list[tuple[str, nn.Parameter]], new: list[tuple[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    """Rule: a new block takes the old parameter of its own name, else the first old one left; new slot -> old."""
    by_name = dict(old)
    pairs = {slot: by_name.pop(slot) for slot, _ in new if slot in by_name}
    left = list(by_name.values())
    for slot, _ in new:
        if slot not in pairs and left:
            pairs[slot] = left.pop(0)
    return pairs


# -- the check: the user's forward computes what the GraphModule computes ---------------------
@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, each one's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _run(module: nn.Module, call) -> list[Any]:
    """The output leaves of one eval-mode forward that leaves no trace on the module."""
    with torch.no_grad(), untouched(module), _evaluating(module):
        return pytree.tree_leaves(call(module))


def check_same_outputs(model: nn.Module, gm: torch.fx.GraphModule, example, journal: Journal) -> None:
    """The model after the transplant gives the GraphModule's outputs on the example; else undo and raise."""
    try:
        mine, expected = _run(model, example.call), _run(gm, lambda m: m(*example.flat()))
    except Exception as error:
        journal.undo()
        raise RewriteError(f"in place: the model no longer runs after the rewrite ({type(error).__name__}: {error}); "
                           "its own code reads a size nrfx changed. It was left as it was: use inplace=False, "
                           "or make that submodule a leaf (leaf_modules=[...]) so its channels freeze") from error
    problem = _difference(mine, expected)
    if problem:
        journal.undo()
        raise RewriteError(f"in place: the model's own forward does not compute what the rewrite computes ({problem}); "
                           "it was left as it was. Use inplace=False, and please report the model")


def _difference(mine: list[Any], expected: list[Any]) -> str | None:
    """The first output leaf that differs (structure, shape or value), described; None when all agree."""
    if len(mine) != len(expected):
        return f"{len(mine)} outputs instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(mine, expected, strict=True)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a != b:
                return f"output {i}: {a!r} instead of {b!r}"
            continue
        if a.shape != b.shape:
            return f"output {i}: shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        if a.is_floating_point() and not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * _scale(b), equal_nan=True):
            return f"output {i}: values differ by up to {float((a - b).abs().max()):.3g}"
        if not a.is_floating_point() and not torch.equal(a, b):
            return f"output {i}: values differ"
    return None


def _scale(t: torch.Tensor) -> float:
    """The largest finite magnitude of a tensor, at least 1."""
    finite = t[torch.isfinite(t)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


# -- the plans that travel with the state dict ------------------------------------------------
def recorded_rounds(model: nn.Module) -> Rounds:
    """The plans of every in-place round applied to ``model``, oldest first (empty when none)."""
    return list(model.__dict__.get("_nrfx_rounds", []))


def record_round(model: nn.Module, plans: dict[str, Plan]) -> None:
    """Append one round's plans to the model's history and make ``state_dict`` carry the history."""
    round_ = json.loads(json.dumps({path: plan.to_dict() for path, plan in plans.items()}))  # as a load reads it
    model.__dict__["_nrfx_rounds"] = [*recorded_rounds(model), round_]
    saves_plans(model)


def saves_plans(model: nn.Module) -> None:
    """Make ``model.state_dict()`` carry its in-place rounds (once per model object)."""
    if not model.__dict__.get("_nrfx_saves_plans"):
        model.register_state_dict_post_hook(_save_plans)
        model.__dict__["_nrfx_saves_plans"] = True


def _save_plans(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the in-place rounds' plans under ``prefix + nrfx_plans``."""
    rounds = recorded_rounds(module)
    if rounds:
        state_dict[prefix + PLANS_KEY] = encode_rounds(rounds)


def encode_rounds(rounds: Rounds) -> torch.Tensor:
    """The rounds as JSON bytes in a uint8 tensor (safe for ``weights_only`` loading and safetensors)."""
    return torch.frombuffer(bytearray(json.dumps(rounds).encode()), dtype=torch.uint8).clone()


def same_history(done: Rounds, saved: Rounds) -> bool:
    """Whether ``saved`` begins with the rounds ``done`` (plans compared without their notes)."""
    strip = lambda rounds: [{p: {k: v for k, v in plan.items() if k != "notes"} for p, plan in r.items()}  # noqa: E731
                            for r in rounds]
    return strip(saved[: len(done)]) == strip(done)


def skeleton(example):
    """The example with every tensor replaced by an empty one on the meta device: its shapes, dtypes and structure."""
    return dataclasses.replace(example, args=_to_meta(example.args), kwargs=_to_meta(example.kwargs))


def materialise(example, device: torch.device):
    """A skeleton's tensors as zeros on ``device`` (token ids 0 are valid; values only matter to folds)."""
    fill = lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return dataclasses.replace(example, args=pytree.tree_map(fill, example.args),
                               kwargs=pytree.tree_map(fill, example.kwargs))


def _to_meta(tree: Any) -> Any:
    """Tensors of a tree as empty meta tensors of the same shape and dtype."""
    return pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, tree)


def decode_rounds(tensor: torch.Tensor) -> Rounds:
    """The rounds a state dict carries."""
    return json.loads(bytes(tensor.to("cpu", torch.uint8).tolist()).decode())
