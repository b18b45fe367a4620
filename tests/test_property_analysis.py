"""Property: c(A) and U(θ) of nrfx equal the size and MACs of the network built by hand at full / live widths.

Random architectures come from ``models.archs``; random masks switch channels off per norm (and
per norm-less conv).  ``models.ChannelGraph`` follows every channel by hand (ties, frozen
channels, zeros at every weight) to decide which channels are dead; the narrow network is then
built with those channels removed and measured with ``sum(numel)`` and FlopCounterMode.  The
narrow network, with weights copied, must also compute the same function as the full one when
the masked channels output exact zeros: that checks the hand reference itself.
"""

from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import (
    SE,
    Add,
    Arch,
    Cat,
    ChannelGraph,
    Conv,
    GNorm,
    Head,
    Mlp,
    Norm,
    Residual,
    Slice,
    archs,
    build,
    count_macs,
    mask_sites,
    masks_for,
    repair_masks,
    zero_masked,
)

import nrfx

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def expected_param_sizes(a: nrfx.Analysis, alive: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Size of every parameter nrfx claims, at the live widths of its spaces."""
    live = [int(x.sum()) for x in alive]
    out = {}
    for name, info in a.param_info.items():
        if info.buffer:
            continue
        size = 1
        for extent, layout in zip(info.shape, info.dims, strict=True):
            size *= extent if layout is None else layout.inner * sum(live[s] for s in a.space_ids(layout))
        out[name] = size
    return out


def check(arch: Arch, masks: dict[str, torch.Tensor], use_gamma: bool) -> None:
    x = torch.randn(1, arch.in_channels, arch.size, arch.size)
    masks = repair_masks(arch, masks)
    full = build(arch)
    if use_gamma:  # dead channels as read from γ by nrfx.norm_masks
        zero_masked(full, masks)
        assert {k: v.tolist() for k, v in nrfx.norm_masks(full).items()} == {k: v.tolist() for k, v in masks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.UnknownOpWarning)
        a = nrfx.analyze(full, x)
    assert not a.unknown_ops
    # c(A): the full network
    assert a.params == sum(p.numel() for p in full.parameters())
    assert a.macs == count_macs(full, x)
    # U(θ): the network built by hand without the dead channels
    graph = ChannelGraph(arch, masks)
    narrow = graph.narrow()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "mask for .* is ignored", nrfx.NrfxWarning)  # masks on frozen spaces
        u = a.utilization(None if use_gamma else masks)
    sizes = expected_param_sizes(a, u.alive)
    hand = {n: p.numel() for n, p in narrow.named_parameters()}
    assert sizes == hand
    assert u.live_params == sum(hand.values())
    assert u.live_macs == count_macs(narrow, x)


@settings(max_examples=80, **SETTINGS)
@given(st.data())
def test_utilization_equals_the_hand_built_narrow_network(data):
    arch = data.draw(archs())
    use_gamma = data.draw(st.booleans())
    masks = data.draw(masks_for(arch, all_norm_sites_alive_once=use_gamma))
    check(arch, masks, use_gamma)


def test_a_dangling_grouped_conv_lets_its_dead_input_block_go():
    """Found by the property above (2026-12-05): c4 is a grouped conv no layer reads; its group 0 reads only c3's
    dead channels 0-1. The block dies whole, c4's unread output channel with it (an output nobody reads keeps no
    block alive), so U(θ) counts neither; the reference agrees."""
    ops = (Residual(src=0, mid=2, k=1), Conv(src=0, out=3, groups=3, bn=False), SE(src=0, hidden=1),
           Conv(src=1, out=4, bn=False), Conv(src=4, out=2, groups=2, bn=False), SE(src=3, hidden=1),
           Head(src=6, classes=1))
    arch = Arch(ops, in_channels=3, size=16)
    t, f = True, False
    masks = {"r0an": [t, t], "r0bn": [f, f, t], "c1": [t, t, t], "s2a": [t], "s2b": [t, t, t], "c3": [f, f, t, t],
             "c4": [t, t], "s5a": [f], "s5b": [t, t, t]}
    masks = {k: torch.tensor(v) for k, v in masks.items()}
    graph = ChannelGraph(arch, masks)
    assert graph.kept(graph.outputs["c4"]) == [1] and graph.kept(graph.outputs["c3"]) == [2, 3]
    check(arch, masks, use_gamma=False)


@settings(max_examples=30, **SETTINGS)
@given(st.data())
def test_narrow_network_computes_the_same_function(data):
    """The hand reference is right: removing its dead channels does not change the outputs."""
    arch = data.draw(archs())
    masks = repair_masks(arch, data.draw(masks_for(arch)))
    full = build(arch, dtype=torch.float64)
    zero_masked(full, masks)
    full.eval()
    narrow = ChannelGraph(arch, masks).narrow(source=full).to(torch.float64).eval()
    x = torch.randn(2, arch.in_channels, arch.size, arch.size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), full(x), rtol=1e-9, atol=1e-9)


# -- hand-picked architectures the strategy may take long to find ------------------------------------------------
FIXED = [
    # residual whose shortcut is a concat, then a split across the concat border, re-added shifted
    Arch((Conv(0, 4), Conv(0, 3, groups=1), Cat((1, 2)), Residual(3, 5, style="iadd"),
          Slice(4, 2, 6, "split"), Slice(4, 0, 4, "narrow"), Add(5, 6), Head(7, 2))),
    # depthwise after a concat, grouped conv, SE gate, flatten head
    Arch((Conv(0, 4), Conv(0, 4, k=1), Cat((1, 2)), Conv(3, 8, groups=8), SE(4, 2),
          Conv(5, 6, groups=2, stride=2), Head(6, 3, gap=False))),
    # in-place add whose result is not used: the next layer reads the mutated tensor
    Arch((Conv(0, 6), Residual(1, 3, style="add_unused"), Residual(2, 2, k=1, style="add_"), Head(3, 2))),
    # a concat repeating the same value, sliced at a border inside the repetition
    Arch((Conv(0, 3), Cat((1, 1)), Slice(2, 1, 5, "getitem"), Conv(3, 4, bn=False), Head(4, 2))),
]


def _dead_everywhere(arch: Arch, keep_every: int) -> dict[str, torch.Tensor]:
    masks = {}
    for name, width in mask_sites(arch).items():
        masks[name] = torch.tensor([j % keep_every == 0 for j in range(width)])
    return masks


def test_fixed_architectures():
    for arch in FIXED:
        for keep_every in (1, 2, 3):
            check(arch, _dead_everywhere(arch, keep_every), use_gamma=False)
        full = build(arch, dtype=torch.float64)
        masks = repair_masks(arch, _dead_everywhere(arch, 2))
        zero_masked(full, masks)
        full.eval()
        narrow = ChannelGraph(arch, masks).narrow(source=full).to(torch.float64).eval()
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(narrow(x), full(x), rtol=1e-9, atol=1e-9)


def test_channel_graph_spaces_describe_ties_and_frozen():
    # conv(3→4) + residual: one space written by c0, b0, r1bn and r1b; a grouped conv ties it group by group
    arch = Arch((Conv(0, 4), Residual(1, 2), Conv(2, 6, groups=2), Head(3, 2)))
    spaces = ChannelGraph(arch).spaces()
    by_module = {}
    for members, is_frozen in spaces:
        for name, _ in members:
            by_module.setdefault(name, []).append((frozenset(members), is_frozen))
    (c0_first, frozen0), *_ = by_module["c0"]
    assert {("c0", 0), ("b0", 0), ("r1b", 0), ("r1bn", 0)} <= c0_first and not frozen0
    assert not any(f for _, f in by_module["c2"]) and all(f for _, f in by_module["head"])
    assert not any(f for _, f in by_module["r1a"])
    assert len(by_module["r1a"]) == 2  # two separate channels
    # group 0 (c0 channels 0-1, c2 channels 0-2): dead only when dead on both sides
    half = {"b0": torch.tensor([False, False, True, True]), "b2": torch.tensor([False, True, False, True, True, True])}
    graph = ChannelGraph(arch, half)
    assert graph.kept(graph.values[1]) == [0, 1, 2, 3]  # b2 keeps channel 1 of group 0 alive: the group lives
    dead = {"b0": torch.tensor([False, False, True, True]), "r1bn": torch.tensor([False, False, True, True]),
            "b2": torch.tensor([False] * 3 + [True] * 3)}  # dead in both operands of the residual add
    graph = ChannelGraph(arch, dead)
    assert graph.kept(graph.values[1]) == [2, 3] and graph.kept(graph.values[3]) == [3, 4, 5]
    check(arch, dead, use_gamma=False)


def test_groupnorm_and_gated_mlp_by_hand():
    # GroupNorm (2 channels per group) then a grouped conv reading 2 channels per group into 1: one unit
    arch = Arch((Conv(0, 8), GNorm(1, 4), Conv(2, 4, groups=4, k=1), Head(3, 2)))
    masks = {"n1": torch.tensor([False, False, True] + [True] * 5), "b2": torch.tensor([False, False, True, True])}
    graph = ChannelGraph(arch, masks)
    assert graph.kept(graph.values[2]) == [2, 3, 4, 5, 6, 7]  # group 0 dead on both sides; group 1 half: kept
    assert graph.kept(graph.values[3]) == [1, 2, 3]  # out channel 1 dead at b2, but its group's input lives
    check(arch, masks, use_gamma=False)
    check(arch, masks | {"b0": torch.ones(8, dtype=torch.bool)}, use_gamma=True)
    # a gated MLP: the gate marks hidden channels dead; the residual stream stays
    arch = Arch((Conv(0, 4), Mlp(1, 5), Head(2, 2)))
    masks = {"m1gn": torch.tensor([True, False, False, True, False])}
    graph = ChannelGraph(arch, masks)
    assert graph.kept(graph.outputs["m1a"]) == [0, 3] and graph.kept(graph.values[2]) == [0, 1, 2, 3]
    check(arch, masks, use_gamma=False)
    check(arch, masks | {"b0": torch.ones(4, dtype=torch.bool)}, use_gamma=True)


def test_a_norm_reading_zero_channels_keeps_them():
    """Conv-BN with dead channels, then a second norm: it emits constants there, the channels stay."""
    arch = Arch((Conv(0, 4), Norm(1), Head(2)))
    check(arch, {"b0": torch.tensor([False, True, False, True])}, use_gamma=False)
    dead_at_both = {"b0": torch.tensor([False, True, True, True]), "n1": torch.tensor([False, True, True, True])}
    check(arch, dead_at_both, use_gamma=False)
    graph = ChannelGraph(arch, dead_at_both)
    assert graph.kept(graph.values[1]) == [1, 2, 3]  # dead at both norms: removed
