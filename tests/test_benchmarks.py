"""The benchmark entry point runs end to end (--quick) and writes sane numbers; the baselines are what they claim."""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import os
import struct
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
    new = nrfx.rejuvenate(model, None, None, example_inputs=quality.EXAMPLE_INPUT, align=1)  # 4 of 8 regrown
    quality.set_new_gamma(new, "match")
    gamma, source = new.get_submodule("1").weight, new.nrfx_param_map["1.weight"].dims[0].source
    assert (source < 0).any()
    assert torch.allclose(gamma[source < 0], torch.tensor([0.2, 0.3, 0.4, 0.5]).median())
    assert torch.equal(gamma[source >= 0], torch.tensor([0.2, 0.4, 0.3, 0.5]))


# -- the GPU benchmark: its CPU smoke form, and the clean skip without CUDA --------------------------------------
bench_gpu = importlib.import_module("benchmarks.bench_gpu")
run_module = importlib.import_module("benchmarks.run")


def test_gpu_benchmark_quick_on_cpu_times_every_variant(tmp_path, capsys):
    out = tmp_path / "gpu_cpu.json"
    assert bench_gpu.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    data = _json(out)
    assert not data["partial"] and not data["failed"] and not data["skipped"]
    assert data["meta"]["device"] == "cpu" and data["meta"]["device_name"].startswith("CPU")
    assert data["meta"]["torch"] == torch.__version__ and data["settings"]["quick"]
    assert data["meta"]["models"].startswith("torchvision ")
    assert set(data["models"]) == {"resnet50", "mobilenet_v3_large", "vit_b_16"}
    for name, entry in data["models"].items():
        variants = entry["variants"]
        kept = {"nr_keep", "cr_keep", "ca_keep"} if name == "resnet50" else set()  # --quick: ResNet-50 only
        assert set(variants) == {"original", "pruned", "nr", "cr", "ca"} | kept
        assert 0.3 < entry["r_macs"] < 1 and set(entry["rewrite_pause_s"]) == set(variants) - {"original"}
        assert variants["pruned"]["macs"] <= entry["live_macs"]  # budget U(θ): the dead removed (align may
        assert variants["pruned"]["grown"] < 0.1 * variants["nr"]["grown"]  # trade a few channels between spaces)
        for scheme in ("nr", "cr", "ca"):  # rejuvenated to c(A) in MACs, within one channel's cost
            assert 0.98 < variants[scheme]["macs_over_original"] <= 1.0
            assert 0 <= variants[scheme]["widths_multiple_of_8"]["conv"] <= 1
        for mode in ("inference", "train"):
            for precision in ("fp32", "bf16"):
                ratios = entry[mode][precision]["ratio_to_original"]
                assert set(ratios) == set(variants) and ratios["original"] == 1.0
                assert all(0.05 < r < 20 for r in ratios.values())  # sane, not meaningful at these sizes
        if name == "resnet50":
            assert variants["cr"]["sr_layers"] > 0 and variants["ca"]["sr_layers"] > 0
            assert variants["nr_keep"]["alpha"] > variants["nr"]["alpha"]  # the streams' share goes elsewhere
    assert data["models"]["vit_b_16"]["gates"] == 4  # per block (2): the MLP hidden space and the heads
    driver = data["driver"]
    assert driver["rounds"] == 0 and driver["lam"] > 0
    assert all(0.2 < cell["ratio"] < 5 and cell["check_s"] > 0 for cell in driver["precisions"].values())
    assert len(data["targets"]) == 8 and all(isinstance(t["met"], bool) for t in data["targets"])
    table = bench_gpu.markdown(data)
    assert "| resnet50 | bf16 + channels_last | inference |" in table and "rewrite pause" in table
    assert "resnet50            bf16 inference original" in capsys.readouterr().out  # progress lines as it goes


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_says_so_and_skips_without_cuda(tmp_path, capsys):
    assert bench_gpu.main(["--out", str(tmp_path / "gpu.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "gpu.json").exists()
    assert bench_gpu.main(["--device", "cuda", "--out", str(tmp_path / "gpu.json")]) == 2
    assert run_module.main(["--only", "gpu", "--out", str(tmp_path)]) == 0
    info = _json(tmp_path / "run.json")
    assert info["steps"]["benchmarks.bench_gpu"]["skipped"] and not (tmp_path / "gpu.json").exists()


# -- the GPU benchmark on a machine with torch alone: its models rebuilt in plain torch -------------------------------
torch_models = importlib.import_module("benchmarks.torch_models")
TINY_VIT = {"image_size": 32, "patch_size": 16, "num_layers": 2, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 128}


def _model_pair(name: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """(torchvision's model, the plain-torch rebuild), each built right after ``torch.manual_seed(seed)``."""
    torchvision = pytest.importorskip("torchvision")
    built = []
    for zoo in (torchvision.models, torch_models):
        torch.manual_seed(seed)
        built.append(zoo.VisionTransformer(**TINY_VIT) if name == "vit" else getattr(zoo, name)(weights=None))
    return built[0], built[1]


def _leaves(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules() if not list(m.children())]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v3_large", "vit"])
def test_plain_torch_models_are_torchvisions_own(name):
    """Same leaves under the same names, the same parameters drawn from the same seed, the same outputs."""
    theirs, ours = _model_pair(name, seed=3)
    assert _leaves(ours) == _leaves(theirs)
    mine, tv = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(tv)
    for key in tv:  # same initialisation rules, in the same order: bit-identical draws
        assert torch.equal(mine[key], tv[key]), key
    size = TINY_VIT["image_size"] if name == "vit" else 64
    x = torch.randn(3, 3, size, size)
    for mode in (False, True):
        theirs.train(mode), ours.train(mode)
        with torch.no_grad():
            torch.manual_seed(0)
            expected = theirs(x)
            torch.manual_seed(0)
            torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


def test_plain_torch_models_load_torchvision_weights_strictly():
    theirs, ours = _model_pair("mobilenet_v3_large", 0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=0)


def test_gpu_benchmark_builds_its_models_without_torchvision(monkeypatch, tmp_path):
    """Without torchvision, or with one that fails to import (built for another torch, as on a lent GPU machine),
    nrfx imports and analyses, and the GPU benchmark builds its models in plain torch."""
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    check = ("import torch, nrfx, benchmarks.bench_gpu as b; assert b.model_zoo is None; print(b.models_source()); "
             "net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)); "
             "print(nrfx.analyze(net.eval(), torch.randn(2, 3, 8, 8)).params)")
    for setup, path in (("import sys; sys.modules['torchvision'] = None; ", ""), ("", f"{tmp_path}:")):
        done = subprocess.run([sys.executable, "-c", setup + check], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": f"{path}{ROOT / 'src'}:{ROOT}"})
        assert done.returncode == 0 and "torchvision is not installed" in done.stdout, done.stderr[-2000:]
        assert done.stdout.split()[-1] == "120"  # 3·4·9 + 4 + 2·4
    monkeypatch.setattr(bench_gpu, "model_zoo", None)
    s = bench_gpu.Settings(device="cpu", quick=True, size=32)
    for name, cls in (("resnet50", torch_models.ResNet), ("resnet18", torch_models.ResNet),
                      ("mobilenet_v3_large", torch_models.MobileNetV3), ("vit_b_16", torch_models.VisionTransformer)):
        assert type(bench_gpu.build(name, s)) is cls
    assert bench_gpu.build("vit_b_16", bench_gpu.Settings(size=224)).encoder.pos_embedding.shape == (1, 197, 768)


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    bench_gpu.write_json(path, {"a": 1})

    def broken(self, text):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError):
        quality.write_atomic(path, "{}")
    monkeypatch.undo()
    assert _json(path) == {"a": 1}  # the old file is whole


# -- long benchmarks keep what they finished: --resume -------------------------------------------------------
def _fake_fashion(root: Path, train: int = 100, test: int = 40) -> Path:
    """Four tiny Fashion-MNIST-format IDX files (stripes whose frequency is the class): the real loader reads them."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(28.0).view(1, 28, 1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        labels = torch.arange(n) % 10
        images = 127 + 100 * torch.cos(0.3 * (1 + labels.float()).view(n, 1, 1) * rows).expand(n, 28, 28)
        images = (images + 20 * torch.randn(n, 28, 28, generator=gen)).clamp(0, 255).to(torch.uint8)
        names = quality.example().FILES[split]
        for name, data, header in ((names[0], images, struct.pack(">HBBIII", 0, 8, 3, n, 28, 28)),
                                   (names[1], labels.to(torch.uint8), struct.pack(">HBBI", 0, 8, 1, n))):
            with gzip.open(root / name, "wb") as handle:
                handle.write(header + data.numpy().tobytes())
    return root


TINY = {"config": (4, "M", 8, "M"), "steps": 4, "batch": 8, "interval": 2, "val_size": 20}


@pytest.fixture
def tiny_quality(monkeypatch, tmp_path):
    """A tiny quality setup on fake IDX files; quality.train counted (and made to fail at a chosen call)."""
    calls = []
    real = quality.train

    def counted(name, seed, setup):
        calls.append((name, seed))
        if getattr(counted, "fail_at", None) == len(calls):
            raise RuntimeError("machine lost")
        return real(name, seed, setup)

    monkeypatch.setattr(quality, "train", counted)
    return quality.Setup().replace(data=str(_fake_fashion(tmp_path / "data")), **TINY), counted, calls


@pytest.mark.usefixtures("one_thread")
def test_quality_keeps_finished_runs_and_resumes(tmp_path, tiny_quality):
    setup, counted, calls = tiny_quality
    lines: list[str] = []
    counted.fail_at = 2  # the second run dies: the first must be on disk already
    with pytest.raises(RuntimeError, match="machine lost"):
        quality.run(["baseline", "nr"], [0], setup, tmp_path, workers=1, log=lines.append)
    partial = _json(tmp_path / "quality.json")
    assert partial["partial"] and partial["finished_runs"] == 1 and partial["planned_runs"] == 2
    assert [(r["method"], r["seed"]) for r in partial["runs"]] == [("baseline", 0)]
    assert any("[1/2] baseline" in line and "4 steps" in line and "val" in line for line in lines)
    first = partial["runs"][0]

    counted.fail_at, calls[:] = None, []
    result = quality.run(["baseline", "nr"], [0], setup, tmp_path, workers=1, log=lines.append, resume=True)
    assert calls == [("nr", 0)]  # the finished baseline is not trained again
    final = _json(tmp_path / "quality.json")
    assert not final["partial"] and final["finished_runs"] == final["planned_runs"] == 2
    assert [r["method"] for r in final["runs"]] == ["baseline", "nr"] and final["runs"][0] == first
    assert set(result["table"]) == {"baseline", "nr"} and "| NR |" in (tmp_path / "quality.md").read_text()

    calls[:] = []
    quality.run(["baseline", "nr"], [0], setup, tmp_path, workers=1, log=lines.append, resume=True)
    assert calls == []  # everything there: nothing trained
    final = _json(tmp_path / "quality.json")  # rewritten (its wall time is this run's)
    assert [r["method"] for r in final["runs"]] == ["baseline", "nr"] and final["runs"][0] == first
    with pytest.raises(SystemExit, match="steps: 4 there, 5 now"):  # other settings: refuse, do not mix
        quality.run(["baseline"], [0], setup.replace(steps=5), tmp_path, workers=1, log=lines.append, resume=True)
    assert _json(tmp_path / "quality.json") == final


def test_quality_command_line_resume_with_two_workers(tmp_path):
    data = _fake_fashion(tmp_path / "data")
    settings = ["--set", f"data={data}", "config=4,M,8,M", "steps=4", "batch=8", "interval=2", "val_size=20"]

    def command(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "benchmarks.quality", "--out", str(tmp_path / "out"),
                               "--workers", "2", "--seeds", "0", *args, *settings], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    first = command("--methods", "baseline")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[1/1] baseline" in first.stdout
    baseline = _json(tmp_path / "out" / "quality.json")["runs"][0]
    second = command("--methods", "baseline", "nr", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "1 of 2 runs already in" in second.stdout and "[1/1] nr" in second.stdout
    final = _json(tmp_path / "out" / "quality.json")
    assert not final["partial"] and [r["method"] for r in final["runs"]] == ["baseline", "nr"]
    assert final["runs"][0] == baseline


paper = importlib.import_module("benchmarks.quality_paper")


@pytest.mark.usefixtures("one_thread")
def test_paper_benchmark_keeps_finished_arms_and_resumes(tmp_path, monkeypatch):
    setup = paper.PaperSetup().replace(**paper.QUICK).replace(per_class=8, val_size=40, test_limit=40, epochs=2,
                                                                 lam=5e-2, config=(4, "M", 8, "M"))
    arms = ("nr-cr", "baseline", "baseline-matched")
    real_plain, calls = paper.train_plain, {"plain": 0, "pre": 0, "branch": 0}

    def dies(*args, **kwargs):
        raise RuntimeError("time limit")

    monkeypatch.setattr(paper, "train_plain", dies)  # nr-cr finishes, then the baseline dies
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="time limit"):
        paper.run(setup, [0], tmp_path, "cpu", log=lines.append, arms=arms)
    partial = _json(tmp_path / "quality_paper.json")
    assert partial["partial"] and [(r["arm"], r["seed"]) for r in partial["runs"]] == [("nr-cr", 0)]
    assert any("nr-cr" in line and "epochs" in line and "test" in line for line in lines)
    k = partial["runs"][0]["epochs"] - setup.epochs

    def counting(key, real):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(paper, "train_plain", counting("plain", real_plain))
    monkeypatch.setattr(paper, "pre_phase", counting("pre", paper.pre_phase))
    monkeypatch.setattr(paper, "nr_branch", counting("branch", paper.nr_branch))
    result = paper.run(setup, [0], tmp_path, "cpu", log=lines.append, arms=arms, resume=True)
    assert calls == {"plain": 2, "pre": 0, "branch": 0}  # k comes from the finished nr-cr arm
    final = _json(tmp_path / "quality_paper.json")
    assert not final["partial"] and final["finished_runs"] == 3
    runs = {r["arm"]: r for r in final["runs"]}
    assert runs["nr-cr"] == partial["runs"][0] and runs["baseline-matched"]["epochs"] == k + setup.epochs
    assert set(result["table"]) == set(arms)
    with pytest.raises(SystemExit, match="epochs"):
        paper.run(setup.replace(epochs=3), [0], tmp_path, "cpu", log=lines.append, arms=arms, resume=True)


def test_srlayer_alternatives_agree_and_are_timed(tmp_path):
    from benchmarks import bench_srlayers

    cases = ((nn.Conv2d(16, 24, 3, padding=1, bias=False), torch.randn(2, 16, 6, 6)),
             (nn.Linear(16, 24, bias=False), torch.randn(2, 5, 16)))
    for dense, x in cases:
        conv = lambda t, w, b, d=dense: d._conv_forward(t, w, b)  # noqa: E731 - the benchmark's op signature
        op = nn.functional.linear if isinstance(dense, nn.Linear) else conv
        for build in (bench_srlayers._cr_variants, bench_srlayers._ca_variants):
            variants = {k: f for k, f in build(dense, 8, 16, op).items() if k not in ("dense", "grouped_half")}
            with torch.no_grad():
                outputs = {k: f(x) for k, f in variants.items() if not k.endswith("_half")}
            reference = outputs.pop("nrfx" if "nrfx" in outputs else "nrfx_two_calls_cat")
            for name, out in outputs.items():  # every alternative computes the same block formula
                torch.testing.assert_close(out, reference, msg=name)
    out = tmp_path / "sr.json"
    bench_srlayers.main(["--quick", "--device", "cpu", "--repeats", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    for case in data["cases"].values():
        assert {"nrfx_two_calls_cat", "dense"} <= set(case["cr"]["inference_vs_dense"])
        assert {"nrfx", "where_gate", "cat_gate", "prealloc_gate"} <= set(case["ca"]["inference_vs_dense"])
        assert "prealloc_gate" not in case["ca"]["training_vs_dense"]
