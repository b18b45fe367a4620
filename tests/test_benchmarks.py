"""The benchmark entry point runs end to end (--quick) and writes sane numbers; the baselines are what they claim."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nrfx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` without `python -m`: the repository root holds the benchmarks package
    sys.path.insert(0, str(ROOT))
quality = importlib.import_module("benchmarks.quality")
HAVE_DATA = not quality.missing_data(quality.Setup())
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """``python -m benchmarks.run --quick`` into a fresh folder (once for this module)."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_run_records_command_machine_date(quick_run):
    info = _json(quick_run / "run.json")
    assert info["command"].startswith("python -m benchmarks.run --quick")
    assert info["machine"]["cores"] >= 1 and info["date"][:2] == "20"
    assert {"benchmarks.bench_analysis", "benchmarks.bench_rejuvenate", "benchmarks.speed",
            "benchmarks.quality"} <= set(info["steps"])
    assert all(step["returncode"] == 0 for step in info["steps"].values())
    summary = (quick_run / "summary.md").read_text()
    assert info["command"] in summary and "## Speed: analysis" in summary


@pytest.mark.slow
def test_speed_numbers_are_sane(quick_run):
    analysis = _json(quick_run / "analysis.json")
    (row,) = analysis["results"]
    assert row["model"] == "resnet50" and row["params"] == 25_557_032 and row["nrfx_macs"] == 4_089_184_256
    assert 0 < row["nrfx"]["seconds"] < 30
    rejuvenate = _json(quick_run / "rejuvenate.json")
    assert 0 < rejuvenate["rejuvenate_s"] < 30
    for entry in rejuvenate["patterns"].values():
        assert all(0.3 < v < 5 for v in entry["overhead_vs_dense_equal_macs"].values())
        assert abs(entry["macs"]["rejuvenated"] - entry["macs"]["original"]) < 0.01 * entry["macs"]["original"]
    (driver,) = _json(quick_run / "driver_overhead.json")["results"]
    assert driver["rounds"] == 0 and driver["lam"] > 0 and driver["checks_in_loop"] >= 1
    assert 0 < driver["check_ms"] < driver["plain_step_total_ms"]
    assert -0.05 < driver["overhead_fraction"] < 0.05  # the 1 % target is the benchmark's own verdict


@pytest.mark.slow
def test_quality_numbers_are_sane(quick_run):
    if not HAVE_DATA:
        assert not (quick_run / "quality.json").exists()
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    data = _json(quick_run / "quality.json")
    table = data["table"]
    assert set(table) == set(quality.QUICK_METHODS)
    for entry in table.values():
        assert 0 <= entry["test_error"]["mean"] <= 100 and 0 <= entry["val_error"]["mean"] <= 100
    assert table["baseline"]["test_error"]["mean"] < 40  # it learned something in the quick budget
    assert table["nr"]["rounds"]["mean"] == 1 and table["nr"]["params"]["mean"] <= data["c_params"]
    assert table["slim-half"]["params"]["mean"] <= data["c_params"] / 2
    assert "| baseline |" in (quick_run / "quality.md").read_text()


@pytest.mark.slow
def test_plots_written_when_matplotlib_is_installed(quick_run):
    pngs = {p.name for p in quick_run.glob("*.png")}
    if not HAVE_MATPLOTLIB:
        assert not pngs
        return
    assert {"speed_analysis.png", "speed_latency.png", "speed_driver_overhead.png"} <= pngs
    if HAVE_DATA:
        assert {"quality_errors.png", "quality_history.png"} <= pngs
    assert all((quick_run / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


# -- the pieces the quality table depends on (fast) ---------------------------------------------------------
def test_narrower_baseline_has_at_most_half_the_params():
    config = quality.Setup().config
    half = quality.narrower(config, 0.5)
    full = quality.params_of(config)
    assert 0.45 * full < quality.params_of(half) <= 0.5 * full
    assert [v for v in half if v == "M"] == [v for v in config if v == "M"]


def test_global_threshold_prunes_the_weakest_channels_to_the_budget():
    torch.manual_seed(0)
    model = quality.example().vgg_bn(quality.Setup().config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight))
    limit = sum(p.numel() for p in model.parameters()) // 2
    masks, threshold = quality.global_threshold_masks(model, limit)
    analysis = nrfx.analyze(model, quality.EXAMPLE_INPUT)
    assert analysis.utilization(masks).live_params <= limit
    for name, mask in masks.items():  # one global threshold: a channel lives iff |γ| > t (or is its layer's max)
        gamma = model.get_submodule(name).weight.abs()
        assert torch.equal(mask, (gamma > threshold) | (gamma == gamma.max()))
    pruned = nrfx.rejuvenate(model, masks, nrfx.Budget(params=analysis.utilization(masks).live_params),
                             example_inputs=quality.EXAMPLE_INPUT)
    assert sum(p.numel() for p in pruned.parameters()) <= limit
    assert sum(pruned.nrfx_plan.grow) == 0  # pruning only: no rejuvenated channels


def test_matched_gamma0_starts_new_channels_at_the_survivors_scale():
    torch.manual_seed(0)
    model = quality.example().vgg_bn((8, "M", 8, "M"))
    with torch.no_grad():
        bn = model[1]
        bn.weight.copy_(torch.tensor([0.2, 0.4, 0.0, 0.0, 0.3, 0.0, 0.5, 0.0]))
    new = nrfx.rejuvenate(model, None, None, example_inputs=quality.EXAMPLE_INPUT)
    quality.set_new_gamma(new, "match")
    gamma, source = new.get_submodule("1").weight, new.nrfx_param_map["1.weight"].dims[0].source
    assert (source < 0).any()
    assert torch.allclose(gamma[source < 0], torch.tensor([0.2, 0.3, 0.4, 0.5]).median())
    assert torch.equal(gamma[source >= 0], torch.tensor([0.2, 0.4, 0.3, 0.5]))
