"""Channel spaces: atoms of channels, unified by union-find and refined by splitting.

An *atom* is a contiguous run of channels that always moves as one block.  A *layout*
is what one tensor dimension carries: a tuple of atoms (in order) and an ``inner`` factor
(each channel spans ``inner`` contiguous features after a flatten).  Ops that tie two
dimensions together unify their atoms; cat and split make layouts of several atoms; a
slice that cuts inside an atom splits it (and every atom unified with it) in two.  The
equivalence classes of leaf atoms at the end of the analysis are the *channel spaces*.

*Block ties* say that channels move in whole blocks: a grouped conv ties block ``k`` of its
input (``cin/groups`` channels) to block ``k`` of its output (``cout/groups``), a GroupNorm
ties its groups to themselves.  ``resolve_blocks`` runs once the rules are done: it cuts the
tied layouts so that their atoms pair up block for block, gives every class its block width,
and joins the classes a tie links into one *planning unit* (same number of blocks, the same
blocks surviving: the gcd of the block counts its ties ask for, so a class read in groups of two
widths moves in the coarser one).  A group straddling two classes, or a unit touching a frozen
class, freezes the whole unit, with the reason.

*Attention heads* are block ties too: a reshape of a channel dim into ``(H, d)`` (``q.view(B, N, H, d)``)
makes the ``H`` dim carry a fresh *head* layout (``new_heads``, one channel per head) tied block by block to
the channels it splits (blocks of ``d``), so q, k, v and the output projection's input keep and add whole
heads.  A head class that no attention op marked (``mark_attended``: SDPA, a matmul over the head dim as a
batch dim) is frozen by ``resolve_blocks``: a reshape into two dims that is not an attention head split
(``fc(z).view(B, 64, 7, 7)``) keeps its width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Layout", "AtomTable", "BlockTie", "BlockClass"]


@dataclass(frozen=True)
class Layout:
    """The channel content of one tensor dimension: atoms in order, each channel ``inner`` wide."""

    atoms: tuple[int, ...]
    inner: int = 1


@dataclass(frozen=True)
class BlockTie:
    """Block ``k`` (``block_a`` channels) of layout ``a`` moves with block ``k`` (``block_b``) of ``b``."""

    a: Layout
    b: Layout
    block_a: int
    block_b: int
    reason: str


@dataclass(frozen=True)
class BlockClass:
    """What ``resolve_blocks`` says of one class: its block width and the root of its planning unit."""

    block: int
    unit: int


class AtomTable:
    """Union-find over channel atoms, with splitting that keeps unified atoms aligned."""

    def __init__(self) -> None:
        self.width: list[int] = []
        self.children: list[tuple[int, ...] | None] = []
        self.parent: list[int] = []
        self.members: dict[int, list[int]] = {}
        self.frozen: dict[int, list[str]] = {}
        self.ties: list[BlockTie] = []
        self.heads: set[int] = set()  # atoms (and their pieces) made by ``new_heads``
        self.attended: set[int] = set()  # atoms an attention op read as its head (batch) dim
        self.summed: set[int] = set()  # atoms where an add joins two activations (a residual stream)
        self.contracted: set[int] = set()  # atoms a product of two activations sums over (q·kᵀ without heads)

    # -- creation -------------------------------------------------------------------------
    def new(self, width: int) -> int:
        """A fresh atom of ``width`` channels, alone in its class."""
        atom = len(self.width)
        self.width.append(int(width))
        self.children.append(None)
        self.parent.append(atom)
        self.members[atom] = [atom]
        return atom

    def layout(self, width: int, inner: int = 1) -> Layout:
        """A layout made of one fresh atom."""
        return Layout((self.new(width),), inner)

    # -- union-find -----------------------------------------------------------------------
    def find(self, atom: int) -> int:
        """The class representative of a leaf atom (path halving)."""
        parent = self.parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def _union_leaves(self, a: int, b: int) -> None:
        """Merge the classes of two leaf atoms of equal width."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        reasons = self.frozen.pop(rb, None)
        if reasons is not None:
            self.frozen.setdefault(ra, []).extend(reasons)

    # -- structure ------------------------------------------------------------------------
    def leaves(self, atoms: tuple[int, ...]) -> list[int]:
        """Expand atoms that were split into their leaf atoms, in channel order."""
        out: list[int] = []
        stack = list(reversed(atoms))
        while stack:
            atom = stack.pop()
            kids = self.children[atom]
            if kids is None:
                out.append(atom)
            else:
                stack.extend(reversed(kids))
        return out

    def channels(self, layout: Layout) -> int:
        """Number of channels (not features) a layout carries."""
        return sum(self.width[a] for a in self.leaves(layout.atoms))

    def _split_class(self, leaf: int, at: int) -> None:
        """Split every atom of ``leaf``'s class at offset ``at``; children stay unified."""
        root = self.find(leaf)
        members = list(self.members[root])
        reasons = self.frozen.pop(root, None)
        del self.members[root]
        heads, tails = [], []
        for atom in members:
            head, tail = self.new(at), self.new(self.width[atom] - at)
            self.children[atom] = (head, tail)
            for flags in (self.heads, self.attended, self.summed, self.contracted):
                if atom in flags:
                    flags.update((head, tail))
            heads.append(head)
            tails.append(tail)
        for group in (heads, tails):
            for other in group[1:]:
                self._union_leaves(group[0], other)
            if reasons:
                self.frozen[self.find(group[0])] = list(reasons)

    def cut(self, layout: Layout, offset: int) -> None:
        """Make ``offset`` (in channels) fall on an atom border of ``layout``."""
        pos = 0
        for leaf in self.leaves(layout.atoms):
            width = self.width[leaf]
            if pos < offset < pos + width:
                self._split_class(leaf, offset - pos)
                return
            pos += width

    def select(self, layout: Layout, start: int, stop: int) -> Layout:
        """The sub-layout of channels ``[start, stop)``, splitting atoms where needed."""
        self.cut(layout, start)
        self.cut(layout, stop)
        picked, pos = [], 0
        for leaf in self.leaves(layout.atoms):
            if start <= pos and pos + self.width[leaf] <= stop:
                picked.append(leaf)
            pos += self.width[leaf]
        return Layout(tuple(picked), layout.inner)

    def borders(self, layout: Layout) -> list[int]:
        """Cumulative channel offsets of the leaf atoms of a layout."""
        out, pos = [], 0
        for leaf in self.leaves(layout.atoms):
            pos += self.width[leaf]
            out.append(pos)
        return out

    def unify(self, a: Layout, b: Layout) -> bool:
        """Tie two layouts channel by channel; False (nothing done) when they cannot align."""
        if a.inner != b.inner or self.channels(a) != self.channels(b):
            return False
        # a cut splits a whole class, which may move borders elsewhere in a or b: repeat until aligned
        while (missing := set(self.borders(a)) ^ set(self.borders(b))):
            for offset in sorted(missing):
                self.cut(a, offset)
                self.cut(b, offset)
        for x, y in zip(self.leaves(a.atoms), self.leaves(b.atoms), strict=True):
            self._union_leaves(x, y)
        return True

    # -- freezing -------------------------------------------------------------------------
    def freeze(self, layout: Layout, reason: str) -> None:
        """Mark every class the layout touches as frozen (width kept, fully alive)."""
        for leaf in self.leaves(layout.atoms):
            reasons = self.frozen.setdefault(self.find(leaf), [])
            if reason not in reasons:
                reasons.append(reason)

    def is_frozen(self, leaf: int) -> bool:
        """Whether the class of a leaf atom is frozen."""
        return self.find(leaf) in self.frozen

    # -- blocks (grouped convs, GroupNorm) --------------------------------------------------
    def tie_blocks(self, a: Layout, b: Layout, block_a: int, block_b: int, reason: str) -> None:
        """Record that ``a`` and ``b`` keep and add channels in whole blocks, block k with block k."""
        self.ties.append(BlockTie(a, b, int(block_a), int(block_b), reason))

    # -- attention heads ------------------------------------------------------------------
    def new_heads(self, heads: int) -> Layout:
        """A fresh head layout: one channel per attention head (see module doc)."""
        layout = self.layout(heads)
        self.heads.update(layout.atoms)
        return layout

    def mark_attended(self, layout: Layout) -> None:
        """Record that an attention op reads ``layout`` as its head dim (heads there are independent)."""
        self.attended.update(self.leaves(layout.atoms))

    # -- residual streams -----------------------------------------------------------------
    def mark_summed(self, layout: Layout) -> None:
        """Record that an add joins two activations in ``layout`` (a residual stream: the paper's main stream)."""
        self.summed.update(self.leaves(layout.atoms))

    def mark_contracted(self, layout: Layout) -> None:
        """Record that a product of two activations sums over ``layout`` (``q @ k.transpose(-2, -1)`` with a free
        inner dim): a new channel there would add ``q_R·k_R`` to every product, so it can only shrink."""
        self.contracted.update(self.leaves(layout.atoms))

    def is_heads(self, layout: Layout | None) -> bool:
        """Whether every class the layout touches holds a head layout."""
        if layout is None:
            return False
        roots = {self.find(leaf) for leaf in self.leaves(layout.atoms)}
        return bool(roots) and all(any(m in self.heads for m in self.members[r]) for r in roots)

    def _check_heads(self) -> list[BlockTie]:
        """Freeze every head class that no attention op read (a split into two dims not proven to be heads) and the
        channels it split, dropping its ties; returns the other ties."""
        unread = {root for root, members in self.members.items()
                  if any(m in self.heads for m in members) and not any(m in self.attended for m in members)}
        for root in unread:
            self.frozen.setdefault(root, []).append(
                "reshape into (heads, head dim) never read by attention: not proven to be attention heads")
        kept = []
        for tie in self.ties:
            if any(self.find(leaf) in unread for leaf in self.leaves(tie.b.atoms)):
                self.freeze(tie.a, f"reshape mixes channels with other dims: {tie.reason}, never read by attention")
            else:
                kept.append(tie)
        return kept

    def _align(self, tie: BlockTie) -> str | None:
        """Cut both sides of a tie at each other's block borders; why they cannot align, or None."""
        while True:
            borders = []
            for layout, block in ((tie.a, tie.block_a), (tie.b, tie.block_b)):
                offsets = self.borders(layout)
                if any(o % block for o in offsets):
                    return "a group straddles two channel spaces"
                borders.append({o // block for o in offsets})
            missing = borders[0] ^ borders[1]
            if not missing:
                return None
            for k in sorted(missing):
                self.cut(tie.a, k * tie.block_a)
                self.cut(tie.b, k * tie.block_b)

    def resolve_blocks(self) -> dict[int, BlockClass]:
        """Align every tie, then give each tied class its block width and planning unit (see module doc)."""
        ties, changed = self._check_heads(), True
        while changed:  # cuts made for one tie may move the borders of another: align until stable
            changed = False
            for tie in list(ties):
                before = (self.borders(tie.a), self.borders(tie.b))
                problem = self._align(tie)
                if problem is not None:
                    self.freeze(tie.a, f"{tie.reason}: {problem}")
                    self.freeze(tie.b, f"{tie.reason}: {problem}")
                    ties.remove(tie)
                changed |= before != (self.borders(tie.a), self.borders(tie.b))
        return self._units(ties)

    def _units(self, ties: list[BlockTie]) -> dict[int, BlockClass]:
        """Block widths per class and unit roots; frozen-touching units freeze whole.

        Rule: a unit keeps and adds blocks together, so every class in it gets the same number of blocks: the
        gcd of the block counts its ties ask for (a class read in groups of 2 and of 4 moves in groups of 4;
        query heads tied one to one to their channels and r to one to the kv heads move r at a time).  A
        coarser block is a union of whole finer ones, so every tie still pairs whole groups."""
        unit: dict[int, int] = {}
        blocks: dict[int, set[int]] = {}
        widths: dict[int, int] = {}
        reasons: dict[int, str] = {}

        def root(r: int) -> int:
            while unit.setdefault(r, r) != r:
                r = unit[r]
            return r

        for tie in ties:
            pairs = zip(self.leaves(tie.a.atoms), self.leaves(tie.b.atoms), strict=True)
            for x, y in pairs:
                rx, ry = self.find(x), self.find(y)
                blocks.setdefault(rx, set()).add(tie.block_a)
                blocks.setdefault(ry, set()).add(tie.block_b)
                widths[rx], widths[ry] = self.width[x], self.width[y]
                reasons.setdefault(rx, tie.reason)
                reasons.setdefault(ry, tie.reason)
                unit[root(ry)] = root(rx)
        members: dict[int, list[int]] = {}
        for r in blocks:
            members.setdefault(root(r), []).append(r)
        out: dict[int, BlockClass] = {}
        for head, classes in members.items():
            frozen = next((self.frozen[r][0] for r in classes if r in self.frozen), None)
            if frozen is None:
                count = math.gcd(*(widths[r] // b for r in classes for b in blocks[r]))
                out.update({r: BlockClass(widths[r] // count, head) for r in classes})
                continue
            for r in classes:
                self.frozen.setdefault(r, []).append(f"{reasons[r]}: tied group by group to a frozen space ({frozen})")
        return out
