"""The timm sweep: one model of every timm family analyses with exact params and sane MACs.

A *family* is the ``timm.models`` module a model's entrypoint lives in (``timm.list_modules()``).
``MODELS`` names one model per family: the one with the fewest parameters (``test_*`` models
where the family has them), so the sweep stays fast.  Each is built with ``pretrained=False``
in eval mode and analysed at its pretrained config's input size, batch 1 (the ViTs in ``AT_224``, whose configs
ask 546² – 768², are built and analysed at 224²: the same code, a tenth of the tokens to push through):

* ``analyze`` succeeds (unknown ops freeze and warn, they never crash);
* ``params`` equals ``sum(p.numel())`` exactly;
* ``macs`` (multiply-accumulates) is at least half of ``FlopCounterMode``'s MAC count
  (it counts 2 FLOPs per MAC), measured on meta tensors so no activation is computed.

``EXPECTED_FAILURES`` is applied as strict xfail: a model that starts to pass fails loudly.
``test_every_family_is_swept`` fails when a timm upgrade adds a family nobody picked.
Run with ``pytest -m slow -n 2 tests/test_timm_sweep.py``: 4 minutes on 2 shared cores (sequencer2d_s,
whose LSTM runs slowly on meta tensors, is the longest at ~1 minute).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nrfx
from nrfx import UnknownOpWarning

timm = pytest.importorskip("timm")

MODELS: dict[str, str] = {
    "beit": "beit_base_patch16_224",
    "byoanet": "halonet_h1",
    "byobnet": "test_byobnet",
    "cait": "cait_xxs24_224",
    "coat": "coat_tiny",
    "convit": "convit_tiny",
    "convmixer": "convmixer_768_32",
    "convnext": "test_convnext",
    "cpubone": "cpubone_nano",
    "crossvit": "crossvit_tiny_240",
    "csatv2": "csatv2",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "davit": "davit_tiny",
    "deepseek_vit": "deepseek_vit_412m",
    "deit": "deit_tiny_patch16_224",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "efficientnet": "test_efficientnet",
    "efficientvim": "efficientvim_m1",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "eva": "vit_tiny_patch16_dinov3_qkvb",
    "fasternet": "fasternet_t0",
    "fastvit": "fastvit_t8",
    "focalnet": "focalnet_tiny_srf",
    "gcvit": "gcvit_xxtiny",
    "gemma4_vit": "gemma4_vit_167m",
    "ghostnet": "ghostnet_050",
    "hardcorenas": "hardcorenas_b",
    "hgnet": "hgnetv2_b0",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "hrnet": "hrnet_w18_small",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "lcnetv2": "lcnetv2_small",
    "levit": "levit_128s",
    "lowformer": "lowformer_b0",
    "mambaout": "test_mambaout",
    "maxxvit": "test_coatnet",
    "metaformer": "poolformerv2_s12",
    "mlp_mixer": "gmlp_ti16_224",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv5": "mobilenetv5_base",
    "mobilevit": "mobilevit_xxs",
    "mvitv2": "mvitv2_tiny",
    "naflexvit": "naflexvit_base_patch16_parfac_gap",
    "nasnet": "nasnetalarge",
    "nest": "nest_tiny",
    "nextvit": "nextvit_small",
    "nfnet": "test_nfnet",
    "pit": "pit_ti_224",
    "pnasnet": "pnasnet5large",
    "pvt_v2": "pvt_v2_b0",
    "qwen3_vit": "qwen3_vit_88m",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "res2net": "res2next50",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sequencer": "sequencer2d_s",
    "shvit": "shvit_s1",
    "sknet": "skresnet18",
    "starnet": "starnet_s050",
    "swiftformer": "swiftformer_xs",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window16_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "tiny_vit": "tiny_vit_5m_224",
    "tnt": "tnt_s_legacy_patch16_224",
    "tresnet": "tresnet_m",
    "twins": "twins_svt_small",
    "vgg": "vgg11",
    "visformer": "visformer_tiny",
    "vision_transformer": "test_vit",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    "vision_transformer_relpos": "test_vit_relpos",
    "vision_transformer_sam": "samvit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "volo": "volo_d1_224",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "xcit": "xcit_nano_12_p8_224",
}

# models built with img_size=224 (their pretrained configs ask 546² – 768²: a minute each on 2 shared cores)
AT_224 = frozenset({"deepseek_vit_412m", "gemma4_vit_167m", "qwen3_vit_88m"})

# model -> why it does not pass (strict xfail); enormous models would be listed here as skipped
EXPECTED_FAILURES: dict[str, str] = {}


def _cases() -> list:
    """(family, model) pairs, expected failures marked strict xfail."""
    cases = []
    for family, name in sorted(MODELS.items()):
        marks = [pytest.mark.xfail(reason=EXPECTED_FAILURES[name], strict=True)] if name in EXPECTED_FAILURES else []
        cases.append(pytest.param(family, name, marks=marks, id=name))
    return cases


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with random weights in eval mode, and a batch-1 input of its default size (224² in ``AT_224``)."""
    if name in AT_224:
        return timm.create_model(name, pretrained=False, img_size=224).eval(), torch.randn(
            1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return model, torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def _reference_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FlopCounterMode's count of one forward on meta tensors, in MACs (2 FLOPs per MAC)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    state = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        torch.func.functional_call(model, state, (x.to("meta"),), strict=False, tie_weights=False)
    return counter.get_total_flops() // 2


def test_every_family_is_swept():
    """Every family of the installed timm has a model in MODELS, and each model is of its family."""
    assert set(MODELS) == set(timm.list_modules())
    for family, name in MODELS.items():
        assert name in timm.list_models(module=family), (family, name)
    assert set(EXPECTED_FAILURES) | AT_224 <= set(MODELS.values())


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), _cases())
def test_timm_family(family: str, name: str):
    """analyze succeeds, counts every parameter exactly and at least half the measured MACs."""
    model, x = _build(name)
    expected_macs = _reference_macs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        analysis = nrfx.analyze(model, x)
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert 2 * analysis.macs >= expected_macs, (analysis.macs, expected_macs)
    assert 0 <= analysis.live_params <= analysis.params
