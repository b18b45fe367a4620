"""AtomTable: union-find over channel atoms with splitting (unit tests and a per-channel reference)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nrfx.analysis.spaces import AtomTable, Layout


def widths(table: AtomTable, layout: Layout) -> list[int]:
    """Widths of the leaf atoms of a layout, in channel order."""
    return [table.width[leaf] for leaf in table.leaves(layout.atoms)]


def classes(table: AtomTable, layout: Layout) -> list[int]:
    """Class representative of every leaf atom of a layout."""
    return [table.find(leaf) for leaf in table.leaves(layout.atoms)]


def channel_keys(table: AtomTable, layout: Layout) -> list[tuple[int, int]]:
    """(class, offset inside the atom) of every channel: equal keys = the same channel of one space."""
    keys = []
    for leaf in table.leaves(layout.atoms):
        keys.extend((table.find(leaf), o) for o in range(table.width[leaf]))
    return keys


# -- basics -------------------------------------------------------------------------------------------
def test_new_atoms_are_separate_classes():
    t = AtomTable()
    a, b = t.new(3), t.new(5)
    assert t.find(a) == a and t.find(b) == b and a != b
    assert t.channels(Layout((a, b))) == 8
    assert t.leaves((a, b)) == [a, b]
    assert t.borders(Layout((a, b))) == [3, 8]
    assert not t.is_frozen(a)


def test_layout_helper_makes_one_fresh_atom():
    t = AtomTable()
    lay = t.layout(6, inner=4)
    assert lay.inner == 4 and len(lay.atoms) == 1
    assert t.channels(lay) == 6  # channels, not features


# -- unify ----------------------------------------------------------------------------------------------
def test_unify_same_borders_merges_classes():
    t = AtomTable()
    a, b = t.layout(4), t.layout(4)
    assert t.unify(a, b)
    assert classes(t, a) == classes(t, b)
    assert widths(t, a) == [4]


def test_unify_aligns_different_atom_borders():
    # a = [x:3 | y:5], b = [z:4 | w:4]: the union of borders {3, 4, 8} cuts y and z
    t = AtomTable()
    x, y, z, w = t.new(3), t.new(5), t.new(4), t.new(4)
    a, b = Layout((x, y)), Layout((z, w))
    assert t.unify(a, b)
    assert widths(t, a) == [3, 1, 4]
    assert widths(t, b) == [3, 1, 4]
    assert classes(t, a) == classes(t, b)
    assert len(set(classes(t, a))) == 3
    # the original atoms were split, not replaced: y and z now have two children each
    assert [t.width[c] for c in t.children[y]] == [1, 4]
    assert [t.width[c] for c in t.children[z]] == [3, 1]


def test_unify_with_a_class_repeated_at_shifted_offsets():
    # x ~ z; a = [x:4 | e:2], b = [u:1 | z:4 | f:1].  Cutting a at 1 also cuts z at 1, which moves
    # b's borders: the alignment has to be repeated until both sides agree.
    t = AtomTable()
    x, z, e, u, f = t.new(4), t.new(4), t.new(2), t.new(1), t.new(1)
    assert t.unify(Layout((x,)), Layout((z,)))
    a, b = Layout((x, e)), Layout((u, z, f))
    assert t.unify(a, b)
    assert widths(t, a) == widths(t, b)
    assert channel_keys(t, a) == channel_keys(t, b)
    # a[i] ~ b[i] and x[j] ~ z[j]: x0~u, x1~z0~x0, x2~z1~x1, x3~z2~x2, e0~z3~x3, and e1~f apart
    keys = channel_keys(t, a)
    assert len(set(keys[:5])) == 1
    assert keys[5] != keys[0]
    assert channel_keys(t, Layout((x,))) == [keys[0]] * 4


def test_unify_fails_on_width_mismatch_and_changes_nothing():
    t = AtomTable()
    x, y, z = t.new(3), t.new(2), t.new(4)
    a, b = Layout((x, y)), Layout((z,))
    assert not t.unify(a, b)
    assert t.children[x] is None and t.children[z] is None
    assert t.find(x) != t.find(z)


def test_unify_fails_on_inner_mismatch_and_changes_nothing():
    t = AtomTable()
    a, b = t.layout(4, inner=1), t.layout(4, inner=9)
    assert not t.unify(a, b)
    assert classes(t, a) != classes(t, b)
    assert widths(t, a) == [4] and widths(t, b) == [4]


def test_unify_is_transitive():
    t = AtomTable()
    a, b, c = t.layout(5), t.layout(5), t.layout(5)
    t.unify(a, b)
    t.unify(b, c)
    assert classes(t, a) == classes(t, c)


# -- select / cut -------------------------------------------------------------------------------------------
def test_select_on_borders_picks_atoms_without_splitting():
    t = AtomTable()
    x, y, z = t.new(2), t.new(3), t.new(4)
    picked = t.select(Layout((x, y, z)), 2, 5)
    assert picked.atoms == (y,)
    assert all(t.children[a] is None for a in (x, y, z))


def test_select_splits_atoms_and_keeps_unified_classes_aligned():
    t = AtomTable()
    p, q = t.layout(6), t.layout(6)
    t.unify(p, q)
    mid = t.select(p, 2, 5)
    assert t.channels(mid) == 3
    assert widths(t, p) == [2, 3, 1]
    # q was never sliced but shares p's class: it is split at the same offsets
    assert widths(t, q) == [2, 3, 1]
    assert classes(t, p) == classes(t, q)
    assert len(set(classes(t, p))) == 3
    assert classes(t, mid) == [classes(t, q)[1]]


def test_select_across_atoms_keeps_inner():
    t = AtomTable()
    x, y = t.new(3), t.new(5)
    lay = Layout((x, y), inner=4)
    piece = t.select(lay, 1, 6)
    assert piece.inner == 4
    assert widths(t, piece) == [2, 3]
    assert widths(t, lay) == [1, 2, 3, 2]


def test_cut_on_a_border_does_nothing():
    t = AtomTable()
    x, y = t.new(3), t.new(5)
    t.cut(Layout((x, y)), 3)
    t.cut(Layout((x, y)), 0)
    t.cut(Layout((x, y)), 8)
    assert t.children[x] is None and t.children[y] is None


# -- freeze -----------------------------------------------------------------------------------------------------
def test_freeze_propagates_through_unions_either_order():
    t = AtomTable()
    a, b, c = t.layout(4), t.layout(4), t.layout(4)
    t.unify(a, b)
    t.freeze(a, "reason-a")
    assert t.is_frozen(t.leaves(b.atoms)[0])
    assert not t.is_frozen(t.leaves(c.atoms)[0])
    t.unify(c, b)  # unify after freezing: c joins a frozen class
    assert t.is_frozen(t.leaves(c.atoms)[0])
    assert t.frozen[t.find(t.leaves(c.atoms)[0])] == ["reason-a"]


def test_freeze_reasons_merge_on_union_without_duplicates():
    t = AtomTable()
    a, b = t.layout(2), t.layout(2)
    t.freeze(a, "r1")
    t.freeze(a, "r1")
    t.freeze(b, "r2")
    t.unify(a, b)
    assert sorted(t.frozen[t.find(t.leaves(a.atoms)[0])]) == ["r1", "r2"]


def test_freeze_before_split_reaches_both_pieces():
    t = AtomTable()
    p, q = t.layout(5), t.layout(5)
    t.unify(p, q)
    t.freeze(q, "frozen")
    t.select(p, 0, 2)
    assert widths(t, q) == [2, 3]
    assert all(t.is_frozen(leaf) for leaf in t.leaves(q.atoms))
    assert all(t.frozen[t.find(leaf)] == ["frozen"] for leaf in t.leaves(p.atoms))


def test_freeze_after_split_only_freezes_the_selected_piece():
    t = AtomTable()
    p, q = t.layout(5), t.layout(5)
    t.unify(p, q)
    head = t.select(p, 0, 2)
    t.freeze(head, "head only")
    assert [t.is_frozen(leaf) for leaf in t.leaves(q.atoms)] == [True, False]


# -- property: AtomTable agrees with a per-channel union-find -----------------------------------------
class _Ref:
    """Per-channel union-find: the meaning AtomTable must have, one element per channel."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: set[int] = set()

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            e = self.parent[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen:
                self.frozen.discard(rb)
                self.frozen.add(ra)


_op = st.one_of(
    st.tuples(st.just("new"), st.integers(1, 6)),
    st.tuples(st.just("cat"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("select"), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("unify"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("freeze"), st.integers(0, 99)),
    # tie two equally long slices of (maybe the same) layouts
    st.tuples(st.just("tie"), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
              st.integers(0, 99)),
    # tie [L | u] with [v | L]: the same classes meet themselves at shifted offsets
    st.tuples(st.just("shift"), st.integers(0, 99), st.integers(1, 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.lists(_op, max_size=25))
def test_atom_table_matches_per_channel_union_find(initial, program):
    t, ref = AtomTable(), _Ref()
    layouts: list[tuple[Layout, list[int]]] = [(t.layout(w), ref.new(w)) for w in initial]
    for op in program:
        kind = op[0]
        if kind == "new":
            layouts.append((t.layout(op[1]), ref.new(op[1])))
        elif kind == "cat":
            (la, ra), (lb, rb) = layouts[op[1] % len(layouts)], layouts[op[2] % len(layouts)]
            layouts.append((Layout(la.atoms + lb.atoms), ra + rb))
        elif kind == "select":
            lay, r = layouts[op[1] % len(layouts)]
            n = len(r)
            start = op[2] % n
            stop = start + 1 + op[3] % (n - start)
            layouts.append((t.select(lay, start, stop), r[start:stop]))
        elif kind == "unify":
            (la, ra), (lb, rb) = layouts[op[1] % len(layouts)], layouts[op[2] % len(layouts)]
            ok = t.unify(la, lb)
            assert ok == (len(ra) == len(rb))
            if ok:
                for x, y in zip(ra, rb, strict=True):
                    ref.union(x, y)
        elif kind == "tie":
            (la, ra), (lb, rb) = layouts[op[1] % len(layouts)], layouts[op[2] % len(layouts)]
            n = 1 + op[5] % min(len(ra), len(rb))
            i, j = op[3] % (len(ra) - n + 1), op[4] % (len(rb) - n + 1)
            assert t.unify(t.select(la, i, i + n), t.select(lb, j, j + n))
            for x, y in zip(ra[i:i + n], rb[j:j + n], strict=True):
                ref.union(x, y)
        elif kind == "shift":
            lay, r = layouts[op[1] % len(layouts)]
            (u, ru), (v, rv) = (t.layout(op[2]), ref.new(op[2])), (t.layout(op[2]), ref.new(op[2]))
            assert t.unify(Layout(lay.atoms + u.atoms), Layout(v.atoms + lay.atoms))
            for x, y in zip(r + ru, rv + r, strict=True):
                ref.union(x, y)
            layouts.extend([(u, ru), (v, rv)])
        else:
            lay, r = layouts[op[1] % len(layouts)]
            t.freeze(lay, "f")
            ref.frozen.update(ref.find(e) for e in r)
        # leaves stay consistent after every step
        for lay, r in layouts:
            assert t.channels(lay) == len(r)
    # the channel classes of the table are exactly those of the per-channel reference
    keys = {}
    for lay, r in layouts:
        for key, e in zip(channel_keys(t, lay), r, strict=True):
            keys.setdefault(ref.find(e), set()).add(key)
    for found in keys.values():
        assert len(found) == 1, "one reference class must be one (class, offset) of the table"
    owner = {}
    for root, found in keys.items():
        key = found.pop()
        assert owner.setdefault(key, root) == root, "two reference classes share one table channel"
        assert (key[0] in t.frozen) == (root in ref.frozen)
