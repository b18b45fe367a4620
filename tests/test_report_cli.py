"""The per-layer report, the model resolver and the ``nrfx`` command line."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import nrfx
from nrfx.cli import COMMANDS, main, parse_input_size
from nrfx.models import default_input_size, meta_parameters, no_weights_kwargs, resolve_model
from nrfx.report import OTHER, Report, _short_reason


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def resnet_analysis():
    return nrfx.analyze(_resnet18(), torch.randn(1, 3, 64, 64))


def _row(report: Report, name: str):
    return next(r for r in report.rows if r.name == name)


def _assert_adds_up(report: Report, analysis, util) -> None:
    rows = (*report.rows, report.other)
    assert sum(r.params for r in rows) == analysis.params == report.totals.params
    assert sum(r.live_params for r in rows) == util.live_params == report.totals.live_params
    assert sum(r.macs for r in rows) == analysis.macs == report.totals.macs
    assert sum(r.live_macs for r in rows) == util.live_macs == report.totals.live_macs


# -- report ------------------------------------------------------------------------------------
def test_resnet_rows_add_up_and_match_layer_shapes(resnet_analysis):
    model = _resnet18()
    report = resnet_analysis.report()
    _assert_adds_up(report, resnet_analysis, resnet_analysis.utilization())
    assert report.other.params == 0 and report.other.macs == 0
    conv2 = _row(report, "layer1.0.conv2")
    assert (conv2.op, conv2.in_total, conv2.out_total) == ("Conv2d", 64, 64)
    assert conv2.params == model.layer1[0].conv2.weight.numel() == 64 * 64 * 9
    assert conv2.macs == 64 * 64 * 9 * 16 * 16  # 64x64 input -> 16x16 in layer1
    fc = _row(report, "fc")
    assert (fc.in_total, fc.out_total, fc.params, fc.macs) == (512, 1000, 513_000, 512_000)
    assert fc.frozen.startswith("out: reaches the model output")  # its input side is free
    assert _row(report, "bn1").macs == 0
    assert {r.name for r in report.rows} >= {n for n, m in model.named_modules()
                                              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}


def test_masks_show_live_channels_per_layer(resnet_analysis):
    dead = torch.ones(64, dtype=torch.bool)
    dead[:10] = False
    masks = {"layer1.0.bn1": dead}
    report = resnet_analysis.report(masks)
    util = resnet_analysis.utilization(masks)
    conv1, conv2 = _row(report, "layer1.0.conv1"), _row(report, "layer1.0.conv2")
    assert (conv1.out_live, conv1.out_total) == (54, 64)
    assert (conv2.in_live, conv2.in_total, conv2.out_live) == (54, 64, 64)
    assert conv1.live_params == 54 * 64 * 9
    assert conv2.live_params == 54 * 64 * 9
    assert _row(report, "layer1.0.bn1").live_params == 2 * 54
    assert conv2.live_macs == 54 * 64 * 9 * 16 * 16
    _assert_adds_up(report, resnet_analysis, util)
    assert report.totals.r_params == pytest.approx(util.r_params) and report.totals.r_params < 1


def test_batch_size_does_not_change_per_example_rows():
    one = nrfx.analyze(_resnet18(), torch.randn(1, 3, 64, 64)).report()
    analysis = nrfx.analyze(_resnet18(), torch.randn(3, 3, 64, 64))
    three = analysis.report()
    assert [(r.name, r.macs) for r in three.rows] == [(r.name, r.macs) for r in one.rows]
    _assert_adds_up(three, analysis, analysis.utilization())


class _Odd(nn.Module):
    """Functional conv on bare parameters, a PReLU slope, an attention block and an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.act = nn.PReLU(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.unused = nn.Linear(5, 5)

    def forward(self, x):
        y = self.act(F.conv2d(x, self.weight, padding=1))
        tokens = y.flatten(2).transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0]


def test_other_row_holds_unclaimed_parameters_and_functional_layers_get_rows():
    model = _Odd()
    analysis = nrfx.analyze(model, torch.randn(2, 3, 4, 4))
    report = analysis.report()
    _assert_adds_up(report, analysis, analysis.utilization())
    assert analysis.params == sum(p.numel() for p in model.parameters())
    assert report.other.name == OTHER
    assert report.other.params == model.act.weight.numel() + sum(p.numel() for p in model.unused.parameters())
    conv = _row(report, "weight")
    assert (conv.op, conv.in_total, conv.out_total, conv.params) == ("conv2d", 3, 8, 8 * 3 * 9)
    assert conv.macs == 8 * 3 * 9 * 16
    attn = _row(report, "attn")
    assert attn.op == "MultiheadAttention"
    assert attn.params == sum(p.numel() for p in model.attn.parameters())
    # projections (4 · L · E²) and attention (2 · L² · E), per example: L = 16 tokens, E = 8
    assert attn.macs == 4 * 16 * 8 * 8 + 2 * 16 * 16 * 8
    assert attn.frozen is None  # MHA freezes spaces but has no record of its own: its frozen inputs show upstream


def test_to_dict_is_json_and_table_lists_every_row(resnet_analysis, monkeypatch):
    report = resnet_analysis.report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["params"] == resnet_analysis.params
    assert data["totals"]["macs"] == resnet_analysis.macs
    assert data["totals"]["r_params"] == 1.0
    assert [r["name"] for r in data["rows"]] == [r.name for r in report.rows]
    assert data["frozen_spaces"] and data["frozen_spaces"][0]["reason"].startswith("reaches the model output")
    assert [r["frozen"] for r in data["rows"]] == [r.frozen for r in report.rows]
    for text in (report.table(), str(report)):
        lines = text.splitlines()
        for row in (*report.rows, report.other):
            assert any(line.split()[:1] == [row.name] for line in lines), row.name
    assert "c(A)  params 11,689,512" in str(report)
    monkeypatch.setitem(sys.modules, "rich", None)  # plain-text fallback
    plain = report.table()
    assert plain.splitlines()[0].split()[:2] == ["layer", "op"]
    assert "layer4.1.conv2" in plain and "512/512" in plain


# -- the frozen column: which side keeps its width ----------------------------------------------------
class _LayerNormMLP(nn.Module):
    """x -> fc1 -> bn -> LayerNorm -> fc2 -> relu -> fc3 -> relu -> fc4: the LayerNorm freezes fc1/bn's space."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.ln = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.LayerNorm(16)
        self.fc2, self.fc3, self.fc4 = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 5)

    def forward(self, x):
        y = self.ln(self.bn(self.fc1(x)))
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(y)))))


def test_frozen_column_names_the_frozen_side():
    analysis = nrfx.analyze(_LayerNormMLP().eval(), torch.randn(2, 6))
    report = analysis.report()
    rows = {r.name: r for r in report.rows}
    assert rows["fc1"].frozen.startswith("out: LayerNorm")  # the model input is not frozen
    assert rows["bn"].frozen.startswith("in+out: LayerNorm")  # one space on both sides
    assert rows["fc2"].frozen.startswith("in: LayerNorm") and "out:" not in rows["fc2"].frozen
    assert rows["fc3"].frozen is None  # both sides free: no reason
    assert rows["fc4"].frozen.startswith("out: reaches the model output") and "in:" not in rows["fc4"].frozen
    data = json.loads(json.dumps(report.to_dict()))
    assert {r["name"]: r["frozen"] for r in data["rows"]} == {n: r.frozen for n, r in rows.items()}
    cells = {line.split()[0]: line for line in report.table(200).splitlines()[2:]}
    assert cells["fc2"].rstrip().endswith("in: LayerNorm statistics couple the channels")
    assert cells["fc3"].rstrip().endswith(" 768") and "[node" not in report.table(200)  # empty frozen cell


def test_short_reason_keeps_both_sides_without_locations():
    where = " [node 'x' (call_function getitem) at File \"m.py\", line 3, in forward: y = x[:, 0]]"
    assert _short_reason(f"in: A{where}; out: B{where}") == "in: A; out: B"
    assert _short_reason(f"in: A{where}; out: A [node 'y']") == "in+out: A"  # same reason, two places
    assert _short_reason(f"out: B{where}") == "out: B"
    long = _short_reason("in: " + "a" * 80 + "; out: " + "b" * 80)
    assert len(long) <= 60 and "; out: bbb" in long
    assert _short_reason(None) == ""


# -- models ---------------------------------------------------------------------------------------
def test_resolve_model_spellings():
    assert type(resolve_model("resnet18")).__name__ == "ResNet"
    assert type(resolve_model("torchvision.models:resnet18")).__name__ == "ResNet"
    timm = pytest.importorskip("timm")
    assert isinstance(resolve_model("resnet10t"), timm.models.resnet.ResNet)


def test_resolve_model_errors_say_how_to_spell_a_model():
    with pytest.raises(nrfx.NrfxError, match=r"package\.module:function") as info:
        resolve_model("resnet5")
    assert "resnet50" in str(info.value)
    with pytest.raises(nrfx.NrfxError, match="cannot import"):
        resolve_model("no_such_package.nets:build")
    with pytest.raises(nrfx.NrfxError, match=r"not an nn\.Module"):
        resolve_model("math:pi")


def test_unknown_model_suggests_close_names():
    for typo, suggestion in [("resnt50", "'resnet50'"), ("mobilenetv2", "'mobilenet_v2'"),
                             ("torchvision.models.resnet50", "'torchvision.models:resnet50'")]:
        with pytest.raises(nrfx.NrfxError, match="unknown model") as info:
            resolve_model(typo)
        assert f"Did you mean {suggestion}" in str(info.value) or f"mean the factory {suggestion}" in str(info.value)
    timm = pytest.importorskip("timm")
    assert timm.is_model("convnext_tiny")
    with pytest.raises(nrfx.NrfxError, match="Did you mean 'convnext_tiny'"):  # a timm-only name
        resolve_model("convnext-tiny")


def test_factory_is_found_in_the_current_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "nrfx_cwd_factory.py").write_text(textwrap.dedent(_FACTORY))
    monkeypatch.chdir(tmp_path)
    # as under the installed `nrfx` script: neither the current directory nor '' is on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "nrfx_cwd_factory", raising=False)
    path_before = list(sys.path)
    assert main(["report", "nrfx_cwd_factory:build", "--input-size", "3", "8", "8"]) == 0
    assert "c(A)  params 276" in capsys.readouterr().out
    assert sys.path == path_before  # the current directory was importable only while resolving


def test_no_weights_kwargs_reads_the_builder_signature():
    def builder(*, weights="DEFAULT", weights_backbone="IMAGENET1K_V1", progress=True, pretrained=True,
                pretrained_cfg=None, num_classes=10, **kwargs):
        return weights, weights_backbone, pretrained

    assert no_weights_kwargs(builder) == {"weights": None, "weights_backbone": None, "pretrained": False}
    assert no_weights_kwargs(torchvision.models.get_model_builder("fcn_resnet50")) == {
        "weights": None, "weights_backbone": None}


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME and every way to fetch weights raising loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:2]}")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


_NON_CLASSIFICATION = ("detection", "segmentation", "video", "optical_flow", "quantization")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # googlenet/inception init notices
@pytest.mark.parametrize("family", _NON_CLASSIFICATION)
def test_every_torchvision_builder_resolves_offline(family, offline):
    """Named models never download: weights_backbone (detection, segmentation) is None as well as weights."""
    names = torchvision.models.list_models(module=getattr(torchvision.models, family))
    assert names
    failures = {}
    for name in names:
        try:
            assert isinstance(_build_fast(name), nn.Module)
        except AssertionError as error:
            failures[name] = str(error)
    assert not failures


def _build_fast(name: str) -> nn.Module:
    """resolve_model with parameters on the meta device (downloads happen before they matter), else for real."""
    try:
        with meta_parameters():
            return resolve_model(name)
    except RuntimeError:  # ssdlite's init mixes devices on meta
        return resolve_model(name)


def test_cli_reports_a_segmentation_model_offline(offline, capsys):
    assert main(["report", "fcn_resnet50", "--input-size", "3", "32", "32"]) == 0
    assert "model FCN" in capsys.readouterr().out


def test_timm_models_resolve_offline(offline):
    pytest.importorskip("timm")
    assert type(resolve_model("resnet10t")).__name__ == "ResNet"


def test_default_input_size():
    assert default_input_size("resnet50") == (3, 224, 224)
    assert default_input_size("inception_v3") == (3, 299, 299)
    assert default_input_size("r3d_18") == (3, 16, 112, 112)
    assert default_input_size("mod:factory") == (3, 224, 224)
    pytest.importorskip("timm")
    assert default_input_size("vit_base_patch16_384") == (3, 384, 384)


def test_parse_input_size():
    assert parse_input_size(["3", "32", "32"], 2) == (2, 3, 32, 32)
    assert parse_input_size(["1,3,224,224"], 5) == (1, 3, 224, 224)
    with pytest.raises(nrfx.NrfxError, match="C H W"):
        parse_input_size(["3", "x"], 1)


# -- command line ---------------------------------------------------------------------------------
_FACTORY = """
import torch
from torch import nn

def build():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.001, 0.0]))
    return net
"""


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    (tmp_path / "nrfx_cli_factory.py").write_text(textwrap.dedent(_FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "nrfx_cli_factory:build"


def test_cli_report_prints_table_and_writes_json(tmp_path, capsys, factory):
    out = tmp_path / "report.json"
    assert main(["report", factory, "--input-size", "3", "8", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "c(A)  params 276" in text and "r(θ)" in text
    data = json.loads(out.read_text())
    assert data["input_shapes"] == [[1, 3, 8, 8]]
    assert data["totals"]["params"] == 3 * 8 * 9 + 8 + 16 + 8 * 4 + 4
    # threshold 0.01: channels with γ 0.001 and 0 are dead -> 6 live of 8
    assert [r["out_live"] for r in data["rows"] if r["name"] == "0"] == [6]
    assert main(["report", factory, "--input-size", "1,3,8,8", "--threshold", "0.5", "--json", str(out)]) == 0
    assert [r["out_live"] for r in json.loads(out.read_text())["rows"] if r["name"] == "0"] == [4]


def test_cli_json_dash_writes_json_to_stdout_and_text_to_stderr(capsys, factory):
    assert main(["report", factory, "--input-size", "3", "8", "8", "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is one JSON document, nothing else
    assert data["totals"]["params"] == 276
    assert captured.err.splitlines()[0].split()[:2] == ["layer", "op"] and "c(A)  params 276" in captured.err
    assert not (Path.cwd() / "-").exists()


def test_cli_rejuvenate_json(tmp_path, capsys, factory):
    out = tmp_path / "new.pt"
    assert main(["rejuvenate", factory, "--input-size", "3", "8", "8", "--out", str(out), "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert set(data) == {"before", "after", "plan"}
    assert data["before"]["totals"]["params"] == 276 and data["after"]["totals"]["live_params"] > 0
    assert "before:" in captured.err and f"wrote {out}" in captured.err and out.exists()
    path = tmp_path / "rejuvenated.json"
    assert main(["rejuvenate", factory, "--input-size", "3", "8", "8", "--out", str(out), "--json", str(path)]) == 0
    assert json.loads(path.read_text())["plan"] == data["plan"]


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in COMMANDS)])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: nrfx") and "``" not in text


def test_cli_masks_file(tmp_path, capsys, factory):
    path = tmp_path / "masks.pt"
    torch.save({"1": torch.tensor([True, False] * 4)}, path)
    out = tmp_path / "r.json"
    assert main(["report", factory, "--input-size", "3", "8", "8", "--masks", str(path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    row = next(r for r in data["rows"] if r["name"] == "3")
    assert (row["in_live"], row["in_total"], row["live_params"]) == (4, 8, 4 * 4 + 4)


@pytest.mark.parametrize("argv, message", [
    (["report", "resnet5"], "unknown model 'resnet5'"),
    (["report", "resnet18", "--input-size", "3", "64"], "node 'conv1'"),
    (["report", "resnet18", "--masks", "/nonexistent/masks.pt"], "does not exist"),
    (["report", "resnet18", "--input-size", "3", "a", "b"], "not a list of integers"),
])
def test_cli_errors_are_one_clean_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nrfx: error: ") and message in err
    assert "Traceback" not in err


def test_cli_bad_mask_file_exit_2(tmp_path, capsys, factory):
    path = tmp_path / "masks.pt"
    torch.save({"nope": torch.ones(8, dtype=torch.bool)}, path)
    assert main(["report", factory, "--input-size", "3", "8", "8", "--masks", str(path)]) == 2
    assert "mask for unknown module 'nope'" in capsys.readouterr().err


def test_cli_runs_as_a_program(factory, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    result = subprocess.run([sys.executable, "-m", "nrfx.cli", "report", factory, "--input-size", "3", "8", "8"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:2] == ["layer", "op"]
    bad = subprocess.run([sys.executable, "-m", "nrfx.cli", "report", "resnet5"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("nrfx: error: unknown model")


def test_report_does_not_touch_the_model(resnet_analysis):
    model = _resnet18()
    before = copy.deepcopy(model.state_dict())
    nrfx.analyze(model, torch.randn(1, 3, 64, 64)).report()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_NO_NORM = """
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
"""


def test_cli_add_gates_monitors_a_model_without_norms(tmp_path, capsys, monkeypatch):
    (tmp_path / "nrfx_cli_no_norm.py").write_text(textwrap.dedent(_NO_NORM))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "report.json"
    argv = ["report", "nrfx_cli_no_norm:build", "--input-size", "3", "8", "8", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["coverage"]["monitored_channels"] == 0
    assert main([*argv, "--add-gates"]) == 0
    assert "add_gates: 1 gates added" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["coverage"]["monitored_channels"] == 8 and "0_gate" in [r["name"] for r in data["rows"]]
    new = tmp_path / "new.pt"
    assert main(["rejuvenate", "nrfx_cli_no_norm:build", "--input-size", "3", "8", "8", "--out", str(new),
                 "--add-gates"]) == 0
    assert "0_gate.weight" in torch.load(new, weights_only=True)["state_dict"]
