"""Random small CNNs for property tests: plain-data architectures, built at full or at live widths.

An architecture (``Arch``) is a tuple of ops over numbered values; value 0 is the input and op
``i`` produces value ``i + 1``.  Three things are derived from it, independently of nrfx:

* ``build(arch)`` -- the ``nn.Module`` (``Net``), module names ``c{i}``/``b{i}`` (conv, norm),
  ``n{i}`` (a BatchNorm or GroupNorm on any value), ``r{i}a``/``r{i}an``/``r{i}b``/``r{i}bn`` (residual),
  ``s{i}a``/``s{i}b`` (SE), ``m{i}a``/``m{i}gn``/``m{i}b`` (gated MLP), ``head``;
* ``ChannelGraph(arch, masks)`` -- every channel followed by hand, one element per channel:
  union-find ties (adds, depthwise convs, SE gates), frozen channels (the input, the logits),
  groups (a grouped conv's group k in and out, a GroupNorm's groups: kept or removed whole;
  a value read in groups of two sizes, or grouped with a frozen value, freezes), the channels
  each weight reads and whether they are known zero under the masks (``{module name:
  BoolTensor}``, True = alive), hence the dead channels;
* ``graph.narrow(source)`` -- the same network with the dead channels removed, weights copied
  from ``source`` when given; ``zero_masked(model, masks)`` makes the masked channels output
  exact zeros (γ = β = 0, or zero rows of a norm-less conv), so that ``narrow`` computes the
  same function as the full model (function-preservation tests can reuse this).

``archs()`` is the hypothesis strategy; ``repair_masks`` keeps every tensor at least one
channel wide so that the narrow network can be built.  Grouped convs (groups 2 or 4), GroupNorm
and gated MLPs are drawn in architectures without concats and slices, where every value is one
channel space (the groups of a value then never straddle two spaces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from nrfx import Gate

__all__ = [
    "Conv", "Residual", "Add", "Cat", "Slice", "SE", "Norm", "GNorm", "Mlp", "Pool", "Head", "Arch", "Net", "build",
    "shapes",
    "ChannelGraph", "zero_masked", "repair_masks", "archs", "mask_sites", "masks_for", "count_macs",
]


# -- the architecture: plain data ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    """conv k×k (padding k//2, stride) → BatchNorm (if bn) → ReLU (if act); groups == in == out is depthwise."""

    src: int
    out: int
    k: int = 3
    stride: int = 1
    groups: int = 1
    bn: bool = True
    act: bool = True


@dataclass(frozen=True)
class Residual:
    """relu(bn(conv(relu(bn(conv(x))))) + x) with the add written in ``style``."""

    src: int
    mid: int
    k: int = 3
    style: str = "op"  # op | method | function | iadd | add_ | add_unused


@dataclass(frozen=True)
class Add:
    """a + b (same width and size), in ``style``: op | method | function | sub, or a join of ``_JOINS``."""

    a: int
    b: int
    style: str = "op"


@dataclass(frozen=True)
class Cat:
    """torch.cat(srcs, 1) (same spatial size; a source may repeat)."""

    srcs: tuple[int, ...]


@dataclass(frozen=True)
class Slice:
    """Channels [start, stop) of src, as getitem | narrow | split | chunk."""

    src: int
    start: int
    stop: int
    style: str = "getitem"


@dataclass(frozen=True)
class SE:
    """x * sigmoid(conv1x1(relu(conv1x1(avgpool(x)))))."""

    src: int
    hidden: int


@dataclass(frozen=True)
class Pool:
    """2×2 max or avg pooling."""

    src: int
    kind: str = "max"


@dataclass(frozen=True)
class Head:
    """Linear classifier: global average pool + flatten (gap) or flatten of C×H×W."""

    src: int
    classes: int = 3
    gap: bool = True


@dataclass(frozen=True)
class Norm:
    """BatchNorm on a value that no conv produced just before (after a cat, an add, a slice): a channel
    zero at its input leaves as a constant (β − γ·μ/σ), so its zeros come from its own mask only."""

    src: int


@dataclass(frozen=True)
class GNorm:
    """GroupNorm(groups, C) on a value: resized in whole groups; zeros in do not pass."""

    src: int
    groups: int


@dataclass(frozen=True)
class Mlp:
    """x + fc2(gate(relu(fc1(x)))) over channels-last (permute), an ``nrfx.Gate`` on the hidden dim."""

    src: int
    hidden: int


@dataclass(frozen=True)
class Arch:
    ops: tuple
    in_channels: int = 3
    size: int = 16


def _conv_kind(groups: int, cin: int, cout: int) -> str:
    """'dw' (one space in and out), 'grouped' (tied group by group) or 'plain'."""
    if groups > 1 and groups == cin == cout:
        return "dw"
    return "grouped" if groups > 1 else "plain"


def shapes(arch: Arch) -> list[tuple[int, int]]:
    """(channels, spatial size) of every value (square maps)."""
    out = [(arch.in_channels, arch.size)]
    for op in arch.ops:
        if isinstance(op, Conv):
            out.append((op.out, (out[op.src][1] - 1) // op.stride + 1))
        elif isinstance(op, (Residual, SE, Norm, GNorm, Mlp)):
            out.append(out[op.src])
        elif isinstance(op, Add):
            out.append(out[op.a])
        elif isinstance(op, Cat):
            out.append((sum(out[s][0] for s in op.srcs), out[op.srcs[0]][1]))
        elif isinstance(op, Slice):
            out.append((op.stop - op.start, out[op.src][1]))
        elif isinstance(op, Pool):
            out.append((out[op.src][0], out[op.src][1] // 2))
        elif isinstance(op, Head):
            out.append((op.classes, 1))
    return out


# -- channels followed by hand ----------------------------------------------------------------------------------
class ChannelGraph:
    """Per-channel reference of an architecture: ties, frozen channels, readers, zeros and dead channels."""

    def __init__(self, arch: Arch, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.arch, self.masks = arch, dict(masks or {})
        self.parent: list[int] = []
        self.frozen: set[int] = set()
        self.values: list[list[int]] = []  # elements of every value, in channel order
        self.zeros: list[list[bool]] = []  # known-zero channels of every value
        self.outputs: dict[str, list[int]] = {}  # elements each module writes (mask sites)
        self.inputs: dict[str, int | list[int]] = {}  # value (or elements) each weight reads
        self.readers: list[tuple[list[int], list[bool]]] = []  # (elements, zero) at every weight input
        self.groups: list[tuple[list[int], list[int], int, int]] = []  # (in, out, in block, out block)
        x = self._new(arch.in_channels)
        self.frozen.update(x)  # the image channels are no space: never removed
        self._push(x, [False] * len(x))
        for i, op in enumerate(arch.ops):
            getattr(self, f"_{type(op).__name__.lower()}")(i, op)

    # union-find ---------------------------------------------------------------------------------------------------
    def _new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def _tie(self, xs: list[int], ys: list[int]) -> None:
        for x, y in zip(xs, ys, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    # helpers ------------------------------------------------------------------------------------------------------
    def _push(self, elements: list[int], zero: list[bool]) -> None:
        self.values.append(elements)
        self.zeros.append(zero)

    def _masked(self, name: str, n: int) -> list[bool]:
        mask = self.masks.get(name)
        return [False] * n if mask is None else [not bool(m) for m in mask]

    def _write(self, name: str, elements: list[int], zero: list[bool]) -> list[bool]:
        self.outputs[name] = elements
        return [z or m for z, m in zip(zero, self._masked(name, len(elements)), strict=True)]

    def _read(self, name: str, elements: list[int], zero: list[bool], value: int | None = None) -> None:
        self.inputs[name] = value if value is not None else elements
        self.readers.append((elements, zero))

    def _conv_bn(self, conv: str, norm: str | None, src: int, cout: int, groups: int = 1) -> tuple[list, list]:
        x, zx = self.values[src], self.zeros[src]
        kind = _conv_kind(groups, len(x), cout)
        self._read(conv, x, zx, src)
        out = list(x) if kind == "dw" else self._new(cout)
        if kind == "grouped":  # group k in with group k out, both kept or removed whole
            self.groups.append((list(x), out, len(x) // groups, cout // groups))
        zero = self._write(conv, out, [False] * cout)  # a conv output is never known zero (bias, weights)
        if norm is not None:
            zero = self._write(norm, out, zero)
        return out, zero

    def _hidden(self, name: str, conv: str, norm: str | None, elements: list[int], zero: list[bool], cout: int):
        """A conv on an intermediate tensor (not a numbered value)."""
        self._read(conv, elements, zero)
        out = self._new(cout)
        z = self._write(conv, out, [False] * cout)
        return out, (self._write(norm, out, z) if norm else z)

    # ops ---------------------------------------------------------------------------------------------------------
    def _conv(self, i: int, op: Conv) -> None:
        self._push(*self._conv_bn(f"c{i}", f"b{i}" if op.bn else None, op.src, op.out, op.groups))

    def _residual(self, i: int, op: Residual) -> None:
        x, zx = self.values[op.src], self.zeros[op.src]
        h, zh = self._conv_bn(f"r{i}a", f"r{i}an", op.src, op.mid)
        h2, zh2 = self._hidden(f"r{i}", f"r{i}b", f"r{i}bn", h, zh, len(x))
        self._tie(h2, x)
        self._push(h2, [a and b for a, b in zip(zh2, zx, strict=True)])

    def _add(self, i: int, op: Add) -> None:
        a, b = self.values[op.a], self.values[op.b]
        self._tie(a, b)
        keeps = op.style not in _ZEROS_LOST  # their rules keep no zeros (lerp's result is zero, unclaimed)
        self._push(list(a), [keeps and x and y for x, y in zip(self.zeros[op.a], self.zeros[op.b], strict=True)])

    def _cat(self, i: int, op: Cat) -> None:
        self._push([e for s in op.srcs for e in self.values[s]], [z for s in op.srcs for z in self.zeros[s]])

    def _slice(self, i: int, op: Slice) -> None:
        self._push(self.values[op.src][op.start:op.stop], self.zeros[op.src][op.start:op.stop])

    def _se(self, i: int, op: SE) -> None:
        x, zx = self.values[op.src], self.zeros[op.src]
        h, zh = self._hidden(f"s{i}", f"s{i}a", None, x, zx, op.hidden)  # pooling keeps zeros
        g, _ = self._hidden(f"s{i}", f"s{i}b", None, h, zh, len(x))
        self._tie(g, x)  # sigmoid(0) != 0: the gate is never zero; x * s is zero where x is
        self._push(list(x), list(zx))

    def _norm(self, i: int, op: Norm) -> None:
        x = self.values[op.src]
        self._push(list(x), self._write(f"n{i}", x, [False] * len(x)))  # zeros in do not pass

    def _gnorm(self, i: int, op: GNorm) -> None:
        x = self.values[op.src]
        self.groups.append((list(x), list(x), len(x) // op.groups, len(x) // op.groups))
        self._push(list(x), self._write(f"n{i}", x, [False] * len(x)))  # zeros in do not pass

    def _mlp(self, i: int, op: Mlp) -> None:
        x, zx = self.values[op.src], self.zeros[op.src]
        h, _ = self._hidden(f"m{i}", f"m{i}a", None, x, zx, op.hidden)
        zg = self._write(f"m{i}gn", h, [False] * len(h))  # a gate, like a norm: zero only where its mask says
        out, zo = self._hidden(f"m{i}", f"m{i}b", None, h, zg, len(x))
        self._tie(out, x)
        self._push(out, [a and b for a, b in zip(zo, zx, strict=True)])

    def _pool(self, i: int, op: Pool) -> None:
        self._push(list(self.values[op.src]), list(self.zeros[op.src]))

    def _head(self, i: int, op: Head) -> None:
        self._read("head", self.values[op.src], self.zeros[op.src], op.src)
        out = self._new(op.classes)
        self.frozen.update(out)  # reaches the model output
        self._push(out, self._write("head", out, [False] * op.classes))

    # results ------------------------------------------------------------------------------------------------------
    def _group_sets(self) -> tuple[list[set[int]], list[set[int]], dict[int, set[int]]]:
        """Roots kept or removed together (one set per group), the roots each tie joins, block sizes per root."""
        together, units, blocks = [], [], {}
        for xs, ys, bx, by in self.groups:
            units.append({self.find(e) for e in xs + ys})
            for k in range(len(xs) // bx):
                together.append({self.find(e) for e in xs[k * bx:(k + 1) * bx] + ys[k * by:(k + 1) * by]})
            for elements, b in ((xs, bx), (ys, by)):
                for e in elements:
                    blocks.setdefault(self.find(e), set()).add(b)
        return together, units, blocks

    def frozen_roots(self) -> set[int]:
        """Frozen classes: the input, the logits, and every class grouped with a frozen one or in two group sizes."""
        frozen = {self.find(e) for e in self.frozen}
        _, units, blocks = self._group_sets()
        changed = True
        while changed:  # ties chain: a unit touching a frozen class freezes, and so on
            changed = False
            for unit in units:
                if not unit <= frozen and (unit & frozen or any(len(blocks[r]) > 1 for r in unit)):
                    frozen |= unit
                    changed = True
        return frozen

    def dead_roots(self) -> set[int]:
        """Classes whose every read is known zero (not frozen, read at all); groups die only whole.

        A group lives whole when one of its classes is read and live (or frozen); a class no weight reads (a
        dangling output) keeps no group alive: it dies with the groups it is in when every one of them dies.
        """
        frozen = self.frozen_roots()
        read, nonzero = set(), set()
        for elements, zero in self.readers:
            for e, z in zip(elements, zero, strict=True):
                r = self.find(e)
                read.add(r)
                if not z:
                    nonzero.add(r)
        dead = read - nonzero - frozen
        together, _, _ = self._group_sets()
        unread = {r for group in together for r in group} - read - frozen
        changed = True
        while changed:  # a group with one live read class lives whole; groups overlap through ties
            changed = False
            for group in together:
                if group & dead and group - dead - unread:
                    dead -= group
                    changed = True
        dying = [group for group in together if group & dead]
        return dead | {r for r in unread if all(r not in g or g in dying for g in together)
                       and any(r in g for g in dying)}

    def kept(self, elements: list[int], dead: set[int] | None = None) -> list[int]:
        """Indices of the live channels of an element list."""
        dead = self.dead_roots() if dead is None else dead
        return [j for j, e in enumerate(elements) if self.find(e) not in dead]

    def spaces(self) -> list[tuple[list[tuple[str, int]], bool]]:
        """Every class of channels as (module, channel) pairs that write it, and whether it is frozen."""
        members: dict[int, list[tuple[str, int]]] = {}
        for name, elements in self.outputs.items():
            for j, e in enumerate(elements):
                members.setdefault(self.find(e), []).append((name, j))
        frozen = self.frozen_roots()
        return [(m, r in frozen) for r, m in members.items()]

    def empty_element(self) -> int | None:
        """An element of some tensor whose channels would all be removed (None: every tensor keeps one)."""
        dead = self.dead_roots()
        for elements in self.values + list(self.outputs.values()):
            if elements and not self.kept(elements, dead):
                return elements[0]
        return None

    def narrow(self, source: Net | None = None) -> Net:
        """The same network with the dead channels removed (weights sliced from ``source`` when given)."""
        net = Net(self.arch, self)
        if source is not None:
            net.to(next(source.parameters()).dtype)
            _transplant(net, source, self)
        return net


# -- the module ---------------------------------------------------------------------------------------------------
def _add(a: torch.Tensor, b: torch.Tensor, style: str) -> torch.Tensor:
    if style == "method":
        return a.add(b)
    if style == "function":
        return torch.add(a, b)
    if style == "sub":
        return a - b
    if style == "iadd":
        a += b
        return a
    if style == "add_":
        return a.add_(b)
    if style == "add_unused":
        a.add_(b)
        return a
    return _join(a, b, style)


_JOINS = {"hypot": torch.hypot, "fmax": torch.fmax, "atan2": torch.atan2, "logaddexp": torch.logaddexp,
          "lerp": lambda a, b: a.lerp(b, 0.3),  # joins whose rules tie the operands, with or without zeros
          "rows": lambda a, b: torch.cat([a, b], 2)[:, :, ::2],  # a cat along H: zero where both are
          "flip": lambda a, b: a + b.flip(3)}


_ZEROS_LOST = ("atan2", "logaddexp", "lerp")


def _join(a: torch.Tensor, b: torch.Tensor, style: str) -> torch.Tensor:
    """a + b, or another elementwise join of two same-shaped values (``_JOINS``)."""
    return _JOINS[style](a, b) if style in _JOINS else a + b


class Net(nn.Module):
    """The network of an architecture; with a ChannelGraph, at the live widths of its masks."""

    def __init__(self, arch: Arch, graph: ChannelGraph | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.narrowed = graph is not None
        dead = graph.dead_roots() if graph is not None else set()
        sizes = shapes(arch)

        def width(elements: list[int], full: int) -> int:
            return full if graph is None else len(graph.kept(elements, dead))

        self.cuts: dict[int, tuple[int, int]] = {}
        for i, op in enumerate(arch.ops):
            cin = sizes[op.src][0] if not isinstance(op, (Add, Cat)) else 0
            w_in = width(graph.values[op.src], cin) if graph is not None and cin else cin
            if isinstance(op, Conv):
                kind = _conv_kind(op.groups, cin, op.out)
                cout = width(graph.outputs[f"c{i}"], op.out) if graph is not None else op.out
                groups = {"dw": cout, "grouped": w_in // (cin // op.groups), "plain": 1}[kind]
                self.add_module(f"c{i}", nn.Conv2d(w_in, cout, op.k, op.stride, op.k // 2, groups=groups))
                if op.bn:
                    self.add_module(f"b{i}", nn.BatchNorm2d(cout))
            elif isinstance(op, Residual):
                mid = width(graph.outputs[f"r{i}a"], op.mid) if graph is not None else op.mid
                self.add_module(f"r{i}a", nn.Conv2d(w_in, mid, op.k, 1, op.k // 2, bias=False))
                self.add_module(f"r{i}an", nn.BatchNorm2d(mid))
                self.add_module(f"r{i}b", nn.Conv2d(mid, w_in, op.k, 1, op.k // 2, bias=False))
                self.add_module(f"r{i}bn", nn.BatchNorm2d(w_in))
            elif isinstance(op, SE):
                hidden = width(graph.outputs[f"s{i}a"], op.hidden) if graph is not None else op.hidden
                self.add_module(f"s{i}a", nn.Conv2d(w_in, hidden, 1))
                self.add_module(f"s{i}b", nn.Conv2d(hidden, w_in, 1))
            elif isinstance(op, Norm):
                self.add_module(f"n{i}", nn.BatchNorm2d(w_in))
            elif isinstance(op, GNorm):
                self.add_module(f"n{i}", nn.GroupNorm(w_in // (cin // op.groups), w_in))
            elif isinstance(op, Mlp):
                hidden = width(graph.outputs[f"m{i}a"], op.hidden) if graph is not None else op.hidden
                self.add_module(f"m{i}a", nn.Linear(w_in, hidden))
                self.add_module(f"m{i}gn", Gate(hidden, dim=-1))
                self.add_module(f"m{i}b", nn.Linear(hidden, w_in))
            elif isinstance(op, Slice) and graph is not None:
                kept = graph.kept(graph.values[op.src], dead)
                self.cuts[i] = (sum(j < op.start for j in kept), sum(j < op.stop for j in kept))
            elif isinstance(op, Head):
                spatial = 1 if op.gap else sizes[op.src][1] ** 2
                self.add_module("head", nn.Linear(w_in * spatial, op.classes))

    def _conv_bn_act(self, x, conv: str, norm: str | None, act: bool):
        x = getattr(self, conv)(x)
        if norm is not None:
            x = getattr(self, norm)(x)
        return F.relu(x) if act else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for i, op in enumerate(self.arch.ops):
            values.append(self._step(i, op, values))
        return values[-1]

    def _step(self, i: int, op, values: list):
        if isinstance(op, Conv):
            return self._conv_bn_act(values[op.src], f"c{i}", f"b{i}" if op.bn else None, op.act)
        if isinstance(op, Residual):
            h = self._conv_bn_act(values[op.src], f"r{i}a", f"r{i}an", True)
            h = self._conv_bn_act(h, f"r{i}b", f"r{i}bn", False)
            return F.relu(_add(h, values[op.src], op.style))
        if isinstance(op, Add):
            return _add(values[op.a], values[op.b], op.style)
        if isinstance(op, Cat):
            return torch.cat([values[s] for s in op.srcs], 1)
        if isinstance(op, Slice):
            return self._slice(i, op, values[op.src])
        if isinstance(op, SE):
            x = values[op.src]
            s = getattr(self, f"s{i}a")(F.adaptive_avg_pool2d(x, 1))
            return x * torch.sigmoid(getattr(self, f"s{i}b")(F.relu(s)))
        if isinstance(op, (Norm, GNorm)):
            return getattr(self, f"n{i}")(values[op.src])
        if isinstance(op, Mlp):
            x = values[op.src]
            h = getattr(self, f"m{i}gn")(F.relu(getattr(self, f"m{i}a")(x.permute(0, 2, 3, 1))))
            return x + getattr(self, f"m{i}b")(h).permute(0, 3, 1, 2)
        if isinstance(op, Pool):
            pool = F.max_pool2d if op.kind == "max" else F.avg_pool2d
            return pool(values[op.src], 2)
        x = values[op.src]
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1) if op.gap else x, 1)
        return self.head(x)

    def _slice(self, i: int, op: Slice, x: torch.Tensor) -> torch.Tensor:
        if self.narrowed:
            start, stop = self.cuts[i]
            return x[:, start:stop]
        width = shapes(self.arch)[op.src][0]
        if op.style == "narrow":
            return x.narrow(1, op.start, op.stop - op.start)
        if op.style == "split":
            sizes = [s for s in (op.start, op.stop - op.start, width - op.stop) if s]
            return torch.split(x, sizes, 1)[1 if op.start else 0]
        if op.style == "chunk":
            size = op.stop - op.start
            return x.chunk(width // size, 1)[op.start // size]
        return x[:, op.start:op.stop]


def build(arch: Arch, seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    """The full network, with reproducible random weights and norm statistics."""
    torch.manual_seed(seed)
    net = Net(arch).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, Gate)):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def mask_sites(arch: Arch) -> dict[str, int]:
    """Module names that may carry a mask in the property tests, with their width: every norm,
    and the convs that have no norm after them (SE convs, norm-less Conv ops)."""
    sites, sizes = {}, shapes(arch)
    for i, op in enumerate(arch.ops):
        if isinstance(op, Conv):
            sites[f"b{i}" if op.bn else f"c{i}"] = op.out
        elif isinstance(op, Residual):
            sites[f"r{i}an"], sites[f"r{i}bn"] = op.mid, sizes[op.src][0]
        elif isinstance(op, SE):
            sites[f"s{i}a"], sites[f"s{i}b"] = op.hidden, sizes[op.src][0]
        elif isinstance(op, (Norm, GNorm)):
            sites[f"n{i}"] = sizes[op.src][0]
        elif isinstance(op, Mlp):
            sites[f"m{i}gn"] = op.hidden
    return sites


def zero_masked(model: Net, masks: dict[str, torch.Tensor]) -> None:
    """Make masked channels output exact zeros: γ = β = 0 on norms, zero rows and bias on convs."""
    with torch.no_grad():
        for name, mask in masks.items():
            m = getattr(model, name)
            dead = ~mask.to(torch.bool)
            m.weight[dead] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[dead] = 0


def repair_masks(arch: Arch, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Revive whole classes until no tensor of the narrow network is empty."""
    masks = {k: v.clone() for k, v in masks.items()}
    while True:
        graph = ChannelGraph(arch, masks)
        element = graph.empty_element()
        if element is None:
            return masks
        root = graph.find(element)
        for name, elements in graph.outputs.items():
            if name in masks:
                for j, e in enumerate(elements):
                    if graph.find(e) == root:
                        masks[name][j] = True


def _transplant(narrow: Net, full: Net, graph: ChannelGraph) -> None:
    """Copy the live slices of every weight of ``full`` into ``narrow``."""
    dead = graph.dead_roots()
    sizes = shapes(graph.arch)

    def kept_in(name: str) -> list[int]:
        src = graph.inputs[name]
        elements = graph.values[src] if isinstance(src, int) else src
        return graph.kept(elements, dead)

    with torch.no_grad():
        for name, module in narrow.named_children():
            big = getattr(full, name)
            if name == "head":
                op = graph.arch.ops[-1]
                idx = kept_in(name)
                if not op.gap:
                    hw = sizes[op.src][1] ** 2
                    idx = [c * hw + j for c in idx for j in range(hw)]
                module.weight.copy_(big.weight[:, idx])
                module.bias.copy_(big.bias)
                continue
            out = graph.kept(graph.outputs[name], dead)
            if isinstance(module, nn.BatchNorm2d):
                for t in ("weight", "bias", "running_mean", "running_var"):
                    getattr(module, t).copy_(getattr(big, t)[out])
                module.num_batches_tracked.copy_(big.num_batches_tracked)
                continue
            if isinstance(module, (nn.GroupNorm, Gate)):
                for t in ("weight", "bias")[: 1 if isinstance(module, Gate) else 2]:
                    getattr(module, t).copy_(getattr(big, t)[out])
                continue
            w = big.weight[out]
            if getattr(big, "groups", 1) == 1:
                w = w[:, kept_in(name)]
            module.weight.copy_(w)
            if module.bias is not None:
                module.bias.copy_(big.bias[out])


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass per example (FlopCounterMode counts 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2 // x.shape[0]


# -- the hypothesis strategy ----------------------------------------------------------------------------------------
_RESIDUAL_STYLES = ("op", "method", "function", "iadd", "add_", "add_unused")
_ADD_STYLES = ("op", "method", "function", "sub", "hypot", "fmax", "atan2", "logaddexp", "lerp", "rows", "flip")


@st.composite
def masks_for(draw, arch: Arch, all_norm_sites_alive_once: bool = False) -> dict[str, torch.Tensor]:
    """Random dead channels per mask site (norms and norm-less convs)."""
    seed = draw(st.integers(0, 2**16))
    p = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, width in mask_sites(arch).items():
        is_norm = name.startswith(("b", "n")) or name.endswith("n")  # b{i}, n{i}, r{i}an, r{i}bn
        if all_norm_sites_alive_once and not is_norm:
            continue  # γ path: only norms carry masks
        mask = torch.rand(width, generator=gen) >= p
        if all_norm_sites_alive_once and not mask.any():
            mask[0] = True  # an all-zero γ would read as all alive (threshold relative to max|γ|)
        masks[name] = mask
    return masks


@st.composite
def archs(draw, max_ops: int = 6, max_width: int = 12) -> Arch:
    """A random architecture: conv-bn-relu chains, residuals, adds, concats, slices, SE, pooling, a head;
    or (one in three) grouped convs, GroupNorm and gated MLPs with the same ops but concats and slices."""
    arch = Arch(())
    ops: list = []
    grouped = draw(st.integers(0, 2)) == 0
    kinds = ["conv", "conv", "conv", "residual", "add", "se", "pool", "norm"]
    kinds += ["gnorm", "mlp", "conv"] if grouped else ["cat", "slice"]
    n_ops = draw(st.integers(1, max_ops))
    for _ in range(n_ops):
        sizes = shapes(Arch(tuple(ops)))
        src = draw(st.integers(max(0, len(sizes) - 3), len(sizes) - 1))  # mostly recent values
        c, hw = sizes[src]
        kind = draw(st.sampled_from(kinds))
        op = None
        if kind == "conv" or (kind == "pool" and hw < 4):
            ops.append(_draw_conv(draw, src, c, hw, max_width, grouped))
            continue
        if kind == "residual":
            op = Residual(src, draw(st.integers(2, max_width)), draw(st.sampled_from([1, 3])),
                          draw(st.sampled_from(_RESIDUAL_STYLES)))
        elif kind == "add":
            partners = [v for v, s in enumerate(sizes) if s == (c, hw)]
            op = Add(src, draw(st.sampled_from(partners)), draw(st.sampled_from(_ADD_STYLES)))
        elif kind == "cat":
            same = [v for v, s in enumerate(sizes) if s[1] == hw]
            others = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
            op = Cat((src, *others))
        elif kind == "slice" and c >= 2:
            op = _draw_slice(draw, src, c)
        elif kind == "se":
            op = SE(src, draw(st.integers(1, 4)))
        elif kind == "pool":
            op = Pool(src, draw(st.sampled_from(["max", "avg"])))
        elif kind == "norm" and src > 0:
            op = Norm(src)
        elif kind == "gnorm" and src > 0:
            op = GNorm(src, draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0])))
        elif kind == "mlp":
            op = Mlp(src, draw(st.integers(1, max_width)))
        ops.append(op if op is not None else _draw_conv(draw, src, c, hw, max_width, grouped))
    last = len(ops)
    gap = draw(st.booleans()) or shapes(Arch(tuple(ops)))[last][1] > 8
    arch = Arch((*ops, Head(last, draw(st.integers(1, 4)), gap)))
    return arch


def _draw_conv(draw, src: int, c: int, hw: int, max_width: int, grouped: bool = False) -> Conv:
    k = draw(st.sampled_from([1, 3, 3, 5]))
    stride = draw(st.sampled_from([1, 1, 2])) if hw >= 4 else 1
    bn = draw(st.integers(0, 5)) > 0
    act = draw(st.integers(0, 3)) > 0
    modes = ["plain", "plain", "dw"] + (["grouped", "grouped"] if grouped else [])
    mode = draw(st.sampled_from(modes))
    if mode == "dw" and c > 1:
        return Conv(src, c, k, stride, c, bn, act)
    divisors = [g for g in (2, 4) if c % g == 0]
    if mode == "grouped" and divisors:
        g = draw(st.sampled_from(divisors))
        out = g * draw(st.integers(1, max(1, max_width // g)))
        return Conv(src, out, k, stride, g, bn, act)
    return Conv(src, draw(st.integers(2, max_width)), k, stride, 1, bn, act)


def _draw_slice(draw, src: int, c: int) -> Slice:
    if draw(st.integers(0, 3)) == 0:
        size = draw(st.sampled_from([d for d in range(1, c) if c % d == 0]))
        start = size * draw(st.integers(0, c // size - 1))
        return Slice(src, start, start + size, "chunk")
    start = draw(st.integers(0, c - 1))
    stop = draw(st.integers(start + 1, c))
    if (start, stop) == (0, c):
        stop = c - 1 if c > 1 else c
        start = min(start, stop - 1)
    return Slice(src, start, stop, draw(st.sampled_from(["getitem", "narrow", "split"])))
