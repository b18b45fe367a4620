"""The paper-protocol benchmark: runs end to end (--quick, synthetic data), counts cost honestly, pairs seeds."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nrfx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
paper = importlib.import_module("benchmarks.quality_paper")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
EXAMPLE = torch.zeros(2, 1, 28, 28)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """``python -m benchmarks.run --only paper --quick`` into a fresh folder (synthetic data, one seed)."""
    out = tmp_path_factory.mktemp("paper")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "paper", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_quick_run_writes_every_arm(quick_run):
    data = json.loads((quick_run / "quality_paper.json").read_text())
    assert data["setup"]["synthetic"] and data["device"] == "cpu" and data["threads"] == 1
    table, runs = data["table"], {r["arm"]: r for r in data["runs"]}
    assert set(table) == set(paper.ARMS) and set(runs) == set(paper.ARMS)
    epochs = data["setup"]["epochs"]
    k = runs["nr-cr"]["k"]
    assert k is not None and k >= 1
    assert data["lambda"]["chosen"] in data["setup"]["lam_grid"] and data["lambda"]["tried"]
    for arm in paper.NR_ARMS:  # one rejuvenation at the shared point, then the full schedule
        assert runs[arm]["rounds"] == 1 and runs[arm]["k"] == k and runs[arm]["epochs"] == k + epochs
        assert runs[arm]["r_before"] < data["setup"]["target"] and len(runs[arm]["losses"]) == epochs
    assert runs["baseline"]["epochs"] == epochs and runs["baseline-matched"]["epochs"] == k + epochs
    for run in runs.values():
        assert all(0 <= run[key] <= 100 for key in ("test_error", "val_error", "train_error"))
        assert run["params_nonzero"] <= run["params_stored"] and run["macs_used"] > 0
    assert runs["nr-cr"]["params_used"] < runs["nr-cr"]["params_stored"]  # block-diagonal: cross blocks not counted
    assert runs["nr-ca"]["params_used"] == runs["nr-ca"]["params_stored"]
    assert runs["ensemble"]["params_stored"] <= data["c_params"]
    assert table["nr-cr"]["test_minus_baseline"]["n"] == 1 and "test_minus_baseline" not in table["baseline"]


def test_quick_run_markdown_summary_and_plot(quick_run):
    md = (quick_run / "quality_paper.md").read_text()
    assert all(f"| {label} |" in md for label in paper.ARMS.values())
    info = json.loads((quick_run / "run.json").read_text())
    assert info["steps"]["benchmarks.quality_paper"]["returncode"] == 0
    assert "Quality under the paper's protocol" in (quick_run / "summary.md").read_text()
    png = quick_run / "quality_paper.png"
    assert png.exists() == HAVE_MATPLOTLIB
    if HAVE_MATPLOTLIB:
        assert png.read_bytes()[:4] == b"\x89PNG"


# -- the pieces (fast) ---------------------------------------------------------------------------------------
def _rejuvenated(scheme: str) -> nn.Module:
    """The example VGG with half of every norm's channels dead, rejuvenated to c(A) with ``scheme``."""
    torch.manual_seed(0)
    model = paper.quality.example().vgg_bn((8, "M", 16, "M"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[: m.num_features // 2] = 0.0
    return nrfx.rejuvenate(model, None, None, example_inputs=EXAMPLE, scheme=scheme, align=1)


def test_used_cost_counts_the_diagonal_blocks_of_cr_layers():
    cr, ca = _rejuvenated("cr"), _rejuvenated("ca")
    split = [m for m in cr.modules() if getattr(m, "scheme", None) == "cr"]
    assert split  # the body convs were split into S/R blocks
    expected_params = sum(p.numel() for p in cr.parameters())  # cr stores its diagonal blocks only
    dense_params = expected_params
    expected_macs = 0
    positions = iter([28 * 28, 14 * 14])  # conv outputs: 28² then 14² (padding 1, pooling after each)
    for m in (m for m in cr.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        out, inp = m.weight.shape[:2]
        used = m.weight.numel()
        if getattr(m, "scheme", None) == "cr":
            used = m.weight[0, 0].numel() * (m.s_out * m.s_in + (out - m.s_out) * (inp - m.s_in))
            assert used == m.weight_ss.numel() + m.weight_rr.numel()
            dense_params += m.weight.numel() - used
        expected_macs += used * (next(positions) if isinstance(m, nn.Conv2d) else 1)
    cost = paper.used_cost([cr], EXAMPLE)
    assert cost["params_used"] == expected_params < cost["params_stored"] == dense_params
    assert cost["macs_used"] == expected_macs
    ca_cost = paper.used_cost([ca], EXAMPLE)
    assert ca_cost["params_used"] == ca_cost["params_stored"] == sum(p.numel() for p in ca.parameters())
    assert ca_cost["macs_used"] == nrfx.analyze(ca, EXAMPLE).macs  # ca computes every block: dense MACs


def test_two_head_loss_is_the_sum_of_s_and_r_cross_entropies():
    torch.manual_seed(0)
    setup = paper.PaperSetup().replace(**paper.QUICK)
    original = paper.build(setup.config, 0, setup, torch.device("cpu"))
    nr = paper.driver(copy.deepcopy(original), "cr", 0.0, 0, setup, EXAMPLE)
    with torch.no_grad():
        for m in nr.module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight[: m.num_features // 2] = 0.0
    assert nr.check()["event"] == "rejuvenate"
    head, r_cols = paper._head(nr.module)
    assert r_cols.any() and (~r_cols).any()
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    nr.module.eval()
    captured = {}
    hook = head.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("x", inputs[0]))
    logits = nr.model(x)
    hook.remove()
    feats = captured["x"]
    s = F.linear(feats[:, ~r_cols], head.weight[:, ~r_cols], head.bias)
    r = F.linear(feats[:, r_cols], head.weight[:, r_cols])
    torch.testing.assert_close(s + r, logits)  # prediction = the sum of the two heads
    loss = paper.two_head_loss(nr)(x, y)
    torch.testing.assert_close(loss, F.cross_entropy(s, y) + F.cross_entropy(r, y))


def test_augment_crops_and_flips_within_the_padding():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    same = paper.augment(x, gen, pad=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(2))
    moved = paper.augment(x, gen, pad=2)
    assert moved.shape == x.shape


def test_aggregate_pairs_each_arm_with_both_baselines_by_seed():
    records = []
    for seed, (base, matched, cr) in enumerate([(10.0, 9.0, 9.5), (12.0, 10.0, 10.5), (11.0, 9.5, 11.5)]):
        common = {"seed": seed, "val_error": 0.0, "train_error": 0.0, "params_stored": 10, "params_used": 10,
                  "params_nonzero": 10, "macs_used": 5, "seconds": 1.0, "epochs": 4}
        records += [{**common, "arm": "baseline", "test_error": base},
                    {**common, "arm": "baseline-matched", "test_error": matched},
                    {**common, "arm": "nr-cr", "test_error": cr, "k": 1, "rounds": 1}]
    table = paper.aggregate(records)
    diff = table["nr-cr"]["test_minus_baseline"]
    assert diff["mean"] == pytest.approx((-0.5 - 1.5 + 0.5) / 3) and diff["n"] == 3
    assert diff["min"] == pytest.approx(-1.5) and diff["max"] == pytest.approx(0.5)
    assert table["nr-cr"]["test_minus_baseline-matched"]["mean"] == pytest.approx((0.5 + 0.5 + 2.0) / 3)
    assert table["baseline-matched"]["test_minus_baseline"]["mean"] == pytest.approx(-1.5)


def test_missing_dataset_is_skipped_with_the_install_hint(tmp_path):
    lines = []
    setup = paper.PaperSetup().replace(data=str(tmp_path))
    assert paper.run(setup, [0], tmp_path / "out", log=lines.append) is None
    assert "apt-get install dataset-fashion-mnist" in lines[0] and not (tmp_path / "out").exists()
