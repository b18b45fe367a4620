"""Channel spaces: atoms of channels, unified by union-find and refined by splitting.

An *atom* is a contiguous run of channels that always moves as one block.  A *layout*
is what one tensor dimension carries: a tuple of atoms (in order) and an ``inner`` factor
(each channel spans ``inner`` contiguous features after a flatten).  Ops that tie two
dimensions together unify their atoms; cat and split make layouts of several atoms; a
slice that cuts inside an atom splits it (and every atom unified with it) in two.  The
equivalence classes of leaf atoms at the end of the analysis are the *channel spaces*.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "AtomTable"]


@dataclass(frozen=True)
class Layout:
    """The channel content of one tensor dimension: atoms in order, each channel ``inner`` wide."""

    atoms: tuple[int, ...]
    inner: int = 1


class AtomTable:
    """Union-find over channel atoms, with splitting that keeps unified atoms aligned."""

    def __init__(self) -> None:
        self.width: list[int] = []
        self.children: list[tuple[int, ...] | None] = []
        self.parent: list[int] = []
        self.members: dict[int, list[int]] = {}
        self.frozen: dict[int, list[str]] = {}

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
