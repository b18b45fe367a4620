"""Gates: the Gate rule, coverage, add_gates / fold_gates on transformers and ConvNeXt, addcmul, the driver."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import assert_preserved, kill_gates
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

import nrfx
from nrfx.layers.gates import Gate


def tiny_mlp() -> nn.Module:
    """8 → 6 (GELU, gate) → 3: one free space of 6 channels read by one gate."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.GELU(), Gate(6, dim=-1), nn.Linear(6, 3)).eval()


BUILDERS = {
    "vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
    "convnext": lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10),
    "swin": lambda: SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=10),
}


def gated(name: str, seed: int = 0):
    """A float64 eval-mode model, its gated copy and an input."""
    torch.manual_seed(seed)
    model = BUILDERS[name]().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return model, nrfx.add_gates(model, x), x


# -- the module and its rule: closed-form answers ----------------------------------------------------------
def test_gate_scales_its_dim_and_starts_open():
    x = torch.randn(2, 3, 4, 5)
    gate = Gate(3, dim=1)
    assert torch.equal(gate.weight, torch.ones(3)) and torch.equal(gate(x), x)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([1.0, 0.0, 2.0]))
    assert torch.equal(gate(x), x * torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1))
    tokens = Gate(5, dim=-1)
    with torch.no_grad():
        tokens.weight.copy_(torch.arange(5.0))
    assert torch.equal(tokens(x), x * torch.arange(5.0))
    with pytest.raises(ValueError, match="num_features"):
        Gate(0)


def test_gate_rule_space_mask_and_utilization():
    model = tiny_mlp()
    a = nrfx.analyze(model, torch.randn(4, 8))
    (record,) = [r for _, r in a.layers("norm")]
    assert record.module == "2" and record.input == record.output
    hidden = a.space_ids(next(r for _, r in a.layers("linear")).output)
    assert a.space_ids(record.output) == hidden and a.param_info["2.weight"].dims == (record.output,)
    assert [s.width for s in a.spaces] == [6, 3] and not a.spaces[0].is_frozen and a.spaces[1].is_frozen
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([1.0, 0.005, 1.0, 0.0, 0.5, 0.0099]))  # dead: |g| < 0.01·max|g|
    masks = nrfx.norm_masks(model)
    assert masks["2"].tolist() == [True, False, True, False, True, False]
    u = a.utilization(masks)
    assert u.params == (8 * 6 + 6) + 6 + (6 * 3 + 3) and u.live_params == (8 * 3 + 3) + 3 + (3 * 3 + 3)
    assert u.macs == 8 * 6 + 6 * 3 and u.live_macs == 8 * 3 + 3 * 3
    assert u.alive[0].tolist() == masks["2"].tolist()


def test_gate_output_zero_from_its_own_mask_not_its_input():
    """Like a norm: a zero reaching the gate does not make its output zero (its new entries get γ0)."""
    model = nn.Sequential(nn.Linear(4, 6), Gate(6, dim=-1), Gate(6, dim=-1), nn.Linear(6, 2)).eval()
    a = nrfx.analyze(model, torch.randn(3, 4))
    dead_first = torch.tensor([False, True, True, True, True, True])
    assert a.alive({"1": dead_first})[0].all()  # only the second gate's mask reaches the reader
    assert a.alive({"2": dead_first})[0].tolist() == dead_first.tolist()
    assert a.alive({"0": dead_first})[0].all()  # the producer's mask stops at the gate


def test_coverage_counts_free_and_monitored_channels():
    plain = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)).eval()
    before = nrfx.analyze(plain, torch.randn(4, 8)).coverage()
    assert (before.channels, before.free_channels, before.monitored_channels) == (9, 6, 0)
    assert before.free == pytest.approx(6 / 9) and before.monitored == 0 and before.unsignalled == (0,)
    after = nrfx.analyze(tiny_mlp(), torch.randn(4, 8)).coverage()
    assert after.monitored == pytest.approx(6 / 9) and after.unsignalled == ()
    report = nrfx.analyze(plain, torch.randn(4, 8)).report()
    assert "coverage  free 66.7%   monitored 0.0% of 9 channels" in report.summary()
    assert "add_gates" in report.summary()
    assert report.to_dict()["coverage"]["monitored_channels"] == 0


def test_low_coverage_warns_once_only_for_models_that_are_not_tiny():
    model, _, x = gated("vit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nrfx.analyze(model, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, nrfx.NrfxWarning)]
    assert len(messages) == 1 and "nrfx.add_gates" in messages[0] and "reaches the model output" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)
        nrfx.analyze(nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)), torch.randn(4, 8))  # 9 channels
        nrfx.analyze(gated("vit")[1], x)  # 94% frozen (the 1000 classes) but every free space has a gate


# -- add_gates / fold_gates ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_add_gates_keeps_the_function_and_monitors_the_free_spaces(name):
    model, gm, x = gated(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before, after = nrfx.analyze(model, x).coverage(), nrfx.analyze(gm, x).coverage()
    assert before.monitored == 0 and before.free > 0
    assert after.monitored == after.free == before.free and after.unsignalled == ()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert not any(isinstance(m, Gate) for m in model.modules())  # the user's model is untouched
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in
                                                              model.state_dict().items())
    gates = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in gm.nrfx_gates}
    assert len(gates) == len(gm.nrfx_gates)
    heads = [path for path in gates if path.endswith(".heads_gate")]  # one per block of several heads
    assert len(heads) == {"vit": 2, "swin": 1}.get(name, 0)  # swin: 1 head, then 2
    gates = {path: node for path, node in gates.items() if path not in heads}
    assert len(gates) == 2
    for path, node in gates.items():  # after the activation that follows the producer
        assert isinstance(gm.get_submodule(node.args[0].target), nn.GELU), path
        assert path == f"{node.args[0].args[0].target}_gate"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gated_models_rejuvenate_exactly(name):
    """Exact-zero gates: every scheme ± rescale gives the same outputs, and rescaling reaches the gates."""
    _, gm, x = gated(name)
    assert kill_gates(gm) > 0
    analysis = nrfx.analyze(gm, x)
    assert analysis.utilization().r_params < 1
    assert_preserved(gm, x, analysis)
    new = nrfx.rejuvenate(gm, None, None, example_inputs=x, rescale=True, analysis=analysis)
    assert "rescale: 2 norms rescaled with exact compensation" in new.nrfx_plan.notes


@pytest.mark.parametrize("gamma0", [None, 0.5])
def test_rejuvenated_gate_entries_start_at_gamma0(gamma0):
    _, gm, x = gated("vit")
    kill_gates(gm)
    new = nrfx.rejuvenate(gm, None, None, example_inputs=x, gamma0=gamma0)
    path = gm.nrfx_gates[0]
    source = new.nrfx_param_map[f"{path}.weight"].dims[0].source
    gate = new.get_submodule(path)
    assert (source < 0).any() and gate.num_features == gate.weight.numel() == source.numel()
    assert torch.equal(gate.weight[source < 0], torch.full_like(gate.weight[source < 0], gamma0 or 1.0))
    assert torch.equal(gate.weight[source >= 0], gm.get_submodule(path).weight[source[source >= 0]])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fold_gates_round_trip(name):
    model, gm, x = gated(name)
    kill_gates(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    folded = nrfx.fold_gates(gm, x)  # the shapes let head gates fold through the merge of heads
    assert not any(isinstance(m, Gate) for m in folded.modules())
    assert sum(p.numel() for p in folded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())  # the gated model is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)  # the low-coverage notice: no gates any more
        assert nrfx.analyze(folded, x).coverage().monitored == 0


def test_fold_gates_of_a_user_model_and_its_refusal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gate(4, dim=1), nn.Dropout(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([2.0, 0.0, -1.0, 0.5]))
    x = torch.randn(2, 3, 8, 8)
    folded = nrfx.fold_gates(model)
    torch.testing.assert_close(folded(x), model(x))
    assert isinstance(model[2], Gate) and not any(isinstance(m, Gate) for m in folded.modules())
    bad = nn.Sequential(nn.Linear(4, 4), Gate(4, dim=-1), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(nrfx.NrfxWarning, match=r"keeps gate '1' \(node _1\): it reaches call_module 2 \(ReLU\) "
                      r"\(node _2\) before a linear/conv layer; it stays in the model"):
        kept = nrfx.fold_gates(bad)
    assert kept.nrfx_gates == ("1",) and isinstance(kept.get_submodule("1"), Gate)
    torch.testing.assert_close(kept(torch.ones(2, 4)), bad(torch.ones(2, 4)))


def test_add_gates_on_full_size_models_lifts_coverage():
    """torchvision's convnext_tiny and vit_b_16 (32×32 inputs): the free MLP spaces become monitored."""
    x = torch.randn(1, 3, 32, 32)
    for model in (torchvision.models.convnext_tiny(), torchvision.models.vit_b_16(image_size=32)):
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nrfx.NrfxWarning)  # the low-coverage notice, before gates
            before = nrfx.analyze(model, x).coverage()
        gm = nrfx.add_gates(model, x)
        after = nrfx.analyze(gm, x).coverage()
        assert before.monitored == 0 and after.monitored == after.free > 0.9
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))


class CachedBias(nn.Module):
    """timm's LeViT / EfficientFormer attention: an eval-mode cache of the bias, keyed by str(device)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)
        self.bias = nn.Parameter(torch.zeros(2, 4))
        self.cache: dict[str, torch.Tensor] = {}
        self.seen: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias[:, [0, 1, 2, 3]]
            self.seen.append(key)
        return self.fc2(torch.relu(self.fc1(x))) + self.cache[key]


def test_tracing_leaves_no_proxy_in_a_forward_cache():
    """The first trace used to leave a proxy in the cache: the second trace read it and failed (ShapeError)."""
    model = CachedBias().eval()
    x = torch.randn(2, 4)
    nrfx.analyze(model, x)
    assert model.cache == {} and model.seen == []
    gm = nrfx.add_gates(model, x)
    assert gm.nrfx_gates == ("fc1_gate",) and model.cache == {}
    assert nrfx.analyze(gm, x).coverage().monitored > 0
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("name, gates", [("efficientformer_l1", 1), ("efficientformerv2_s0", 4), ("levit_128s", 0)])
def test_add_gates_after_analyze_on_timm_attention_bias_caches(name, gates):
    """These models failed at add_gates after an analysis ("Node add referenced nonexistent value getitem_…")."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        before = nrfx.analyze(model, x).coverage()
    gm = nrfx.add_gates(model, x)
    gm.graph.lint()
    after = nrfx.analyze(gm, x).coverage()
    assert len(gm.nrfx_gates) == gates and after.monitored == after.free == before.free
    assert after.monitored > before.monitored if gates else after.monitored == before.monitored
    assert all(torch.equal(gm.get_submodule(p).weight, torch.ones_like(gm.get_submodule(p).weight))
               for p in gm.nrfx_gates)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_convnextv2_grn_hidden_dims_are_free_and_each_gets_a_gate():
    """GRN's mean over channels reads them (the rewrite sums the survivors): every block's hidden dim is free, no
    reason in the report says "reduction mean", and add_gates puts one gate on each (exactness: test_aten_gaps)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnextv2_atto", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        analysis = nrfx.analyze(model, x)
        gated = nrfx.add_gates(model, x)
    assert not analysis.unknown_ops and analysis.coverage().free > 0.5
    hidden = analysis.space_ids(analysis.records["stages_0_blocks_0_mlp_fc1"].output)
    assert not any(analysis.spaces[i].is_frozen for i in hidden)
    assert "reduction mean" not in analysis.report().table(200)
    assert len(gated.nrfx_gates) == sum(len(stage.blocks) for stage in model.stages)


# -- addcmul ------------------------------------------------------------------------------------------------
class AddCMul(nn.Module):
    """conv → three BatchNorms on one space → addcmul (function or method) → conv."""

    def __init__(self, method: bool) -> None:
        super().__init__()
        self.method = method
        self.conv = nn.Conv2d(3, 4, 1)
        self.a, self.b, self.c = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a, b, c = self.a(y), self.b(y), self.c(y)
        z = a.addcmul(b, c, value=0.5) if self.method else torch.addcmul(a, b, c, value=0.5)
        return self.head(z)


@pytest.mark.parametrize("method", [False, True])
def test_addcmul_zero_where_input_and_a_factor_are_zero(method):
    model = AddCMul(method).eval()
    a = nrfx.analyze(model, torch.randn(1, 3, 4, 4))
    assert not a.unknown_ops and [s.width for s in a.spaces] == [4, 2]
    masks = {"a": torch.tensor([False, False, True, False]), "b": torch.tensor([True, False, False, True]),
             "c": torch.tensor([False, True, True, True])}
    # dead = a dead and (b dead or c dead): channel 0 (a, c), channel 1 (a, b); 2: a alive; 3: b, c alive
    assert a.alive(masks)[0].tolist() == [False, False, True, True]


# -- the driver ---------------------------------------------------------------------------------------------
def test_driver_rejuvenates_a_gated_vit_and_keeps_training():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=64,
                            num_classes=4)
    example = torch.randn(2, 3, 16, 16)
    gm = nrfx.add_gates(vit, example)
    projection = torch.randn(3 * 16 * 16, 2, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    nr = nrfx.NeuralRejuvenation(copy.deepcopy(gm), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                               weight_decay=1e-3),
                                 example_inputs=example, interval=10, lam=0.01, delta_lambda=0.0, target=0.95,
                                 max_rounds=1, seed=0)
    assert sorted(nr.masks()) == sorted(gm.nrfx_gates)  # the gates are monitored
    losses, after = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)
        for step in range(1000):
            x = torch.randn(32, 3, 16, 16, generator=gen)
            signs = (x.flatten(1) @ projection > 0).long()
            loss = nn.functional.cross_entropy(nr.model(x), signs[:, 0] * 2 + signs[:, 1])
            nr.optimizer.zero_grad()
            loss.backward()
            nr.step()
            losses.append(loss.item())
            after = step if after is None and nr.rounds else after
            if after is not None and step >= after + 30:
                break
    assert nr.rounds == 1 and after is not None, "no rejuvenation within 1000 steps"
    assert all(torch.isfinite(torch.tensor(losses)))
    widths = [nr.module.get_submodule(p).num_features for p in gm.nrfx_gates]
    assert widths != [64, 64] and sum(p.numel() for p in nr.module.parameters()) <= nr.budget.params


# -- a property: random gated MLP chains ---------------------------------------------------------------
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(1, 6), min_size=3, max_size=5), act=st.sampled_from(sorted(_ACTIVATIONS)),
       scheme=st.sampled_from(["nr", "cr", "ca"]), rescale=st.booleans(), data=st.data())
def test_gated_chains_count_rejuvenate_and_fold_exactly(widths, act, scheme, rescale, data):
    """Linear → act → … chains: gates keep the function; U(θ) is the closed form; rejuvenate and fold are exact."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([_ACTIVATIONS[act]()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).double().eval()
    x = torch.randn(3, widths[0], dtype=torch.float64)
    gm = nrfx.add_gates(model, x)
    assert torch.equal(gm(x), model(x)) and len(gm.nrfx_gates) == len(widths) - 2
    live = list(widths)  # input and output widths stay; each hidden width loses its zeroed gates
    with torch.no_grad():
        for k, path in enumerate(gm.nrfx_gates, start=1):
            dead = data.draw(st.lists(st.booleans(), min_size=widths[k], max_size=widths[k]))
            dead[data.draw(st.integers(0, widths[k] - 1))] = False  # one channel stays alive
            gm.get_submodule(path).weight.copy_(torch.tensor([0.0 if d else 0.5 + j for j, d in enumerate(dead)]))
            live[k] -= sum(dead)
    analysis = nrfx.analyze(gm, x)
    cover = analysis.coverage()
    assert cover.monitored == cover.free == sum(widths[1:-1]) / sum(widths[1:])
    expected = sum(a * b + b for a, b in itertools.pairwise(live)) + sum(live[1:-1])  # linears, then gates
    assert analysis.utilization().live_params == expected
    new = nrfx.rejuvenate(gm, None, None, example_inputs=x, scheme=scheme, rescale=rescale, analysis=analysis)
    torch.testing.assert_close(new(x), gm(x), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(nrfx.fold_gates(new)(x), gm(x), rtol=1e-7, atol=1e-9)


class FunctionalMlp(nn.Module):
    """A conv stem without norms, then tokens through fc1 → F.gelu → fc2; ``fc1_gate`` is already taken."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 5)
        self.fc1_gate = nn.Identity()  # a submodule the gate must not replace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
        return self.fc1_gate(self.fc2(nn.functional.gelu(self.fc1(tokens))))


def test_add_gates_after_functional_activations_and_conv_outputs():
    model = FunctionalMlp().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm = nrfx.add_gates(model, x)
    assert gm.nrfx_gates == ("conv_gate", "fc1_gate1")
    assert gm.get_submodule("conv_gate").dim == 1 and gm.get_submodule("fc1_gate1").dim == -1
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert nodes["conv_gate"].args[0].target is torch.relu
    assert nodes["fc1_gate1"].args[0].target is nn.functional.gelu
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert isinstance(gm.fc1_gate, nn.Identity) and not any(isinstance(m, Gate) for m in model.modules())
    kill_gates(gm, 0.5, seed=3)
    analysis = nrfx.analyze(gm, x)
    assert analysis.coverage().monitored == analysis.coverage().free > 0
    assert_preserved(gm, x, analysis)
    with pytest.warns(nrfx.NrfxWarning, match="keeps gate 'conv_gate'.*call_method flatten.*pass example_inputs"):
        kept = nrfx.fold_gates(gm)  # flatten and transpose between the gate and fc1: it needs the shapes
    assert kept.nrfx_gates == ("conv_gate",)
    folded = nrfx.fold_gates(gm, x)
    assert folded.nrfx_gates == () and not any(isinstance(m, Gate) for m in folded.modules())
    torch.testing.assert_close(folded(x), gm(x), rtol=1e-10, atol=1e-12)


def test_gate_follows_an_identity_norm_and_the_activation():
    """timm's ``fc1 → norm (nn.Identity) → act → fc2``: the gate goes after the act, where it folds."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.GELU(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    gm = nrfx.add_gates(model, x)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in gm.nrfx_gates]
    assert node.args[0].target == "2"
    kill_gates(gm)
    folded = nrfx.fold_gates(gm)
    assert folded.nrfx_gates == ()
    torch.testing.assert_close(folded(x), gm(x), rtol=1e-10, atol=1e-12)


class Movers(nn.Module):
    """Four gates, each behind ops fold_gates follows: max pool, flatten + transpose, reshape + permute (into a
    depthwise conv), cat with an ungated branch, a product with an ungated tensor, average pool + flatten (into
    ``F.linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.g1 = nn.Conv2d(3, 4, 3, padding=1), Gate(4)
        self.tok, self.g2 = nn.Linear(4, 6), Gate(6, dim=-1)
        self.dw, self.g3 = nn.Conv2d(6, 6, 3, padding=1, groups=6), Gate(6)
        self.side = nn.Conv2d(3, 2, 1)
        self.mix, self.g4 = nn.Conv2d(8, 5, 1), Gate(5)
        self.head = nn.Parameter(torch.randn(3, 20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.max_pool2d(self.g1(torch.relu(self.conv(x))), 2)  # (B, 4, 4, 4)
        t = self.g2(nn.functional.gelu(self.tok(a.flatten(2).transpose(1, 2))))  # tokens (B, 16, 6)
        m = t.reshape(x.shape[0], 4, 4, 6).permute(0, 3, 1, 2)
        d = self.g3(nn.functional.gelu(self.dw(m)))
        c = torch.cat([d, self.side(nn.functional.avg_pool2d(x, 2))], dim=1)
        y = self.g4(torch.relu(self.mix(c))) * torch.sigmoid(nn.functional.avg_pool2d(x[:, :1], 2))
        return nn.functional.linear(nn.functional.adaptive_avg_pool2d(y, 2).flatten(1), self.head)


def test_fold_gates_follows_movement_pools_cat_and_products():
    torch.manual_seed(0)
    model = Movers().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert kill_gates(model, 0.3, seed=1) > 0  # random values in [0.5, 1.5), some zero
    folded = nrfx.fold_gates(model, x)
    assert folded.nrfx_gates == () and not any(isinstance(m, Gate) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)
    assert isinstance(model.g1, Gate)  # the user's model keeps its gates
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = nrfx.fold_gates(model)  # without shapes, none of them can be followed
    assert kept.nrfx_gates == ("g1", "g2", "g3", "g4")
    assert sum("pass example_inputs to fold_gates" in str(w.message) for w in caught) == 4


class Unfoldable(nn.Module):
    """A negative gate before a max pool, a reshape that mixes channels into one column, a product with itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.g1, self.fc1 = nn.Conv2d(3, 4, 1), Gate(4), nn.Linear(16, 2)
        self.lin, self.g2, self.fc2 = nn.Linear(3, 4), Gate(4, dim=-1), nn.Linear(4, 2)
        self.g3, self.fc3 = Gate(4, dim=-1), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.max_pool2d(self.g1(self.conv(x)), 2).flatten(1)  # (B, 16)
        t = self.g2(self.lin(x.flatten(2).transpose(1, 2)))  # tokens (B, 16, 4); fc2's columns mix its channels
        u = self.g3(self.lin(x.flatten(2).transpose(1, 2)))
        return self.fc1(a) + self.fc2(t.reshape(x.shape[0], 4, 16).transpose(1, 2)).mean(1) + \
            self.fc3(u * torch.sigmoid(u)).mean(1)


def test_fold_gates_keeps_what_it_cannot_fold_and_names_it():
    torch.manual_seed(0)
    model = Unfoldable().double().eval()
    with torch.no_grad():
        model.g1.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = nrfx.fold_gates(model, x)
    messages = sorted(str(w.message) for w in caught if "keeps gate" in str(w.message))
    assert kept.nrfx_gates == ("g1", "g2", "g3") and len(messages) == 3
    assert "max commutes with the gate only where it is >= 0" in messages[0] and "max_pool2d" in messages[0]
    assert "its reader fc2 (node fc2) reads gate channels mixed with other dims" in messages[1]
    assert "call_function mul (node mul), whose other operands depend on the gate" in messages[2]
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_fold_gates_on_timm_transformers_and_convnext(name):
    """Gated timm ViT / ConvNeXt with random non-1 gates fold completely and compute the same (float64)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    size = {"img_size": 64} if "vit" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **size).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    gm = nrfx.add_gates(model, x)
    assert len(gm.nrfx_gates) > 0 and kill_gates(gm, 0.2) > 0
    folded = nrfx.fold_gates(gm, x)
    assert folded.nrfx_gates == () and not any(isinstance(m, Gate) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), rtol=1e-9, atol=1e-10)


class _CachedBias(nn.Module):
    """Caches a parameter-derived tensor in eval mode, as EfficientFormerV2's attention biases: called with grad,
    the cache holds a tensor with autograd history, which copy.deepcopy refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
        self.bias = nn.Parameter(torch.randn(16))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if not self.training:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            bias = self.cache["b"]
        else:
            bias = self.bias * 2
        return self.fc2(torch.relu(self.fc1(x) + bias))


def test_add_gates_and_rejuvenate_copy_a_model_holding_a_cached_non_leaf_tensor():
    torch.manual_seed(0)
    model = _CachedBias().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = model(x)  # fills the cache with grad
    gated = nrfx.add_gates(model, x)
    torch.testing.assert_close(gated(x), expected)
    new = nrfx.rejuvenate(gated, None, nrfx.Budget.fraction(1.3), example_inputs=x, align=4)
    torch.testing.assert_close(new(x), expected)
    assert model.cache["b"].grad_fn is not None  # the user's model keeps its own cache
