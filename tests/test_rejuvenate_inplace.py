"""rejuvenate(..., inplace=True): the user's model object itself, its parameters and its optimizer follow the plan.

Properties: the model, its class, its module names and every surviving ``nn.Parameter`` object
stay; resized layers' attributes agree with their weights; the outputs equal those of the
GraphModule that the same plan builds (any batch size), so the survivors' function is kept;
the optimizer holds exactly the model's parameters with their state sliced; ``state_dict``
carries the plans and ``load_rejuvenated`` rebuilds the model on a fresh instance.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import archs, build, mask_sites, repair_masks, zero_masked
from support import kill_channels, kill_per_norm
from torch import nn

import nrfx
from nrfx.layers.srlayers import SR_LAYERS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _sizes_agree(model: nn.Module) -> None:
    """Every conv, linear and norm's size attributes agree with its tensors (``weight`` reads dense on S/R layers)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            assert m.weight.shape[0] == m.out_channels and m.weight.shape[1] * m.groups == m.in_channels, name
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            assert m.running_mean.shape[0] == m.num_features == m.weight.shape[0], name
        elif isinstance(m, nn.GroupNorm):
            assert m.weight.shape[0] == m.num_channels and m.num_channels % m.num_groups == 0, name


def _identities(model: nn.Module) -> tuple[set[int], list[str]]:
    """(ids of the parameters, module names)."""
    return {id(p) for p in model.parameters()}, [n for n, _ in model.named_modules()]


def _check_in_place(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    """Rejuvenate ``model`` in place; check identity, sizes, and equality with the GraphModule of the same plan."""
    original = copy.deepcopy(model)
    params, names = _identities(model)
    cls, model_id = type(model), id(model)
    result = nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, **options)
    assert result is model and type(model) is cls and id(model) == model_id
    now, now_names = _identities(model)
    assert now_names == names
    assert params <= now  # every surviving parameter object is still there (resized)
    _sizes_agree(model)
    graph = nrfx.apply_plan(original, model.nrfx_plan, x)
    for batch in (x.shape[0], x.shape[0] + 1):
        probe = torch.randn(batch, *x.shape[1:], dtype=x.dtype)
        with torch.no_grad():
            torch.testing.assert_close(model(probe), graph(probe), rtol=1e-6, atol=1e-6)
    return original


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
@pytest.mark.parametrize("align", [1, 8])
def test_resnet_in_place_keeps_identity_and_function(scheme, align):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    kill_channels(model, nrfx.analyze(model, x), 0.4)
    with torch.no_grad():
        expected = model(x)
    conv = model.layer2[0].conv1
    original = _check_in_place(model, x, scheme=scheme, align=align)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert (model.layer2[0].conv1 is conv) == (scheme == "nr")
    assert isinstance(model.layer2[0].conv1, SR_LAYERS) == (scheme != "nr")
    assert any(p is conv._parameters["weight"] for p in model.parameters())  # cr/ca: it holds the S block
    assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in original.parameters())


SETTINGS = dict(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


@st.composite
def _masks(draw, arch):
    """A random alive mask per mask site of an architecture (drawn per norm)."""
    return {name: torch.tensor(draw(st.lists(st.booleans(), min_size=width, max_size=width)))
            for name, width in mask_sites(arch).items()}


@settings(**SETTINGS)
@given(st.data())
def test_random_architectures_in_place_equal_the_graph_path(data):
    arch = data.draw(archs())
    masks = repair_masks(arch, data.draw(_masks(arch)))
    model = build(arch, seed=data.draw(st.integers(0, 50)), dtype=torch.float64).eval()
    zero_masked(model, masks)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    scheme = data.draw(st.sampled_from(["nr", "cr", "ca"]))
    align = data.draw(st.sampled_from([1, 8]))
    original = copy.deepcopy(model)
    params = {id(p) for p in model.parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, x)
        usable = {k: v for k, v in masks.items() if k in analysis.mask_sites}
        nrfx.rejuvenate(model, usable, nrfx.Budget.fraction(1.5), example_inputs=x, scheme=scheme, align=align,
                        inplace=True)
        graph = nrfx.apply_plan(original, model.nrfx_plan, x)
    assert params <= {id(p) for p in model.parameters()}
    _sizes_agree(model)
    probe = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-7, atol=1e-9 * max(1.0, expected.abs().max().item()))
        torch.testing.assert_close(model(probe), graph(probe), rtol=1e-9, atol=1e-12)


# -- the optimizer follows --------------------------------------------------------------------
def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    model.train()
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("scheme", ["nr", "cr"])
@pytest.mark.parametrize("make", [lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-4),
                                  lambda g: torch.optim.Adam(g, lr=1e-3),
                                  lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.05)],
                         ids=["sgd", "adam", "adamw"])
def test_optimizer_follows_in_place(make, scheme):
    model, x = _cnn(), torch.randn(4, 3, 8, 8)
    norms = [p for n, p in model.named_parameters() if n.startswith(("1.", "4."))]
    others = [p for n, p in model.named_parameters() if not n.startswith(("1.", "4."))]
    optimizer = make([{"params": others}, {"params": norms, "weight_decay": 0.0, "lr": 0.5}])
    for _ in range(2):
        _train_step(model, optimizer, x)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=3)
    conv = model[3]
    key = "momentum_buffer" if "momentum_buffer" in optimizer.state[conv.weight] else "exp_avg"
    before = optimizer.state[conv.weight][key].clone()
    settings_before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, scheme=scheme,
                    align=1)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) and {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == settings_before
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(model[1].weight), id(model[1].bias),
                                                                     id(model[4].weight), id(model[4].bias)}
    pmap = model.nrfx_param_map["3.weight"]
    out_map, in_map = pmap.dims
    kept = before[out_map.source[out_map.kept]][:, in_map.source[in_map.kept]]
    state = optimizer.state[conv.weight][key]  # the old object: cr stores it as the S×S block
    assert state.shape == conv.weight.shape
    torch.testing.assert_close(state[out_map.kept][:, in_map.kept], kept)
    for p in held:
        for value in optimizer.state.get(p, {}).values():
            assert not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape == p.shape
    assert torch.isfinite(torch.tensor(_train_step(model, optimizer, x)))


def test_in_place_new_slots_start_at_adagrads_initial_accumulator():
    model, x = _cnn(), torch.randn(4, 3, 8, 8)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05, initial_accumulator_value=0.25)
    _train_step(model, optimizer, x)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=3)
    before = optimizer.state[model[3].weight]["sum"].clone()
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, align=1)
    out_map, in_map = model.nrfx_param_map["3.weight"].dims
    state = optimizer.state[model[3].weight]["sum"]
    kept = state[out_map.kept][:, in_map.kept]
    torch.testing.assert_close(kept, before[out_map.source[out_map.kept]][:, in_map.source[in_map.kept]])
    new = torch.ones_like(state, dtype=torch.bool)
    new[out_map.kept[:, None], in_map.kept[None, :]] = False
    assert new.any() and bool((state[new] == 0.25).all())
    assert torch.isfinite(torch.tensor(_train_step(model, optimizer, x)))


class _FlatState(torch.optim.Optimizer):
    """Keeps one flat buffer per parameter (not shaped like it): cannot be sliced slot by slot."""

    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p].setdefault("flat", torch.zeros(p.numel())).add_(p.grad.flatten())
                    p.data.add_(p.grad, alpha=-group["lr"])


def test_unsliceable_state_is_refused_before_anything_changes():
    model, x = _cnn(), torch.randn(4, 3, 8, 8)
    optimizer = _FlatState(model.parameters())
    _train_step(model, optimizer, x)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(nrfx.OptimizerStateError, match="carry_state=False"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, align=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, carry_state=False,
                    align=1)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert all(not optimizer.state.get(p) or optimizer.state[p]["flat"].numel() == p.numel()
               for p in model.parameters())


def test_optimizer_needs_inplace():
    model, x = _cnn(), torch.randn(2, 3, 8, 8)
    with pytest.raises(nrfx.InputError, match="inplace=True"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# -- what the user's code pins, hooks, failures -----------------------------------------------
class Split(nn.Module):
    """The forward slices channels with a literal: in place those channels cannot move."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.tail = nn.Conv2d(8, 8, 1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(torch.relu(self.bn2(self.tail(y[:, :8]))))


def test_spaces_the_code_pins_are_frozen_with_the_reason():
    model, x = Split().eval(), torch.randn(2, 3, 8, 8)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=2)
    _check_in_place(model, x, scheme="cr", align=1)
    notes = " ".join(model.nrfx_plan.notes)
    assert "in place" in notes and "spells channel bounds" in notes
    changed = model.nrfx_param_map
    assert "conv.weight" not in changed and "bn.weight" not in changed  # the pinned space is kept as it was
    assert "tail.weight" in changed and changed["tail.weight"].dims[0].kept.numel() < 8  # the free one is rejuvenated


def test_hooks_follow_a_swapped_layer():
    model, x = _cnn().eval(), torch.randn(2, 3, 8, 8)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=2)
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, scheme="ca", align=1)
    seen.clear()
    with torch.no_grad():
        model(x)
    assert isinstance(model[3], SR_LAYERS) and seen == [model[3].out_channels]


def test_a_failed_check_leaves_the_model_as_it_was(monkeypatch):
    model, x = _cnn().eval(), torch.randn(2, 3, 8, 8)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    monkeypatch.setattr("nrfx.rewrite.inplace._difference", lambda mine, expected: "output 0: forced")
    with pytest.raises(nrfx.RewriteError, match="left as it was"):
        nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, scheme="cr", align=1)
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    _sizes_agree(model)


# -- save and load ---------------------------------------------------------------------------
def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("scheme", ["nr", "ca"])
def test_two_rounds_save_and_load_into_a_fresh_instance(scheme):
    model, x = _cnn().eval(), torch.randn(2, 3, 8, 8)
    fresh = _cnn().eval()
    assert nrfx.load_rejuvenated(fresh, _round_trip(model.state_dict())) is not None  # before any round: as usual
    for seed in (2, 3):
        kill_per_norm(model, nrfx.analyze(model, x), 0.3, seed=seed)
        nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, scheme=scheme, align=1)
    state = _round_trip(model.state_dict())
    assert "nrfx_plans" in state
    nrfx.load_rejuvenated(fresh, state)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    again = _round_trip(fresh.state_dict())
    fresh.load_state_dict(again)  # the same history: loads as usual
    other = _cnn().eval()
    kill_per_norm(other, nrfx.analyze(other, x), 0.5, seed=9)
    nrfx.rejuvenate(other, None, None, example_inputs=x, inplace=True, align=1)
    with pytest.raises(RuntimeError, match="rejuvenated differently"):
        other.load_state_dict(state)


# -- the driver in place -------------------------------------------------------------------------
def _task_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 3, 8, 8, generator=generator)
    return x, (x.mean((1, 2, 3)) > 0).long()


def _drive(nr: nrfx.NeuralRejuvenation, steps: int, generator: torch.Generator, until=None) -> list[float]:
    losses = []
    for _ in range(steps):
        x, y = _task_batch(generator)
        loss = nn.functional.cross_entropy(nr.model(x)[:, :2], y)
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()
        nr.scheduler.step()
        losses.append(loss.item())
        if until is not None and until(nr):
            break
    return losses


def _driver(model: nn.Module, optimizer: torch.optim.Optimizer, **options) -> nrfx.NeuralRejuvenation:
    return nrfx.NeuralRejuvenation(model, optimizer, example_inputs=torch.zeros(2, 3, 8, 8), interval=5,
                                   delta_lambda=5e-3, target=0.8, seed=5, align=1, inplace=True,
                                   scheduler_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 50, 0.5), **options)


@pytest.mark.parametrize("scheme", ["nr", "cr"])
def test_driver_in_place_keeps_the_users_objects_and_resumes(scheme):
    model = _cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    nr = _driver(model, optimizer, scheme=scheme)
    scheduler = nr.scheduler
    generator = torch.Generator().manual_seed(0)
    _drive(nr, 2000, generator, until=lambda d: d.rounds >= 1)
    assert nr.rounds == 1 and nr.model is model and nr.module is model and nr.optimizer is optimizer
    assert nr.scheduler is scheduler and scheduler.optimizer is optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    losses = _drive(nr, 20, generator)
    assert all(torch.isfinite(torch.tensor(losses)))
    state = _round_trip(nr.state_dict())
    fresh_model = _cnn()
    fresh = _driver(fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9), scheme=scheme)
    fresh.load_state_dict(state)
    assert fresh.module is fresh_model and fresh.rounds == nr.rounds >= 1
    x = torch.randn(3, 3, 8, 8)
    model.eval(), fresh_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh_model(x), model(x))
    assert fresh.optimizer.state_dict()["state"].keys() == nr.optimizer.state_dict()["state"].keys()


# -- other captures: torch.export (a Hugging Face model) and islands ------------------------------
@pytest.mark.third_party
def test_hugging_face_model_captured_by_export_in_place():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    original, params = copy.deepcopy(model), set(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.3), example_inputs=(ids,), inplace=True) is model
        graph = nrfx.apply_plan(original, model.nrfx_plan, (ids,))
    assert model.nrfx_plan.capture == "export" and type(model) is transformers.BertModel
    assert params <= set(model.parameters()) and model.encoder.layer[0].intermediate.dense.out_features > 64
    _sizes_agree(model)
    probe = torch.randint(0, 100, (3, 8))
    with torch.no_grad():
        expected = graph(probe)
        expected = expected["last_hidden_state"] if isinstance(expected, dict) else expected[0]
        torch.testing.assert_close(model(probe).last_hidden_state, expected)
        fresh = transformers.BertModel(config).eval()
        nrfx.load_rejuvenated(fresh, _round_trip(model.state_dict()), (ids,))
        torch.testing.assert_close(fresh(probe).last_hidden_state, model(probe).last_hidden_state)


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class _Islands(nn.Module):
    """A root forward that reads a value as a Python int: neither fx nor export captures it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = _Body(), nn.Linear(16, 4)

    def forward(self, x):
        y = self.body(x).mean((2, 3))
        return self.head(y) * (1 if int((y > 0).sum()) >= 0 else 2)


def test_islands_in_place():
    torch.manual_seed(0)
    model, x = _Islands().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.body.b1.weight[:6], model.body.b1.bias[:6] = 0, 0
        expected = model(x)
    params, body = set(model.parameters()), model.body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, scheme="cr", align=1)
    assert set(model.nrfx_plans) >= {"body"} and model.body is body and params <= set(model.parameters())
    assert model.body.c1.out_channels == model.body.b1.num_features != 16 or "body.c1.weight" in model.nrfx_param_map
    with torch.no_grad():
        torch.testing.assert_close(model(torch.randn(3, 3, 8, 8)).shape, torch.Size([3, 4]))
        torch.testing.assert_close(model(x), expected)
        fresh = _Islands().eval()
        nrfx.load_rejuvenated(fresh, _round_trip(model.state_dict()), x)
        torch.testing.assert_close(fresh(x), model(x))


def test_gated_transformer_in_place():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = nrfx.add_gates(model, x)
        with torch.no_grad():
            for path in gated.nrfx_gates:
                gate = gated.get_submodule(path)
                gate.weight[torch.randperm(gate.weight.numel())[: gate.weight.numel() // 3]] = 0
            expected = gated(x)
        original, params, cls = copy.deepcopy(gated), set(gated.parameters()), type(gated)
        nrfx.rejuvenate(gated, None, None, example_inputs=x, inplace=True, scheme="ca")
        graph = nrfx.apply_plan(original, gated.nrfx_plan, x)
    assert type(gated) is cls and params <= set(gated.parameters())
    assert any(name.endswith("fc1.weight") for name in gated.nrfx_param_map)  # the MLPs were rejuvenated
    probe = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gated(probe), graph(probe))


class _Wrapper(nn.Module):
    """A model holding the rejuvenated network as a submodule (as a LightningModule does)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        return self.net(x)


def test_a_rejuvenated_submodule_reloads_through_its_prefix():
    outer, x = _Wrapper().eval(), torch.randn(2, 3, 8, 8)
    kill_per_norm(outer.net, nrfx.analyze(outer.net, x), 0.4, seed=4)
    nrfx.rejuvenate(outer.net, None, None, example_inputs=x, inplace=True, scheme="cr", align=1)
    state = _round_trip(outer.state_dict())
    assert "net.nrfx_plans" in state
    fresh = _Wrapper().eval()
    nrfx.load_rejuvenated(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), outer(x))


def test_a_bias_a_constant_fold_creates_joins_the_model_and_the_optimizer():
    """Dead channels emitting constants (γ = 0, β ≠ 0) into a bias-free unpadded conv: the fold gives that conv a
    bias; in place it is registered on the user's layer and joins the optimizer's group beside the weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 16, 10, stride=5, bias=False), nn.GroupNorm(16, 16), nn.GELU(),
                          nn.Conv1d(16, 24, 3, stride=2, bias=False), nn.GELU(), nn.AdaptiveAvgPool1d(1),
                          nn.Flatten(), nn.Linear(24, 4)).double().eval()
    x = torch.randn(2, 1, 200, dtype=torch.float64)
    with torch.no_grad():
        dead = torch.tensor([1, 4, 5, 9, 12])
        model[1].weight[dead] = 0
        model[1].bias[dead] = torch.randn(len(dead), dtype=torch.float64)
        expected = model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    conv = model[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, align=1)
    assert model[3] is conv and isinstance(conv.bias, nn.Parameter)
    group = optimizer.param_groups[0]["params"]
    assert any(p is conv.bias for p in group)
    assert {id(p) for p in group} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-10)


def _channels_last(t: torch.Tensor) -> bool:
    """Dense in the channels-last format of its rank (and not merely contiguous, for a tensor where they differ)."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
@pytest.mark.parametrize("dims", [2, 3])
def test_a_channels_last_model_keeps_its_memory_format(dims, scheme, inplace):
    """model.to(memory_format=channels_last) before a rejuvenation: every resized or split ≥4-d weight and its
    momentum come out channels-last too (a GPU runs mixed layouts with a conversion per layer), the function kept;
    a model left contiguous stays contiguous."""
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 16, 3, padding=1), norm(16), nn.ReLU(), conv(16, 24, 3, padding=1), norm(24),
                          nn.ReLU(), conv(24, 16, 1), norm(16), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(3, 3, *([6] * dims))
    model(x)
    kill_per_norm(model, nrfx.analyze(model, x), 0.4, seed=1)
    for keep_layout in (True, False):
        subject = copy.deepcopy(model).to(memory_format=layout) if keep_layout else copy.deepcopy(model)
        optimizer = torch.optim.SGD(subject.parameters(), lr=0.1, momentum=0.9)
        _train_step(subject, optimizer, x)
        subject.eval()
        expected = subject(x)
        options = dict(inplace=True, optimizer=optimizer) if inplace else {}
        result = nrfx.rejuvenate(subject, None, None, example_inputs=x, scheme=scheme, constants="keep", align=1,
                                 **options).eval()
        torch.testing.assert_close(result(x), expected, rtol=1e-5, atol=1e-5)
        weights = [p for p in result.parameters() if p.dim() == dims + 2]
        assert len(weights) >= 3 and any(isinstance(m, SR_LAYERS) for m in result.modules()) == (scheme != "nr")
        if keep_layout:
            assert all(map(_channels_last, weights))
            assert sum(not p.is_contiguous() for p in weights) >= 2  # the 3×3 ones, where the two formats differ
        else:
            assert all(p.is_contiguous() for p in weights)
        if inplace:
            momenta = [(p, optimizer.state[p]["momentum_buffer"]) for p in weights if p in optimizer.state]
            assert momenta and all(m.shape == p.shape for p, m in momenta)
            assert all(_channels_last(m) if keep_layout else m.is_contiguous() for _, m in momenta)


def _reordered_net() -> nn.Sequential:
    """Two conv-BN stages whose dead channels sit before live ones (the rewrite moves survivors first)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).double()
    with torch.no_grad():
        model[1].weight[[1, 4]] = 0
        model[1].bias[[1, 4]] = 0
    return model


@pytest.mark.parametrize("realloc", [True, False], ids=["realloc", "nr-ip"])
def test_in_place_clears_the_grads_of_every_rewritten_parameter(realloc):
    """A parameter whose entries the rewrite moved (survivors first) keeps its shape under NR-IP, but its old grad
    belongs to other channels now: every rewritten parameter's grad is cleared (it kept the old order, and a step
    right after the rewrite applied it to the wrong channels); those the plan leaves alone keep theirs."""
    model = _reordered_net()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model(x).square().mean().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nrfx.rejuvenate(model, None, None, example_inputs=x, inplace=True, optimizer=optimizer, align=1, realloc=realloc)
    rewritten = set(model.nrfx_param_map)
    assert "0.weight" in rewritten and "8.bias" not in rewritten
    for name, parameter in model.named_parameters():
        assert (parameter.grad is None) == (name in rewritten), name


def test_load_rejuvenated_replays_a_float64_model_without_example_inputs():
    """An fx plan replays on zeros of its input shapes, made in the model's dtype (float32 zeros met a float64 model
    with an InputError, though the docs ask for example inputs only for export plans)."""
    model = _reordered_net().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, inplace=True, align=1)
    fresh = _reordered_net().eval()
    nrfx.load_rejuvenated(fresh, model.state_dict())
    replayed = nrfx.apply_plan(_reordered_net().eval(), model.nrfx_plan)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
        assert replayed(x).dtype == torch.float64
