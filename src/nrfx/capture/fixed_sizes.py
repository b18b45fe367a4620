"""Input sizes torch.export fixed: probed at another size, asserted where the graph does not follow them.

torch.export keeps the batch dim dynamic (``front_ends._batch_dynamic``) and fixes every other
input dim at the example's size, so a size the model reads from its input (a pooling kernel from
``x.shape``, a ``view`` onto a patch grid, a slice of position embeddings) is a literal of the graph.
At another size such a graph fails, or computes another function without a word (a global
``avg_pool2d(y, y.shape[-2:])`` pools only a corner).  Marking those dims dynamic as well would make
most graphs follow them, but torch.export's symbolic reasoning then costs seconds to minutes (49 s
instead of 1 s on a tiny Hugging Face Swin).  So each *group* of fixed dims (every input dim, past
dim 0, of one example size: an image's height and width, a token sequence and its attention mask) is
probed: the model and the graph run on the example resized to half that size plus one in those dims
and to 1.5 times it plus one, and where the graph fails or differs from the model at a size the model
takes, or the model itself takes neither size, the graph
asserts the size on every dim of the group (``torch._assert``, Python-level: no aten call), so a
call at another size raises with the fix instead of computing a wrong result.  The fx path needs no
probe: fx traces sizes as values.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree

__all__ = ["FixedDim", "GUARD", "fixed_dims", "size_groups", "by_input", "probe_sizes", "resized_inputs",
           "guard_sizes", "sizes_unchecked"]

FixedDim = tuple[int, int]  # (index of the input leaf, dim)


def fixed_dims(gm: torch.fx.GraphModule, leaves: tuple) -> dict[int, list[FixedDim]]:
    """Rule: input dims past dim 0 whose placeholder value keeps an int size (export fixed it), grouped by size."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def fixed(index: int, dim: int) -> bool:
        val = placeholders[index].meta.get("val") if index < len(placeholders) else None
        return isinstance(val, torch.Tensor) and val.dim() == leaves[index].dim() and isinstance(val.shape[dim], int)

    groups = {size: [d for d in dims if fixed(*d)] for size, dims in size_groups(leaves).items()}
    return {size: dims for size, dims in groups.items() if dims}


def size_groups(leaves: tuple) -> dict[int, list[FixedDim]]:
    """Every tensor input dim past dim 0, grouped by its size (an image's height and width, a sequence and its mask)."""
    groups: dict[int, list[FixedDim]] = {}
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            for dim in range(1, leaf.dim()):
                groups.setdefault(int(leaf.shape[dim]), []).append((index, dim))
    return groups


def by_input(dims: list[FixedDim]) -> list[list[FixedDim]]:
    """A group split by the input it belongs to: where inputs merely share a size (an image 16 wide and a vector of 16
    features), the model takes none of the group resized at once, but may take each input's part."""
    parts: dict[int, list[FixedDim]] = {}
    for index, dim in dims:
        parts.setdefault(index, []).append((index, dim))
    return list(parts.values())


def probe_sizes(size: int) -> tuple[int, int]:
    """A smaller and a larger size, both odd where they can be: half plus one and 1.5 times plus one (17 and 49 for
    32), so that a branch on a threshold past the example, or a padding to a multiple, shows at one of them."""
    if size >= 4:
        return size // 2 + 1, size + size // 2 + 1
    return (1 if size > 1 else 2), 2 * size + 1


def resized_inputs(args: tuple, kwargs: dict, dims: list[FixedDim], size: int) -> Iterator[tuple[int, tuple, dict]]:
    """(probe size, args, kwargs) at each of ``probe_sizes(size)``, smaller first: the inputs with every dim in
    ``dims`` resized from ``size`` to the probe size (``_resized_leaves``)."""
    leaves = tuple(pytree.tree_leaves((args, kwargs)))  # the order of a captured graph's placeholders
    spec = pytree.tree_structure((args, kwargs))
    for probe in probe_sizes(size):
        yield probe, *pytree.tree_unflatten(list(_resized_leaves(leaves, dims, size, probe)), spec)


def _resized_leaves(leaves: tuple, dims: list[FixedDim], size: int, probe: int) -> tuple:
    """The leaves with every dim in ``dims`` resized from ``size`` to ``probe`` by repeating its first entries
    (real values: token ids stay ids, masks stay masks); a float leaf that holds one value throughout (the zeros
    ``apply_plan`` replays on) is drawn at random instead, or a fixed pooling window could not show."""
    out = list(leaves)
    for index, dim in dims:
        x = out[index]
        out[index] = x.index_select(dim, torch.arange(probe, device=x.device) % size)
    return tuple(_varied(x, seed) for seed, x in enumerate(out))


def _varied(x: object, seed: int) -> object:
    """A float tensor holding one value throughout drawn from a normal distribution (seeded); anything else as is."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.is_meta or x.numel() < 2:
        return x
    if bool((x != x.flatten()[0]).any()):
        return x
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)


GUARD = "nrfx: torch.export fixed"  # how every size assert of ``guard_sizes`` begins


def guard_sizes(gm: torch.fx.GraphModule, dims: list[FixedDim], size: int, why: Callable[[str, int], str]) -> None:
    """Rule: a graph that runs at one size of a group of input dims checks each of them first (``torch._assert``
    on ``x.size(dim) == size``; ``why(input name, dim)`` is the message)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    anchor = placeholders[-1]
    for index, dim in dims:
        node = placeholders[index]
        with graph.inserting_after(anchor):
            found = graph.call_method("size", (node, dim))
        with graph.inserting_after(found):
            same = graph.call_function(operator.eq, (found, size))
        with graph.inserting_after(same):
            anchor = graph.call_function(torch._assert, (same, why(node.name, dim)))
    graph.lint()
    gm.recompile()


@contextlib.contextmanager
def sizes_unchecked() -> Iterator[None]:
    """While on, the size asserts ``guard_sizes`` wrote (``GUARD``) pass: a graph can be measured at another size where
    its code allows (the rewrite's constant folds must hold wherever the model runs, in place at any size)."""
    original = torch._assert

    def lenient(condition, message):
        if isinstance(message, str) and message.startswith(GUARD):
            return None
        return original(condition, message)

    torch._assert = lenient
    try:
        yield
    finally:
        torch._assert = original
