"""Third-party models (Hugging Face transformers 5, T5 and Whisper with key/value caches in their outputs
(GPT-2: tests/test_decoders.py), ultralytics YOLO, torchvision segmentation / video /
optical flow, segmentation-models-pytorch): capture, exact costs, function-preserving rejuvenation.

Every model is built from a tiny config (no weights, nothing downloaded) in float64 (RAFT, which
computes its coordinate grids in float32, in float32 at rtol 1e-4).  For each one:

* ``analyze`` succeeds with the expected capture and ``params == sum(p.numel())``;
* ``rejuvenate`` keeps the function (rtol 1e-9) with dead channels (norm scales zeroed per norm, or,
  where no free space carries a norm, the output rows of linears / convs zeroed and given as masks)
  and for pure widening at ``Budget.fraction(1.1)`` without dead channels;
* the result runs at another batch size, ``.train()`` / ``.eval()`` switch it, and it returns the
  model's own output classes (HF ModelOutput, tuples, dicts);

torchvision models with ``_ops`` metadata also get their MACs checked at the weights' input size
(parameters on the meta device where fx captures, so that costs nothing).  BERT (keyword inputs)
also round-trips through ``state_dict`` + ``apply_plan``.  ``EXPECTED_FAILURES`` is applied as strict
xfail: a model that starts to pass fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from support import assert_same_outputs, assert_same_structure, kill_per_norm
from torch import nn

import nrfx
from nrfx.models import meta_parameters

os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks, no downloads

pytestmark = [pytest.mark.third_party, pytest.mark.usefixtures("one_thread")]

# -- models ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A tiny third-party model: how to build it and its inputs at a batch size, what capture to expect."""

    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple, dict]]
    capture: str
    slow: bool = False
    option: str = "auto"  # the capture= given to analyze / rejuvenate
    dtype: torch.dtype = torch.float64
    macs: tuple[Callable[[], nn.Module], Callable[[], tuple], str] | None = None  # meta model, inputs, weights


def _images(size: int) -> Callable[[int], tuple[tuple, dict]]:
    return lambda batch: ((torch.randn(batch, 3, size, size, dtype=torch.float64),), {})


def _hf(config_name: str, model_name: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))

    return build


def _bert_inputs(batch: int) -> tuple[tuple, dict]:
    ids = torch.randint(0, 100, (batch, 16))
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[0, 11:] = 0  # one padded sequence: the attention mask matters
    return (ids,), {"attention_mask": mask}


def _seq2seq_inputs(batch: int) -> tuple[tuple, dict]:
    """Encoder tokens and decoder tokens (T5): the output holds an EncoderDecoderCache (nrfx.capture.caches)."""
    return (torch.randint(0, 128, (batch, 8)),), {"decoder_input_ids": torch.randint(0, 128, (batch, 5))}


def _audio_inputs(batch: int) -> tuple[tuple, dict]:
    """Whisper: 2 × max_source_positions frames of num_mel_bins features, and decoder tokens."""
    return (torch.randn(batch, 16, 32, dtype=torch.float64),), {"decoder_input_ids": torch.randint(0, 128, (batch, 5))}


def _yolo(yaml: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tasks = pytest.importorskip("ultralytics.nn.tasks")
        return tasks.DetectionModel(yaml, verbose=False)

    return build


def _torchvision(path: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        module, name = path.rsplit(".", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return getattr(getattr(torchvision.models, module), name)(**kwargs)

    return build


def _tv_macs(path: str, weights: str, shape: tuple, meta: bool = True, **kwargs):
    """(model, inputs, weights enum path) for a MAC check against ``_ops``; parameters on the meta device when
    ``meta`` (torch.export cannot mix meta parameters with real inputs: export-captured models are built for real)."""

    def build() -> nn.Module:
        with meta_parameters() if meta else contextlib.nullcontext():
            return _torchvision(path, weights=None, **kwargs)().eval()

    return build, lambda: tuple(torch.randn(*s) for s in shape), weights


def _smp_fpn() -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    return smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=3)


def _flow_inputs(batch: int) -> tuple[tuple, dict]:
    """RAFT runs in float32 only (its coordinate grids are ``.float()``); 128 × 128 is its smallest input."""
    return tuple(torch.randn(batch, 3, 128, 128) for _ in range(2)), {"num_flow_updates": 2}


CASES: dict[str, Case] = {
    "hf_vit": Case(_hf("ViTConfig", "ViTForImageClassification", hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10),
                   _images(32), "export"),
    "hf_bert": Case(_hf("BertConfig", "BertForSequenceClassification", vocab_size=100, hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=32, num_labels=3),
                    _bert_inputs, "export"),
    "hf_convnext": Case(_hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32, 64, 128],
                            depths=[1, 1, 2, 1], num_labels=10, image_size=32),
                        _images(32), "export"),
    "hf_resnet": Case(_hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                          hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10),
                      _images(32), "fx"),
    "hf_t5": Case(_hf("T5Config", "T5ForConditionalGeneration", d_model=32, d_ff=64, num_layers=2, num_heads=4,
                      vocab_size=128, d_kv=8),
                  _seq2seq_inputs, "export"),
    "hf_whisper": Case(_hf("WhisperConfig", "WhisperForConditionalGeneration", d_model=32, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                           vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                       _audio_inputs, "export"),
    "hf_swin": Case(_hf("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=2, embed_dim=16,
                        depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10),
                    _images(32), "export"),
    "yolov8n": Case(_yolo("yolov8n.yaml"), _images(64), "export", slow=True),
    "yolo11n": Case(_yolo("yolo11n.yaml"), _images(64), "export", slow=True),
    "lraspp_mobilenet_v3_large": Case(
        _torchvision("segmentation.lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=5),
        _images(64), "fx",
        macs=_tv_macs("segmentation.lraspp_mobilenet_v3_large", "segmentation.LRASPP_MobileNet_V3_Large_Weights",
                      [(1, 3, 520, 520)], weights_backbone=None)),
    "deeplabv3_mobilenet_v3_large": Case(
        _torchvision("segmentation.deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None,
                     num_classes=5, aux_loss=True),
        _images(64), "fx",
        macs=_tv_macs("segmentation.deeplabv3_mobilenet_v3_large",
                      "segmentation.DeepLabV3_MobileNet_V3_Large_Weights", [(1, 3, 520, 520)],
                      weights_backbone=None, aux_loss=True)),
    "fcn_resnet50": Case(
        _torchvision("segmentation.fcn_resnet50", weights=None, weights_backbone=None, num_classes=5),
        _images(64), "fx", slow=True,
        macs=_tv_macs("segmentation.fcn_resnet50", "segmentation.FCN_ResNet50_Weights", [(1, 3, 520, 520)],
                      weights_backbone=None, aux_loss=True)),
    "r3d_18": Case(
        _torchvision("video.r3d_18", weights=None, num_classes=10),
        lambda batch: ((torch.randn(batch, 3, 2, 16, 16, dtype=torch.float64),), {}), "fx",
        macs=_tv_macs("video.r3d_18", "video.R3D_18_Weights", [(1, 3, 16, 112, 112)])),
    "swin3d_t": Case(  # "auto": the fx graph fails shape propagation, torch.export takes over
        _torchvision("video.swin3d_t", weights=None, num_classes=10),
        lambda batch: ((torch.randn(batch, 3, 2, 32, 32, dtype=torch.float64),), {}), "export", slow=True,
        macs=_tv_macs("video.swin3d_t", "video.Swin3D_T_Weights", [(2, 3, 16, 224, 224)], meta=False)),
    "raft_small": Case(_torchvision("optical_flow.raft_small", weights=None), _flow_inputs, "export", slow=True,
                       dtype=torch.float32),
    "smp_fpn_resnet18": Case(_smp_fpn, _images(32), "export"),
}

# name -> (exception type, or None for a wrong result; why).  Strict: a model that starts to pass fails loudly.
EXPECTED_FAILURES: dict[str, tuple[type[BaseException] | None, str]] = {}


def _marks(name: str) -> list:
    marks = [pytest.mark.slow] if CASES[name].slow else []
    if name in EXPECTED_FAILURES:
        raises, why = EXPECTED_FAILURES[name]
        marks.append(pytest.mark.xfail(raises=raises, reason=why, strict=True))
    return marks


def _params(names) -> list:
    return [pytest.param(name, marks=_marks(name), id=name) for name in names]


# -- helpers ----------------------------------------------------------------------------------------------
def _prepared(name: str, batch: int = 2, seed: int = 0):
    """The eval-mode model in its case's dtype and its example inputs (args, kwargs)."""
    torch.manual_seed(seed)
    model = CASES[name].build().to(CASES[name].dtype).eval()
    args, kwargs = CASES[name].inputs(batch)
    return model, args, kwargs


@functools.cache
def _fresh(name: str):
    """The model as built (no dead channels), its inputs and analysis: shared by the tests that do not modify it."""
    model, args, kwargs = _prepared(name)
    start = time.perf_counter()
    analysis = _analyze(model, args, kwargs, CASES[name].option)
    return model, args, kwargs, analysis, time.perf_counter() - start


def _analyze(model: nn.Module, args: tuple, kwargs: dict, capture: str = "auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nrfx.analyze(model, args, example_kwargs=kwargs or None, capture=capture)


def _call(module: nn.Module, args: tuple, kwargs: dict):
    with torch.no_grad():
        return module(*args, **kwargs)


def kill_layer_outputs(model: nn.Module, analysis, fraction: float = 0.4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Dead channels where no norm signals them: zero the output rows of linears / convs on free spaces.

    Returns the masks (True = alive) keyed by those layers, as ``rejuvenate`` takes them.
    """
    gen = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _, record in analysis.layers("linear", "conv"):
            if record.module is None or record.output is None or record.transposed:
                continue
            spaces = analysis.space_ids(record.output)
            if len(spaces) != 1 or analysis.spaces[spaces[0]].is_frozen:
                continue
            module = model.get_submodule(record.module)
            dead = torch.rand(module.weight.shape[0], generator=gen) < fraction
            module.weight[dead] = 0
            if module.bias is not None:
                module.bias[dead] = 0
            masks[record.module] = ~dead
    return masks


def give_dead_channels(model: nn.Module, analysis) -> dict[str, torch.Tensor] | None:
    """Dead channels by zeroed norm scales where free spaces carry norms, else by zeroed layer outputs."""
    if analysis.coverage().monitored > 0 and kill_per_norm(model, analysis, 0.4) > 0:
        return None
    masks = kill_layer_outputs(model, analysis, 0.4)
    assert masks, "no free space to kill channels in"
    return masks


def assert_result_behaves(new: nn.Module, model: nn.Module, name: str) -> None:
    """Another batch size gives the model's outputs; .train() / .eval() switch every submodule."""
    args3, kwargs3 = CASES[name].inputs(3)
    assert_same_outputs(_call(new, args3, kwargs3), _call(model, args3, kwargs3), "batch 3")
    state = {k: v.clone() for k, v in new.state_dict().items()}
    new.train()
    assert all(m.training for m in new.modules())
    _call(new, *CASES[name].inputs(2))  # updates BatchNorm statistics: put back below
    new.eval()
    new.load_state_dict(state)
    assert not any(m.training for m in new.modules())
    assert_same_outputs(_call(new, args3, kwargs3), _call(model, args3, kwargs3), "after train() / eval()")


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params(CASES))
def test_analysis_capture_and_params(name: str):
    """analyze succeeds with the expected capture; params are exact; coverage is a share (printed with -s)."""
    model, _, _, analysis, elapsed = _fresh(name)
    assert analysis.capture == CASES[name].capture, analysis.capture_notes
    assert analysis.params == sum(p.numel() for p in model.parameters())
    coverage = analysis.coverage()
    assert 0 < coverage.free <= 1 and 0 <= coverage.monitored <= coverage.free
    print(f"{name}: {analysis.capture} {elapsed:.2f}s free {coverage.free:.3f} monitored {coverage.monitored:.3f} "
          f"unknown {sorted(analysis.unknown_ops)}")


@pytest.mark.parametrize("name", _params(n for n, c in CASES.items() if c.macs))
def test_macs_match_torchvision_ops(name: str):
    """MACs at the DEFAULT weights' input size equal torchvision's ``_ops`` (GMACs, 3 decimals)."""
    import torchvision

    build, inputs, weights = CASES[name].macs
    module, enum = weights.rsplit(".", 1)
    meta = getattr(getattr(torchvision.models, module), enum).DEFAULT.meta
    model = build()
    analysis = _analyze(model, inputs(), {}, CASES[name].option)
    assert analysis.params == meta["num_params"]
    assert round(analysis.macs / 1e9, 3) == meta["_ops"], analysis.macs


@pytest.mark.parametrize("name", _params(CASES))
def test_dead_channels_removed_function_kept(name: str):
    """Dead channels (zeroed scales or layer outputs) are removed at the original budget; outputs unchanged."""
    model, args, kwargs = _prepared(name)
    masks = give_dead_channels(model, _fresh(name)[3])  # the spaces of the same architecture
    analysis = _analyze(model, args, kwargs, CASES[name].option)  # the zeroed weights are read at analysis
    expected = _call(model, args, kwargs)
    new = nrfx.rejuvenate(model, masks, None, example_inputs=args, example_kwargs=kwargs or None, analysis=analysis)
    assert_same_outputs(_call(new, args, kwargs), expected, "dead channels")
    assert_result_behaves(new, model, name)


@pytest.mark.parametrize("name", _params(CASES))
@pytest.mark.parametrize(("scheme", "rescale"), [("cr", False), ("ca", True)])
def test_dead_channels_removed_under_the_split_schemes(name: str, scheme: str, rescale: bool):
    """The same under NR-CR and NR-CA with rescaling: the S/R layers run wherever the model's tensors come from
    (RAFT's flow branch starts at a ``torch.arange(..., device=cpu)`` that export spells out: ca failed there)."""
    model, args, kwargs = _prepared(name)
    masks = give_dead_channels(model, _fresh(name)[3])
    analysis = _analyze(model, args, kwargs, CASES[name].option)
    new = nrfx.rejuvenate(model, masks, None, example_inputs=args, example_kwargs=kwargs or None, analysis=analysis,
                          scheme=scheme, rescale=rescale)
    assert_same_outputs(_call(new, args, kwargs), _call(model, args, kwargs), f"{scheme} rescale={rescale}")
    args3, kwargs3 = CASES[name].inputs(3)
    assert_same_outputs(_call(new, args3, kwargs3), _call(model, args3, kwargs3), "batch 3")


@pytest.mark.parametrize("name", _params(CASES))
def test_widening_keeps_function(name: str):
    """No dead channel: growing every free space to 1.1 × c(A) keeps the outputs."""
    model, args, kwargs, analysis, _ = _fresh(name)
    expected = _call(model, args, kwargs)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.1), example_inputs=args,
                          example_kwargs=kwargs or None, analysis=analysis)
    assert sum(p.numel() for p in new.parameters()) > analysis.params
    got = _call(new, args, kwargs)
    assert_same_outputs(got, expected, "widened")
    assert_result_behaves(new, model, name)
    assert_same_structure(got, expected)


def test_state_dict_and_apply_plan_round_trip():
    """BERT (keyword inputs): a trained-then-saved result is rebuilt by apply_plan + load_state_dict."""
    model, args, kwargs = _prepared("hf_bert")
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.1), example_inputs=args, example_kwargs=kwargs)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained": not the state apply_plan starts from
    state = new.state_dict()
    replay = nrfx.apply_plan(model, new.nrfx_plan, example_inputs=args, example_kwargs=kwargs)
    replay.load_state_dict(state)
    replay.eval()
    assert_same_outputs(_call(replay, args, kwargs), _call(new, args, kwargs), "apply_plan round trip")


def _segformer() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=32, num_labels=5))


def _dpt() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.DPTForDepthEstimation(transformers.DPTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5]))


@pytest.mark.parametrize(("build", "size"), [(_segformer, 64), (_dpt, 32)], ids=["segformer", "dpt"])
def test_a_model_called_before_keeps_its_hidden_states_through_the_rewrite(build, size):
    """Hugging Face models whose head reads the backbone's hidden states (SegFormer, DPT) collect them with forward
    hooks installed at their first call.  Called once before nrfx (as after any training step), they fall to
    islands; the rejuvenated model crashed at the head (an island returned no hidden states).  Now every scheme
    and a widening keep the outputs, at another batch size too."""
    torch.manual_seed(0)
    model = build().double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    _call(model, (x,), {})  # the user's own forward: the output-capturing hooks are installed
    analysis = _analyze(model, (x,), {})
    x3 = torch.randn(3, 3, size, size, dtype=torch.float64)
    for scheme, budget in (("nr", nrfx.Budget.fraction(1.1)), ("ca", None)):
        new = nrfx.rejuvenate(model, None, budget, example_inputs=(x,), analysis=analysis, scheme=scheme)
        for inputs in (x, x3):
            assert_same_outputs(_call(new, (inputs,), {}), _call(model, (inputs,), {}), scheme)
