"""Decoders and caches: generative models whose outputs hold cache objects, islands of layer lists, and an
image-to-image generator (reflection padding, instance norms, a transposed-conv decoder).

Hugging Face GPT-2, T5 and Whisper (tiny configs built from scratch, float64) return their key/value
cache (``DynamicCache``, ``EncoderDecoderCache``) by default.  ``nrfx.capture.caches`` makes torch.export take
those outputs, so each model exports whole: every transformer layer is in the graph, params are exact,
rejuvenation keeps the function and the result returns the same cache class.  Forced into islands
(``capture="islands"``), tied embeddings count once and the layers of a ``ModuleList`` that is never
called itself become islands.  ``add_gates`` / ``fold_gates`` / the report work on island analyses
(a small model with a data-dependent root, no third-party package needed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from support import assert_kept_exactly, assert_same_outputs, assert_same_structure, kill_per_norm
from torch import nn

import nrfx
from nrfx.analysis.islands import IslandAnalysis

third_party = pytest.mark.third_party


# -- Hugging Face decoders ------------------------------------------------------------------------------
def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config)


def _t5() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, vocab_size=128, d_kv=8)
    return transformers.T5ForConditionalGeneration(config)


def _whisper() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
        vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperForConditionalGeneration(config)


def _tokens(batch: int) -> tuple[tuple, dict]:
    return (torch.randint(0, 128, (batch, 8)),), {}


def _seq2seq(batch: int) -> tuple[tuple, dict]:
    return (torch.randint(0, 128, (batch, 8)),), {"decoder_input_ids": torch.randint(0, 128, (batch, 5))}


def _audio(batch: int) -> tuple[tuple, dict]:
    """Whisper's encoder takes 2 × max_source_positions frames of num_mel_bins."""
    return (torch.randn(batch, 16, 32, dtype=torch.float64),), {"decoder_input_ids": torch.randint(0, 128, (batch, 5))}


# name -> (build, inputs at a batch size, the ModuleLists holding the transformer layers, the cache class,
#          a layer stack and its island paths when analysed as islands)
DECODERS: dict[str, tuple[Callable, Callable, tuple[str, ...], str, str, tuple[str, ...]]] = {
    "gpt2": (_gpt2, _tokens, ("transformer.h",), "DynamicCache", "transformer", ("h.0", "h.1")),
    "t5": (_t5, _seq2seq, ("encoder.block", "decoder.block"), "EncoderDecoderCache", "encoder",
           ("block.0", "block.1")),
    "whisper": (_whisper, _audio, ("model.encoder.layers", "model.decoder.layers"), "EncoderDecoderCache",
                "model.encoder", ("layers.0", "layers.1")),
}


def _prepared(name: str, batch: int = 2, seed: int = 0):
    """The float64 eval-mode model and its example inputs (args, kwargs)."""
    torch.manual_seed(seed)
    model = DECODERS[name][0]().double().eval()
    args, kwargs = DECODERS[name][1](batch)
    return model, args, kwargs


def _analyze(model: nn.Module, args: tuple, kwargs: dict, capture: str = "auto"):
    return _quiet(nrfx.analyze, model, args, example_kwargs=kwargs or None, capture=capture)


def _quiet(function: Callable, *args, **kwargs):
    """``function(*args, **kwargs)`` without warnings (coverage and unknown-op notes of tiny models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _rejuvenate(model: nn.Module, masks, budget, args: tuple, kwargs: dict, **options) -> nn.Module:
    return _quiet(nrfx.rejuvenate, model, masks, budget, example_inputs=args, example_kwargs=kwargs or None, **options)


def _call(module: nn.Module, args: tuple, kwargs: dict):
    with torch.no_grad():
        return module(*args, **kwargs)


def _true_params(model: nn.Module) -> int:
    """Elements of every distinct parameter tensor (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


decoders = pytest.mark.parametrize("name", [pytest.param(n, marks=third_party) for n in DECODERS])


@decoders
def test_decoder_exports_whole_with_every_layer(name: str):
    """The cache in the output no longer stops torch.export: one graph holds every layer; params exact."""
    model, args, kwargs = _prepared(name)
    before = _state(model)
    analysis = _analyze(model, args, kwargs)
    assert not isinstance(analysis, IslandAnalysis) and analysis.capture == "export", analysis.capture_notes
    assert analysis.params == _true_params(model)
    in_graph = {id(p) for p in analysis.gm.parameters()}
    for container in DECODERS[name][2]:
        layers = model.get_submodule(container)
        assert len(layers) == 2
        assert all(id(p) in in_graph for p in layers.parameters()), container
    coverage = analysis.coverage()
    assert 0 < coverage.free <= 1 and 0 <= coverage.monitored <= coverage.free
    _assert_unchanged(model, before)
    assert type(_call(model, args, kwargs).cache).__name__ == DECODERS[name][3]


@decoders
def test_decoder_result_returns_the_cache_and_keeps_the_function(name: str):
    """rejuvenate at c(A) without dead channels: same outputs, same output classes (cache included), any batch."""
    model, args, kwargs = _prepared(name)
    before = _state(model)
    expected = _call(model, args, kwargs)
    new = _rejuvenate(model, None, None, args, kwargs)
    got = _call(new, args, kwargs)
    assert type(got.cache).__name__ == DECODERS[name][3]
    assert_same_structure(got, expected)
    assert len(pytree.tree_leaves(got.cache)) == len(pytree.tree_leaves(expected.cache)) > 0
    assert_same_outputs(got, expected, "rejuvenated at c(A)")
    args3, kwargs3 = DECODERS[name][1](3)
    assert_same_outputs(_call(new, args3, kwargs3), _call(model, args3, kwargs3), "batch 3")
    _assert_unchanged(model, before)


@decoders
def test_decoder_widening_keeps_the_function(name: str):
    """No dead channel: every free space grows to 1.1 × c(A), the outputs stay."""
    model, args, kwargs = _prepared(name)
    analysis = _analyze(model, args, kwargs)
    expected = _call(model, args, kwargs)
    wide = _rejuvenate(model, None, nrfx.Budget.fraction(1.1), args, kwargs, analysis=analysis)
    assert analysis.params < _true_params(wide) <= 1.1 * analysis.params
    assert_same_outputs(_call(wide, args, kwargs), expected, "widened")


@decoders
def test_gated_decoder_dead_channels_removed(name: str):
    """Gates in the MLP hidden spaces, 40 % of their entries zero: rejuvenate at U(θ) removes them, same outputs."""
    model, args, kwargs = _prepared(name)
    gated = _quiet(nrfx.add_gates, model, args, example_kwargs=kwargs or None)
    assert gated.nrfx_gates
    if name == "gpt2":  # Conv1D runs as addmm: its gate is named after the module that owns the weight
        assert gated.nrfx_gates == ("transformer.h.0.mlp.c_fc_gate", "transformer.h.1.mlp.c_fc_gate",
                                    "transformer.h.0.attn.heads_gate", "transformer.h.1.attn.heads_gate")
    assert_same_outputs(_call(gated, args, kwargs), _call(model, args, kwargs), "gates are ones")
    _kill_mlp_gates(gated)
    analysis = _analyze(gated, args, kwargs)
    live = analysis.utilization().live_params
    assert live < analysis.params
    pruned = _rejuvenate(gated, None, live, args, kwargs, analysis=analysis, align=1)
    assert _true_params(pruned) <= live
    assert_same_outputs(_call(pruned, args, kwargs), _call(gated, args, kwargs), "dead channels removed")


def _kill_mlp_gates(gated: nn.Module) -> None:
    """40 % of every MLP gate's entries zero (dead heads change the returned caches' shapes: tests/test_heads.py)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path in gated.nrfx_gates:
            if not path.endswith("heads_gate"):
                weight = gated.get_submodule(path).weight
                weight[torch.rand(weight.shape[0], generator=gen) < 0.4] = 0


@decoders
def test_decoder_as_islands_counts_tied_weights_once(name: str):
    """capture='islands': params exact though the embedding and the head share a tensor; nothing left out
    but modules the forward never calls; the report's totals are the model's; rejuvenate keeps the function."""
    model, args, kwargs = _prepared(name)
    analysis = _analyze(model, args, kwargs, "islands")
    assert isinstance(analysis, IslandAnalysis)
    assert analysis.shared_params > 0  # tied embeddings held by two islands
    assert analysis.params == _true_params(model)
    assert all(why == "not called in the forward" for why in analysis.left_out.values()), analysis.left_out
    report = analysis.report()
    assert report.totals.params == analysis.params == report.to_dict()["totals"]["params"]
    assert report.totals.live_params == analysis.utilization().live_params == analysis.params
    assert "tied across islands counted once" in report.summary()
    expected = _call(model, args, kwargs)
    new = _rejuvenate(model, None, None, args, kwargs, analysis=analysis)
    assert type(new) is type(model)
    assert_same_outputs(_call(new, args, kwargs), expected, "islands rejuvenated")
    analysis.retie(model, new)
    assert _true_params(new) == analysis.params  # the islands' copies of the tied tensor are one again


@pytest.mark.parametrize("name", [pytest.param(n, marks=third_party) for n in ("t5", "whisper")])
def test_decoder_islands_gated_rejuvenated_and_folded(name: str):
    """capture='islands': add_gates gates the islands' MLPs, dead gate entries are removed, fold_gates folds back."""
    model, args, kwargs = _prepared(name)
    gated = _quiet(nrfx.add_gates, model, args, example_kwargs=kwargs or None, capture="islands")
    assert type(gated) is type(model) and len(gated.nrfx_gates) >= 4
    assert_same_outputs(_call(gated, args, kwargs), _call(model, args, kwargs), "gates are ones")
    _kill_mlp_gates(gated)
    expected = _call(gated, args, kwargs)
    analysis = _analyze(gated, args, kwargs, "islands")
    assert isinstance(analysis, IslandAnalysis) and analysis.params == _true_params(gated)
    assert analysis.coverage().monitored_channels == analysis.coverage().free_channels > 0
    assert analysis.utilization().live_params < analysis.params
    new = _rejuvenate(gated, None, None, args, kwargs, analysis=analysis)
    assert_same_outputs(_call(new, args, kwargs), expected, "islands rejuvenated")
    folded = _quiet(nrfx.fold_gates, gated, args, example_kwargs=kwargs or None)
    assert folded.nrfx_gates == () and not any(isinstance(m, nrfx.Gate) for m in folded.modules())
    assert_same_outputs(_call(folded, args, kwargs), expected, "gates folded")


@decoders
def test_layer_stack_islands_descend_into_its_layer_list(name: str):
    """A stack analysed as islands: its ModuleList is never called itself, so each layer is an island."""
    model, args, _ = _prepared(name)
    stack = model.get_submodule(DECODERS[name][4])
    analysis = _analyze(stack, args, {}, "islands")
    assert set(DECODERS[name][5]) <= set(analysis.islands)
    assert analysis.left_out == {}
    assert analysis.params == _true_params(stack)


@third_party
def test_encoder_decoder_cache_is_a_pytree_node():
    """After an export, an EncoderDecoderCache flattens to its tensors and comes back as itself."""
    model, args, kwargs = _prepared("t5")
    _analyze(model, args, kwargs)  # registers the cache classes
    cache = _call(model, args, kwargs).cache
    leaves, spec = pytree.tree_flatten(cache)
    assert len(leaves) == 2 * 2 * 2 and all(isinstance(x, torch.Tensor) for x in leaves)  # (self, cross) × layers × kv
    again = pytree.tree_unflatten(leaves, spec)
    assert type(again) is type(cache) and len(again) == len(cache)
    for layer, original in zip(again, cache, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(layer, original, strict=True) if isinstance(a, torch.Tensor))


# -- islands of a small decoder (no third-party package) ------------------------------------------------
class _Block(nn.Module):
    """A residual MLP: its hidden space is free and has no norm (a gate gives it a signal)."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class _Decoder(nn.Module):
    """Layers in a ModuleList, the head in a ModuleDict tied to the embedding, and a data-dependent root."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([_Block() for _ in range(2)])
        self.heads = nn.ModuleDict({"lm": nn.Linear(16, 32, bias=False)})
        self.heads["lm"].weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        if x.sum() > 0:  # neither fx nor torch.export captures a branch on values
            x = x * 2
        return self.heads["lm"](x)


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _Decoder().double().eval(), torch.randint(0, 32, (2, 6))


def test_islands_descend_into_containers_and_count_tied_weights_once():
    model, ids = _small()
    analysis = _analyze(model, (ids,), {})
    assert isinstance(analysis, IslandAnalysis)
    assert set(analysis.islands) == {"embed", "layers.0", "layers.1", "heads.lm"} and analysis.left_out == {}
    assert analysis.shared_params == 32 * 16
    assert analysis.params == _true_params(model) == sum(a.params for a in analysis.islands.values()) - 32 * 16
    assert analysis.coverage().free_channels == 2 * 32  # the two MLP hidden spaces


def test_add_gates_and_fold_gates_on_islands():
    """add_gates gates each island; the gated model rejuvenates and folds back with the same function."""
    model, ids = _small()
    before = _state(model)
    expected = _call(model, (ids,), {})
    gated = nrfx.add_gates(model, ids)
    _assert_unchanged(model, before)
    assert type(gated) is _Decoder
    assert gated.nrfx_gates == ("layers.0.fc1_gate", "layers.1.fc1_gate")
    assert gated.heads["lm"].weight is gated.embed.weight  # the tie survives the copy
    torch.testing.assert_close(_call(gated, (ids,), {}), expected, rtol=0, atol=0)
    analysis = _analyze(gated, (ids,), {})
    assert analysis.coverage().monitored_channels == 2 * 32
    with torch.no_grad():
        gated.layers[0].get_submodule("fc1_gate").weight[:10] = 0
    masks = analysis.masks_from(gated)
    assert int(masks["layers.0.fc1_gate"].sum()) == 22
    reference = _call(gated, (ids,), {})
    new = nrfx.rejuvenate(gated, masks, None, example_inputs=ids, analysis=analysis, align=1)
    torch.testing.assert_close(_call(new, (ids,), {}), reference, rtol=1e-9, atol=1e-12)
    assert 22 in (len(k) for k in new.nrfx_plans["layers.0"].keep)  # the 10 dead channels did not survive
    for example in (None, ids):
        folded = nrfx.fold_gates(gated, example)
        assert folded.nrfx_gates == () and not any(isinstance(m, nrfx.Gate) for m in folded.modules())
        torch.testing.assert_close(_call(folded, (ids,), {}), reference, rtol=1e-12, atol=1e-12)
    assert any(isinstance(m, nrfx.Gate) for m in gated.modules())  # fold_gates works on a copy


def test_island_report_totals_and_retie():
    model, ids = _small()
    analysis = _analyze(model, (ids,), {})
    report = analysis.report()
    totals = report.to_dict()["totals"]
    assert totals["params"] == analysis.params and totals["r_params"] == 1.0
    assert totals["macs"] == analysis.macs == sum(a.macs for a in analysis.islands.values())
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=ids, analysis=analysis, align=1)
    assert new.heads["lm"].weight is new.embed.weight  # rejuvenate re-tied the copies the islands rebuilt
    assert sum(p.numel() for p in new.parameters()) <= int(1.2 * analysis.params)  # the budget, tied tensors once
    torch.testing.assert_close(_call(new, (ids,), {}), _call(model, (ids,), {}), rtol=1e-9, atol=1e-12)


class _TiedFree(nn.Module):
    """``side`` shares its weight with ``body.0``, whose output space is free inside ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.side = nn.Linear(8, 16)
        self.side.weight = self.body[0].weight

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # a data-dependent root
            y = y * 2
        return y, self.side(x)


def test_an_island_that_would_resize_a_tied_tensor_is_refused():
    """``body`` may resize the shared weight, so ``side`` is no island: left out, its bias outside, params exact."""
    torch.manual_seed(0)
    model = _TiedFree().double().eval()
    analysis = _analyze(model, (torch.randn(4, 8, dtype=torch.float64),), {})
    assert set(analysis.islands) == {"body"} and analysis.shared_params == 0
    assert "shares a parameter with island 'body'" in analysis.left_out["side"]
    assert analysis.outside_params == 16  # side.bias; side.weight is counted inside body
    assert analysis.params == _true_params(model)


# -- image-to-image generators: reflection padding --------------------------------------------------------
class _ReflectBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3), nn.InstanceNorm2d(c, affine=True),
                                  nn.ReLU(True), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                  nn.InstanceNorm2d(c, affine=True))

    def forward(self, x):
        return x + self.body(x)


def _resnet_generator(c: int = 8, blocks: int = 2) -> nn.Sequential:
    """The CycleGAN / pix2pix ResNet generator, small: reflection pads before the convs, instance norms, a
    transposed-conv decoder."""
    return nn.Sequential(
        nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c, affine=True), nn.ReLU(True),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c, affine=True), nn.ReLU(True),
        *(_ReflectBlock(2 * c) for _ in range(blocks)),
        nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(c, affine=True),
        nn.ReLU(True), nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh())


def _monitored(model: nn.Module, x: torch.Tensor):
    """The model's analysis, with no unknown op and at least 95 % of its channels monitored."""
    analysis = nrfx.analyze(model, x)
    cover = analysis.coverage()
    assert cover.monitored_channels >= 0.95 * cover.channels and not analysis.unknown_ops
    return analysis


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_reflection_padded_generator_is_monitored_and_rejuvenated(scheme):
    """Padding modules pass the channel space (they were unknown ops, freezing 88 % of the channels here)."""
    torch.manual_seed(0)
    model = _resnet_generator().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    analysis = _monitored(model, x)
    kill_per_norm(model, analysis, 0.4, seed=3, constants=True)
    assert_kept_exactly(model, x, schemes=(scheme,), align=4)


# -- U-Net decoders upsampling by pixel shuffle ----------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


def _shuffle_up(cin: int, cout: int) -> nn.Sequential:
    """fastai's PixelShuffle_ICNR with blur: conv 1×1 to 4·cout, bn, relu, PixelShuffle(2), then the
    replication pad and 2×2 average pool that smooth its checkerboard."""
    return nn.Sequential(_conv_bn_relu(cin, 4 * cout, 1), nn.PixelShuffle(2), nn.ReplicationPad2d((1, 0, 1, 0)),
                         nn.AvgPool2d(2, stride=1))


class _ShuffleUnet(nn.Module):
    """Two strided conv-bn-relu stages down; up by pixel shuffle, concatenated with the skip (through its own
    norm, as fastai's UnetBlock), two conv-bn-relu; a last shuffle up and a 1×1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.down1, self.down2 = _conv_bn_relu(3, 8, stride=2), _conv_bn_relu(8, 16, stride=2)
        self.up, self.skip_bn = _shuffle_up(16, 8), nn.BatchNorm2d(8)
        self.fuse = nn.Sequential(_conv_bn_relu(16, 8), _conv_bn_relu(8, 8))
        self.final, self.head = _shuffle_up(8, 4), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        skip = self.down1(x)
        y = self.fuse(torch.cat([self.up(self.down2(skip)), F.relu(self.skip_bn(skip))], 1))
        return self.head(self.final(y))


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_a_pixel_shuffle_unet_decoder_is_monitored_and_rejuvenated(scheme):
    """PixelShuffle upsamplers tie their conv's channels in blocks of 4 to the decoder's (they were unknown ops,
    freezing a third of a fastai-style U-Net's channels)."""
    torch.manual_seed(0)
    model = _ShuffleUnet().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    analysis = _monitored(model, x)
    kill_per_norm(model, analysis, 0.4, seed=5, constants=True)
    new = assert_kept_exactly(model, x, schemes=(scheme,), budgets=(None, nrfx.Budget.fraction(1.5)), align=4)
    grown = new.get_submodule("up.0.0").out_channels
    assert grown > 32 and grown % 4 == 0  # the upsampler grew in whole blocks of 4
