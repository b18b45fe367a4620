"""The torchvision zoo sweep: every classification model analyses with exact params and MACs.

For each of torchvision's classification models (``weights=None``, eval mode), analysed at
the crop size of its DEFAULT weights' transforms:

* ``analyze`` succeeds;
* ``params`` equals ``sum(p.numel())`` of the model;
* ``macs`` rounded to 3 decimals in G equals torchvision's own ``_ops`` metadata;
* every op has a rule: the unknown ops left are at most those in ``ALLOWED_UNKNOWN_OPS``,
  with one ``UnknownOpWarning`` each.

The sweep builds every model with its parameters on the meta device (buffers stay real):
the analysis needs parameter shapes, never values, so even regnet_y_128gf and vit_h_14
build in a fraction of a second.  The slow sweep (tests/test_torchvision_zoo.py) builds
each model for real once and checks, from one analysis, exact params, a fully alive fresh
model, its coverage row and function preservation with dead channels.

``EXPECTED_FAILURES`` is applied as strict xfail: a model that starts to pass fails loudly.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import pytest
import torch
import torch.fx
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models

import nrfx
from nrfx import UnknownOpWarning
from nrfx.models import meta_parameters

MODELS: list[str] = list_models(module=torchvision.models)

# name -> (exception type the analysis raises, or a reason string for a wrong number; why)
EXPECTED_FAILURES: dict[str, tuple[type[BaseException] | str, str]] = {}

# model family -> op labels still analysed by the unknown-op fallback (frozen, measured MACs)
ALLOWED_UNKNOWN_OPS: dict[str, frozenset[str]] = {}

# families built only of convs (grouped ones too), per-channel norms, pointwise ops, adds, concats and
# depthwise convs: every channel space is free except the classifier's output.  The others freeze some
# spaces on purpose: channel shuffle (shufflenet), LayerNorm (convnext, swin, maxvit, vit) and attention heads.
FREE_FAMILIES = frozenset({"alexnet", "densenet", "efficientnet", "googlenet", "inception", "mnasnet",
                           "mobilenet", "regnet", "resnet", "resnext", "squeezenet", "vgg", "wide"})


# -- building ---------------------------------------------------------------------------------------------
def default_weights(name: str):
    """The DEFAULT weights enum entry of a model (read for metadata only, never downloaded)."""
    return get_model_weights(name).DEFAULT


def crop_size(name: str) -> int:
    """Input size of the DEFAULT weights' transforms (299 for inception_v3)."""
    return default_weights(name).transforms().crop_size[0]


def constructor_kwargs(name: str) -> dict:
    """Constructor arguments torchvision derives from the weights (ViT's image size, as its builder does)."""
    if name.startswith("vit_"):
        return {"image_size": default_weights(name).meta["min_size"][0]}
    return {}


def build(name: str, meta: bool = True) -> nn.Module:
    """The model with ``weights=None`` in eval mode; parameters on the meta device when ``meta``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        with meta_parameters() if meta else contextlib.nullcontext():
            model = get_model(name, weights=None, **constructor_kwargs(name))
    return model.eval()


def family(name: str) -> str:
    """Model family: the leading letters of the name (swin_v2_t -> swin, resnext50_32x4d -> resnext)."""
    return re.match(r"[a-z]+", name).group(0)


def analyze_recording(model: nn.Module, size: int, batch: int = 1):
    """Analyse at ``batch × 3 × size × size``; also return the UnknownOpWarnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = nrfx.analyze(model, torch.randn(batch, 3, size, size))
    return analysis, [w for w in caught if issubclass(w.category, UnknownOpWarning)]


def expected_failure_marks(name: str) -> list:
    """Strict xfail for a model listed in EXPECTED_FAILURES."""
    if name not in EXPECTED_FAILURES:
        return []
    error, why = EXPECTED_FAILURES[name]
    raises = error if isinstance(error, type) else None
    reason = why if raises is not None else f"{error}: {why}"
    return [pytest.mark.xfail(raises=raises, reason=reason, strict=True)]


def zoo_params() -> list:
    """One pytest param per model, with its expected-failure mark."""
    return [pytest.param(name, marks=expected_failure_marks(name), id=name) for name in MODELS]


def assert_exact_costs(name: str, model: nn.Module, analysis) -> None:
    """params = Σ numel; MACs = torchvision's ``_ops`` at 3 decimals in G."""
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert round(analysis.macs / 1e9, 3) == default_weights(name).meta["_ops"], analysis.macs


def assert_known_ops(name: str, analysis, unknown_warnings: list) -> None:
    """Only the allowed unknown ops remain, each warned about exactly once."""
    allowed = ALLOWED_UNKNOWN_OPS.get(family(name), frozenset())
    assert set(analysis.unknown_ops) <= allowed, sorted(analysis.unknown_ops)
    assert len(unknown_warnings) == len(analysis.unknown_ops)


def assert_free_where_expected(name: str, analysis) -> None:
    """In the plain-CNN families nothing but the model output is frozen."""
    if family(name) in FREE_FAMILIES:
        reasons = {r.split(" [")[0] for space in analysis.frozen_spaces for r in space.frozen}
        assert reasons == {"reaches the model output"}, reasons


# -- the sweep --------------------------------------------------------------------------------------------
def test_zoo_lists_every_classification_model():
    """The sweep covers torchvision's 80 classification models, each with DEFAULT weights metadata."""
    assert len(MODELS) == 80
    assert all("_ops" in default_weights(n).meta for n in MODELS)
    assert set(EXPECTED_FAILURES) <= set(MODELS)


@pytest.mark.parametrize("name", zoo_params())
def test_zoo_model_costs_are_exact(name: str):
    """analyze succeeds on the model; params and MACs match torchvision's numbers exactly."""
    model = build(name)
    analysis, unknown = analyze_recording(model, crop_size(name))
    assert_exact_costs(name, model, analysis)
    assert_known_ops(name, analysis, unknown)
    assert_free_where_expected(name, analysis)
    assert not analysis.auto_leaves


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
                                  "efficientnet_b0", "swin_t", "swin_v2_t", "maxvit_t", "vit_b_32", "inception_v3"])
def test_zoo_macs_are_per_example(name: str):
    """Doubling the example batch leaves MACs per example and params unchanged."""
    model = build(name)
    one, _ = analyze_recording(model, crop_size(name), batch=1)
    two, _ = analyze_recording(model, crop_size(name), batch=2)
    assert (two.params, two.macs) == (one.params, one.macs)


# -- the unknown-op fallback ------------------------------------------------------------------------------
def gram(x: torch.Tensor) -> torch.Tensor:
    """Channel Gram matrix per example: (B, C, H, W) -> (B, C, C); C·C·H·W MACs."""
    flat = x.flatten(2)
    return flat @ flat.transpose(1, 2)


torch.fx.wrap("gram")


class UnknownNet(nn.Module):
    """conv → bn → relu → conv → logcumsumexp along H, then W → conv → pool → linear: it has no rule."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.conv3 = nn.Conv2d(16, 12, 1, bias=False)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        x = self.conv3(torch.logcumsumexp(torch.logcumsumexp(x, 2), 3))
        return self.fc(x.mean((2, 3)))


class GramNet(nn.Module):
    """conv → wrapped gram (a matmul nrfx cannot see into) → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(gram(self.conv2(self.conv1(x))).flatten(1))


def _space_frozen(analysis, node: str, which: str) -> bool:
    """Whether the input or output channel space recorded for a layer node is frozen."""
    layout = getattr(analysis.records[node], which)
    return all(analysis.spaces[s].is_frozen for s in analysis.space_ids(layout))


def test_an_unknown_function_freezes_and_warns_once():
    """Two torch.logcumsumexp calls: one warning, the spaces they read frozen, the rest free, c(A) exact."""
    model = UnknownNet().eval()
    analysis, unknown = analyze_recording(model, 8, batch=2)
    assert len(unknown) == 1 and "logcumsumexp" in str(unknown[0].message)
    assert list(analysis.unknown_ops) == ["function torch.logcumsumexp"]
    assert len(analysis.unknown_ops["function torch.logcumsumexp"]) == 2
    assert not _space_frozen(analysis, "conv1", "output")
    assert _space_frozen(analysis, "conv2", "output")
    assert analysis.records["conv3"].input is None  # the unknown op's output carries no channels
    assert not _space_frozen(analysis, "conv3", "output")
    assert any("unknown op" in r for s in analysis.frozen_spaces for r in s.frozen)
    assert analysis.params == sum(p.numel() for p in model.parameters())
    macs = 8 * 3 * 9 * 64 + 16 * 8 * 64 + 12 * 16 * 64 + 10 * 12
    assert analysis.macs == macs


def test_unknown_wrapped_function_is_measured_and_freezes():
    """A torch.fx.wrap-ped function: one warning, its input frozen, its MACs measured exactly."""
    model = GramNet().eval()
    analysis, unknown = analyze_recording(model, 5, batch=3)
    assert len(unknown) == 1 and "gram" in str(unknown[0].message)
    assert [label.rsplit(".", 1)[-1] for label in analysis.unknown_ops] == ["gram"]
    assert not _space_frozen(analysis, "conv1", "output")
    assert _space_frozen(analysis, "conv2", "output")
    assert analysis.params == sum(p.numel() for p in model.parameters())
    macs = 8 * 3 * 9 * 25 + 6 * 8 * 25 + 6 * 6 * 25 + 10 * 36
    assert analysis.macs == macs


# -- rules the zoo needed ---------------------------------------------------------------------------------
def measured_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one real forward, counted by torch's FlopCounterMode (2 FLOPs = 1 MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


class QKScores(nn.Module):
    """Two projections contracted by an einsum over their output dim (attention scores)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("b n d, b m d -> b n m", self.q(x), self.k(x))


def test_einsum_contracts_one_free_space():
    """einsum 'bnd,bmd->bnm': q's and k's output dims become one free space; MACs = B·N·M·D / B."""
    analysis, unknown = analyze_recording_tokens(QKScores().eval(), (2, 5, 8))
    assert not unknown
    q_space = analysis.space_ids(analysis.records["q"].output)
    assert q_space == analysis.space_ids(analysis.records["k"].output)
    assert not analysis.spaces[q_space[0]].is_frozen
    assert analysis.macs == 2 * 5 * 8 * 6 + 5 * 5 * 6
    keep = {"q": torch.tensor([True, True, False, False, False, False])}
    live = analysis.utilization(keep)
    assert live.live_macs == 2 * 5 * 8 * 6 + 5 * 5 * 6  # k still reads all six: a channel dies only if dead in both
    both = {**keep, "k": keep["q"].clone()}
    assert analysis.utilization(both).live_macs == 2 * 5 * 8 * 2 + 5 * 5 * 2


def analyze_recording_tokens(model: nn.Module, shape: tuple[int, ...]):
    """Analyse a token model on ``torch.randn(shape)``; also return the UnknownOpWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = nrfx.analyze(model, torch.randn(shape))
    return analysis, [w for w in caught if issubclass(w.category, UnknownOpWarning)]


@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_macs(version: int):
    """Swin's wrapped window attention: MACs over the window-padded tokens, equal to a measured forward."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    cls = ShiftedWindowAttention if version == 1 else ShiftedWindowAttentionV2
    attention = cls(16, window_size=[4, 4], shift_size=[2, 2], num_heads=2).eval()
    x = torch.randn(2, 6, 7, 16)  # padded to 8 × 8: 64 tokens per example
    analysis, unknown = analyze_recording_tokens(attention, tuple(x.shape))
    assert not unknown
    tokens, area, dim = 64, 16, 16
    attention_macs = tokens * (3 * dim * dim + 2 * area * dim + dim * dim)
    mlp_macs = 0 if version == 1 else 49 * (2 * 512 + 512 * 2)  # v2: bias MLP over the 7 × 7 offsets
    assert analysis.macs == attention_macs + mlp_macs  # the bias MLP reads no input: not divided by the batch
    assert measured_macs(attention, x) == 2 * attention_macs + mlp_macs
    assert analysis.params == sum(p.numel() for p in attention.parameters())


class MergeTokens(nn.Module):
    """linear → Swin V2 patch merging (2×2 pixels into channels, linear 4C → 2C, LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.swin_transformer import PatchMergingV2

        self.embed = nn.Linear(3, 8)
        self.merge = PatchMergingV2(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.embed(x))


def test_patch_merging_repeats_the_channel_space():
    """Patch merging: the merged dim is four copies of the input space, which stays free."""
    model = MergeTokens().eval()
    analysis, unknown = analyze_recording_tokens(model, (1, 5, 5, 3))
    assert not unknown
    embed = analysis.space_ids(analysis.records["embed"].output)
    assert analysis.space_ids(analysis.records["merge_reduction"].input) == embed * 4
    assert not analysis.spaces[embed[0]].is_frozen
    assert analysis.macs == 25 * 3 * 8 + 9 * 32 * 16  # 5 × 5 tokens embedded, padded to 6 × 6, merged to 3 × 3
    keep = torch.tensor([True] * 5 + [False] * 3)
    live = analysis.utilization({"embed": keep})
    assert live.live_macs == 25 * 3 * 5 + 9 * 20 * 16
    assert live.live_params == analysis.params - 3 * 3 - 3 - 16 * 12


class DropPathBlock(nn.Module):
    """x + stochastic_depth(conv(x)): the residual space must stay free."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = StochasticDepth(0.2, "row")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        return self.head(x + self.drop(self.bn2(self.conv(x))))


def test_stochastic_depth_keeps_the_residual_space():
    """stochastic_depth is channel-wise: the residual stream is one free space, dead where both sides are."""
    model = DropPathBlock().eval()
    analysis, unknown = analyze_recording(model, 4)
    assert not unknown
    stream = analysis.space_ids(analysis.records["stem"].output)
    assert stream == analysis.space_ids(analysis.records["conv"].output)
    assert not analysis.spaces[stream[0]].is_frozen
    keep = torch.tensor([True] * 6 + [False] * 2)
    assert analysis.alive({"bn": keep, "bn2": keep})[stream[0]].tolist() == keep.tolist()
    assert analysis.alive({"bn": keep})[stream[0]].all()
