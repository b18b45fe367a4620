"""The training driver: Algorithm 1 with adaptive λ, rejuvenation, optimizer-state carry-over, exact resume."""

from __future__ import annotations

import copy
import json
import statistics
import warnings

import pytest
import torch
from support import EXAMPLE, Task, small_cnn, zero_scales
from torch import nn

import nrfx
from nrfx.errors import BudgetError, NrfxError, NrfxWarning
from nrfx.rewrite.optim_state import dense_states
from nrfx.train.driver import DriverError, NeuralRejuvenation, plot_history

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train(nr: NeuralRejuvenation, task: Task, steps: int, until=None) -> list[float]:
    """Plain training loop through the driver; stops early when ``until(nr)`` holds."""
    losses = []
    for _ in range(steps):
        x, y = task.batch()
        loss = nn.functional.cross_entropy(nr.model(x), y)
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()
        losses.append(loss.item())
        if until is not None and until(nr):
            break
    return losses


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- Algorithm 1 on a learnable task ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """SGD+momentum driver trained until one rejuvenation and 150 steps beyond."""
    torch.set_num_threads(1)
    original = small_cnn()
    nr = NeuralRejuvenation(copy.deepcopy(original), sgd, example_inputs=EXAMPLE, interval=10,
                            delta_lambda=3e-3, target=0.5, seed=7)
    task = Task()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NrfxWarning)
        losses = train(nr, task, 3000, until=lambda d: d.rounds >= 1)
        losses += train(nr, task, 150)
    return {"nr": nr, "original": original, "task": task, "losses": losses, "history": list(nr.history),
            "params": n_params(nr.module), "rounds": nr.rounds, "warnings": [str(w.message) for w in caught]}


def test_rejuvenates_within_budget_and_keeps_learning(trained):
    nr, losses, history = trained["nr"], trained["losses"], trained["history"]
    events = [h for h in history if h["event"] == "rejuvenate"]
    assert trained["rounds"] >= 1 and len(events) == trained["rounds"]
    assert events[0]["step"] < 3000
    budget = nr.budget.params
    assert budget == n_params(trained["original"])  # default budget: c(A) of the initial model, in params
    assert trained["params"] <= budget
    assert all(h["cost"] <= budget for h in events)
    assert all(h["r"] < 0.5 for h in events) and all(h["lam"] == 0.0 for h in events)
    assert statistics.mean(losses[-100:]) < statistics.mean(losses[:50]) - 0.1
    assert [type(m).__name__ for m in nr.module.modules()].count("BatchNorm2d") == 3


def test_lambda_follows_the_rule_in_history(trained):
    history, seen = trained["history"], 0
    for prev, now, nxt in zip(history, history[1:], history[2:], strict=False):
        if {prev["event"], now["event"], nxt["event"]} != {"check"}:
            continue
        # a record holds λ before its own update: λ stays when r fell by more than Δr, else grows by Δλ
        grow = 0.0 if now["r"] < prev["r"] - 0.01 else 3e-3
        assert nxt["lam"] == pytest.approx(now["lam"] + grow)
        seen += 1
    assert seen > 10 and max(h["lam"] for h in history) > 0


def test_resume_is_bit_identical(trained):
    nr, task = trained["nr"], trained["task"]
    state = copy.deepcopy(nr.state_dict())
    json.dumps(state["plans"])  # plans are plain data
    fresh = NeuralRejuvenation(copy.deepcopy(trained["original"]), sgd, example_inputs=EXAMPLE, interval=10,
                               delta_lambda=3e-3, target=0.5, seed=7)
    fresh.load_state_dict(state)
    assert fresh.rounds == nr.rounds and fresh.lam == nr.lam and fresh.steps == nr.steps
    assert [tuple(p.shape) for p in fresh.module.parameters()] == [tuple(p.shape) for p in nr.module.parameters()]
    for _ in range(25):  # crosses checks (interval 10): λ updates and r agree too
        x, y = task.batch()
        for driver in (nr, fresh):
            loss = nn.functional.cross_entropy(driver.model(x), y)
            driver.optimizer.zero_grad()
            loss.backward()
            driver.step()
        for (name, a), b in zip(nr.module.state_dict().items(), fresh.module.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert fresh.history == nr.history and fresh.lam == nr.lam


def test_resume_before_any_rejuvenation():
    original, task = small_cnn(), Task(seed=5)
    nr = NeuralRejuvenation(copy.deepcopy(original), adam, example_inputs=EXAMPLE, interval=5, delta_lambda=1e-2)
    train(nr, task, 12)
    assert nr.lam > 0 and nr.rounds == 0
    fresh = NeuralRejuvenation(copy.deepcopy(original), adam, example_inputs=EXAMPLE, interval=5, delta_lambda=1e-2)
    fresh.load_state_dict(copy.deepcopy(nr.state_dict()))
    x, y = task.batch()
    for driver in (nr, fresh):
        driver.optimizer.zero_grad()
        nn.functional.cross_entropy(driver.model(x), y).backward()
        driver.step()
    assert all(torch.equal(a, b) for a, b in zip(nr.module.parameters(), fresh.module.parameters(), strict=True))


# -- optimizer state carried slice by slice -----------------------------------------------------
def _state_by_name(nr: NeuralRejuvenation) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state per dense parameter name (an S/R layer's blocks joined into its weight and bias)."""
    return {name: {k: v.clone() for k, v in state.items()}
            for name, state in dense_states(nr.optimizer, nr.module).items()}


def _assert_sliced(old: torch.Tensor, new: torch.Tensor, pmap, fill: float = 0.0, cross: bool = False) -> None:
    """new[S…] == old[source…] wherever every dim is a surviving slot, ``fill`` elsewhere (``cross``: or zero,
    the cr cross blocks a joined state spells as zero because cr stores none)."""
    survive = torch.ones(new.shape, dtype=torch.bool)
    gathered = old
    for m in pmap.dims:
        shape = [1] * new.dim()
        shape[m.dim] = -1
        survive &= (m.source >= 0).reshape(shape)
        gathered = gathered.index_select(m.dim, m.source.clamp(min=0))
    assert torch.equal(new[survive], gathered[survive])
    rest = new[~survive]
    assert rest.numel() and bool((rest == fill).any())
    assert bool(((rest == fill) | (cross and rest == 0)).all())


@pytest.mark.parametrize("factory", [sgd, adam], ids=["sgd-momentum", "adam"])
def test_surviving_slices_keep_their_optimizer_state(factory):
    nr = NeuralRejuvenation(small_cnn(), factory, example_inputs=EXAMPLE, interval=None, target=0.9, seed=3)
    train(nr, Task(), 20)
    zero_scales(nr.module, 0.5)
    before = _state_by_name(nr)
    assert nr.check()["event"] == "rejuvenate"
    after, maps = _state_by_name(nr), nr.module.nrfx_param_map
    assert after.keys() == before.keys() and maps
    for name, state in after.items():
        assert state.keys() == before[name].keys()
        for key, value in state.items():
            if value.dim() == 0 or name not in maps:
                assert torch.equal(value, before[name][key]), (name, key)
            else:
                _assert_sliced(before[name][key], value, maps[name])
    assert any((m.source < 0).any() for pm in maps.values() for m in pm.dims)  # some slots were rejuvenated


@pytest.mark.parametrize(("factory", "fills"), [
    (lambda g: torch.optim.Adagrad(g, lr=0.05, initial_accumulator_value=0.3), {"sum": 0.3}),
    (lambda g: torch.optim.Rprop(g, lr=0.02), {"step_size": 0.02, "prev": 0.0}),
], ids=["adagrad", "rprop"])
@pytest.mark.parametrize("scheme", ["nr", "cr"])
def test_new_slots_start_where_a_fresh_optimizer_starts_them(factory, fills, scheme):
    nr = NeuralRejuvenation(small_cnn(), factory, example_inputs=EXAMPLE, interval=None, target=0.9, seed=3,
                            scheme=scheme)
    train(nr, Task(), 5)
    zero_scales(nr.module, 0.5)
    before = _state_by_name(nr)
    assert nr.check()["event"] == "rejuvenate"
    maps = nr.module.nrfx_param_map
    sliced = 0
    for name, state in _state_by_name(nr).items():
        for key, fill in fills.items():
            if name in maps:
                _assert_sliced(before[name][key], state[key], maps[name], fill, cross=scheme == "cr")
                sliced += 1
    assert sliced >= len(fills)
    train(nr, Task(), 2)


SCHEME_CASES = [("nr", False), ("nr", True), ("cr", False), ("ca", True)]


@pytest.mark.parametrize(("scheme", "rescale"), SCHEME_CASES)
def test_two_rounds_carry_state_and_resume_for_each_scheme(scheme, rescale):
    original, task = small_cnn(), Task()
    settings = {"example_inputs": EXAMPLE, "interval": None, "target": 0.9, "scheme": scheme, "rescale": rescale}
    nr = NeuralRejuvenation(copy.deepcopy(original), adam, **settings)
    for _ in range(2):
        train(nr, task, 10)
        zero_scales(nr.module, 0.5)
        before = _state_by_name(nr)
        assert nr.check()["event"] == "rejuvenate"
        maps = nr.module.nrfx_param_map
        for name, state in _state_by_name(nr).items():
            for key, value in state.items():
                if value.dim() and name in maps:
                    _assert_sliced(before[name][key], value, maps[name])
                else:
                    assert torch.equal(value, before[name][key])
    train(nr, task, 3)
    fresh = NeuralRejuvenation(copy.deepcopy(original), adam, **settings)
    fresh.load_state_dict(copy.deepcopy(nr.state_dict()))
    x, y = task.batch()
    for driver in (nr, fresh):
        driver.optimizer.zero_grad()
        nn.functional.cross_entropy(driver.model(x), y).backward()
        driver.step()
    assert all(torch.equal(a, b) for a, b in zip(nr.module.state_dict().values(), fresh.module.state_dict().values(),
                                                 strict=True))


def test_lr_schedule_continues_or_restarts():
    def schedule(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    for restart, expected in ((False, 0.05 * 0.5**3), (True, 0.05)):
        nr = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None, target=0.9,
                                scheduler_factory=schedule, restart_schedule=restart)
        train(nr, Task(), 3)
        for _ in range(3):
            nr.scheduler.step()
        zero_scales(nr.module)
        nr.check()
        assert nr.rounds == 1 and nr.scheduler.optimizer is nr.optimizer
        assert nr.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert nr.scheduler.last_epoch == (0 if restart else 3)


# -- the penalty and the λ rule, in closed form --------------------------------------------------
def test_penalty_is_lambda_sign_gamma_on_free_norms():
    model = small_cnn()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        norms[0].weight[:3] *= -1
    nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=1.0), example_inputs=EXAMPLE, interval=None)
    nr.lam = 0.25
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    nr.step()
    for name, p in model.named_parameters():
        is_gamma = any(p is m.weight for m in norms)
        expected = before[name] - 0.25 * torch.sign(before[name]) if is_gamma else before[name]
        assert torch.equal(p.detach(), expected), name


def test_lambda_rule_and_max_rounds():
    model = small_cnn()
    nr = NeuralRejuvenation(model, sgd, example_inputs=EXAMPLE, interval=None, delta_r=0.01, delta_lambda=0.5,
                            max_rounds=1)
    assert nr.check()["lam"] == 0.0 and nr.lam == 0.5  # r did not fall: λ += Δλ
    with torch.no_grad():
        model[1].weight[:4] = 0  # r falls by more than Δr: λ stays
    nr.check()
    assert nr.lam == 0.5
    nr.check()
    assert nr.lam == 1.0
    zero_scales(model, 0.75)
    record = nr.check()
    assert record["event"] == "rejuvenate" and nr.lam == 0.0 and nr.rounds == 1 and nr.finished
    zero_scales(nr.module, 0.75)
    assert nr.check()["event"] == "monitor" and nr.rounds == 1 and nr.lam == 0.0  # max_rounds reached


# -- the official code's CIFAR mode: fixed λ, fresh optimizer, restarted schedule ------------------
def test_fixed_lambda_from_step_zero_and_after_the_rejuvenation():
    model = small_cnn()
    nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(p, lr=1.0), example_inputs=EXAMPLE, interval=None,
                            lam=0.125, delta_lambda=0.0)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.weight.detach().clone() for m in norms]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    nr.step()  # the very first step is penalised with the initial λ
    for m, old in zip(norms, before, strict=True):
        assert torch.equal(m.weight.detach(), old - 0.125 * torch.sign(old))
    for _ in range(3):
        assert nr.check()["lam"] == 0.125 and nr.lam == 0.125  # r does not fall: Δλ = 0 keeps λ
    zero_scales(nr.module)
    assert nr.check()["event"] == "rejuvenate" and nr.rounds == 1
    assert nr.lam == 0.125  # back to the initial λ, which is the fixed one


@pytest.mark.parametrize("lam", [-1e-4, float("nan"), float("inf"), "0.1"])
def test_bad_initial_lambda(lam):
    with pytest.raises(DriverError, match="lam"):
        NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, lam=lam)


@pytest.mark.parametrize("carry", [True, False])
def test_carry_state_false_builds_a_fresh_optimizer(carry):
    nr = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None, target=0.9, carry_state=carry)
    train(nr, Task(), 5)
    zero_scales(nr.module)
    assert nr.check()["event"] == "rejuvenate"
    held = [p for p in nr.module.parameters() if p in nr.optimizer.state]
    if carry:
        assert held and all("momentum_buffer" in nr.optimizer.state[p] for p in held)
    else:
        assert not nr.optimizer.state  # momentum is lost, as in the official code
        assert nr.optimizer.param_groups[0]["lr"] == 0.05


def test_restarted_schedule_counts_its_milestones_from_the_rejuvenation():
    def schedule(optimizer):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2, 3], gamma=0.1)

    nr = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None, target=0.9,
                            scheduler_factory=schedule, restart_schedule=True, carry_state=False)
    for _ in range(3):  # epochs before the rejuvenation: the old schedule decays to 0.05 · 0.01
        nr.scheduler.step()
    assert nr.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    zero_scales(nr.module)
    nr.check()
    lrs = [nr.optimizer.param_groups[0]["lr"]]
    for _ in range(3):
        nr.scheduler.step()
        lrs.append(nr.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.05, 0.05, 5e-3, 5e-4])  # the full schedule again, from epoch 0


def test_device_and_dtype_follow_the_model():
    model = small_cnn().double()
    nr = NeuralRejuvenation(model, sgd, example_inputs=EXAMPLE.double(), interval=None, target=0.9, lam=1e-3)
    task = Task()
    for _ in range(3):
        x, y = task.batch()
        loss = nn.functional.cross_entropy(nr.model(x.double()), y)
        nr.optimizer.zero_grad()
        loss.backward()
        nr.step()
    zero_scales(nr.module)
    assert nr.check()["event"] == "rejuvenate"
    assert all(p.dtype == torch.float64 for p in nr.module.parameters())
    assert all(m is None or m.dtype == torch.float64 for _, _, m in nr._stage.norms)
    assert all(v.dtype == torch.float64 for state in nr.optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim())
    x, y = task.batch()
    nn.functional.cross_entropy(nr.model(x.double()), y).backward()
    nr.step()


# -- the collapse warning -----------------------------------------------------------------------
def test_collapse_on_an_exact_fit_warns_once_naming_lambda():
    """A task the net fits exactly (one class, blank images): the loss gives γ no gradient, so the L1 term
    shrinks every γ together, the relative dead test never fires and λ would grow without end."""
    x, y = torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)
    nr = NeuralRejuvenation(small_cnn(width=8), lambda p: torch.optim.SGD(p, lr=0.05), example_inputs=EXAMPLE,
                            interval=5, delta_lambda=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NrfxWarning)
        losses = []
        for _ in range(600):
            loss = nn.functional.cross_entropy(nr.model(x), y)
            nr.optimizer.zero_grad()
            loss.backward()
            nr.step()
            losses.append(loss.item())
    assert losses[-1] < 0.05 and nr.rounds == 0 and all(h["r"] == 1.0 for h in nr.history)
    messages = [str(w.message) for w in caught if issubclass(w.category, NrfxWarning)]
    assert len(messages) == 1 and "shrink together" in messages[0]  # once, not at every later check
    assert "delta_lambda" in messages[0] and "loss is not ~0" in messages[0]
    (record,) = [h for h in nr.history if h.get("collapsed")]
    assert record["lam"] > 0.05 and f"λ = {record['lam']:.3g}" in messages[0]
    scales = [m.weight.abs().max().item() for m in nr.module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert max(scales) < 0.2  # every norm shrank together, far below its initial 1


def test_no_collapse_warning_on_a_healthy_run(trained):
    assert not [m for m in trained["warnings"] if "shrink together" in m]
    assert not any(h.get("collapsed") for h in trained["history"])


# -- bad inputs: clear errors, nothing half-rewritten -------------------------------------------
def _snapshot(nr: NeuralRejuvenation):
    return (nr.model, nr.module, nr.optimizer, nr.analysis, nr.rounds, nr.lam, list(nr.history),
            {k: v.clone() for k, v in nr.module.state_dict().items()})


def _assert_same(nr: NeuralRejuvenation, snap) -> None:
    model, module, optimizer, analysis, rounds, lam, history, state = snap
    assert nr.model is model and nr.module is module and nr.optimizer is optimizer and nr.analysis is analysis
    assert (nr.rounds, nr.lam, nr.history) == (rounds, lam, history)
    assert all(torch.equal(v, state[k]) for k, v in nr.module.state_dict().items())


def test_factory_ignoring_the_given_params():
    other = small_cnn(seed=1)
    with pytest.raises(DriverError, match="exactly the parameters"):
        NeuralRejuvenation(small_cnn(), lambda p: torch.optim.SGD(other.parameters(), lr=0.1), example_inputs=EXAMPLE)
    with pytest.raises(DriverError, match=r"torch\.optim\.Optimizer"):
        NeuralRejuvenation(small_cnn(), lambda p: None, example_inputs=EXAMPLE)
    # the captured model's parameters pass at first, and are stale after a rejuvenation
    model = small_cnn()
    nr = NeuralRejuvenation(model, lambda p: torch.optim.SGD(model.parameters(), lr=0.1), example_inputs=EXAMPLE,
                            interval=None)
    zero_scales(model)
    snap = _snapshot(nr)
    with pytest.raises(DriverError, match="exactly the parameters"):
        nr.check()
    _assert_same(nr, snap)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5, -0.2, float("nan")])
def test_target_outside_unit_interval(target):
    with pytest.raises(DriverError, match=r"\(0, 1\)"):
        NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, target=target)


def test_models_without_a_norm_to_monitor():
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
    with pytest.raises(DriverError, match=r"no norm scale to monitor.*none of its 12 channels has one \(67% are "
                       r"free\)\. Give them a gate: build the driver on nrfx\.add_gates\(model, example_inputs\).*"
                       r"nrfx rejuvenate MODEL --add-gates"):
        NeuralRejuvenation(plain, sgd, example_inputs=EXAMPLE)
    gated = nrfx.add_gates(plain, EXAMPLE)  # the way out the message names
    assert sorted(NeuralRejuvenation(gated, sgd, example_inputs=EXAMPLE).masks()) == ["0_gate"]
    head_norm = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4))  # its space reaches the output
    with pytest.raises(DriverError, match="no norm scale to monitor.*every channel space is frozen: check "
                                          r"analysis\.frozen_spaces") as caught:
        NeuralRejuvenation(head_norm, sgd, example_inputs=EXAMPLE)
    assert "add_gates" not in str(caught.value)


def test_failures_at_rejuvenation_leave_the_driver_as_it_was():
    calls = []

    def flaky(params):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("factory broke")
        return sgd(params)

    nr = NeuralRejuvenation(small_cnn(), flaky, example_inputs=EXAMPLE, interval=None)
    zero_scales(nr.module)
    snap = _snapshot(nr)
    with pytest.raises(RuntimeError, match="factory broke"):
        nr.check()
    _assert_same(nr, snap)
    tiny = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None, budget=50)
    zero_scales(tiny.module)
    snap = _snapshot(tiny)
    with pytest.raises(BudgetError):
        tiny.check()
    _assert_same(tiny, snap)


def test_bad_settings_and_checkpoints():
    for kwargs in ({"interval": 0}, {"delta_lambda": -1.0}, {"max_rounds": -1}, {"scheme": "xx"},
                   {"gamma0": "median"}, {"gamma0": -1.0}):
        with pytest.raises(DriverError):
            NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, **kwargs)
    nr = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None)
    with pytest.raises(DriverError, match="not a NeuralRejuvenation"):
        nr.load_state_dict({"model": {}})
    zero_scales(nr.module)
    nr.check()
    with pytest.raises(DriverError, match="fresh copy"):
        nr.load_state_dict(nr.state_dict())
    wrong = NeuralRejuvenation(small_cnn(width=12), sgd, example_inputs=EXAMPLE, interval=None)
    snap = _snapshot(wrong)
    with pytest.raises(NrfxError):
        wrong.load_state_dict(nr.state_dict())
    _assert_same(wrong, snap)


def test_matched_gamma0_reaches_the_rejuvenation():
    nr = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=None, gamma0="match")
    with torch.no_grad():
        for i, m in enumerate(m for m in nr.module.modules() if isinstance(m, nn.BatchNorm2d)):
            m.weight.copy_(torch.linspace(0.1, 0.1 * (i + 2), m.num_features))
    zero_scales(nr.module)
    survivors = [m.weight[m.weight != 0].clone() for m in nr.module.modules() if isinstance(m, nn.BatchNorm2d)]
    nr.check()
    assert nr.rounds == 1
    norms = [(n, m) for n, m in nr.module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for (name, norm), kept in zip(norms, survivors, strict=True):
        new = nr.module.nrfx_param_map[f"{name}.weight"].dims[0].source < 0
        assert new.any()
        torch.testing.assert_close(norm.weight[new], kept.median().expand(int(new.sum())))


# -- history, plot, progress ----------------------------------------------------------------------
def test_history_json_plot_and_progress(tmp_path, trained):
    nr = trained["nr"]
    nr.save_history(str(tmp_path / "h.json"))
    assert json.loads((tmp_path / "h.json").read_text()) == nr.history
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.warns(NrfxWarning, match="matplotlib"):
            assert plot_history(nr.history, str(tmp_path / "h.png")) is False
        assert not (tmp_path / "h.png").exists()
    else:
        assert nr.plot_history(str(tmp_path / "h.png")) is True and (tmp_path / "h.png").stat().st_size > 0
    for kind in ("tqdm", "rich"):
        bar = NeuralRejuvenation(small_cnn(), sgd, example_inputs=EXAMPLE, interval=2, progress=kind, total=4)
        train(bar, Task(), 4)
        if kind == "tqdm":
            assert bar._progress.bar.n == 4
        else:
            assert bar._progress.bar.tasks[0].completed == 4
        bar.close()
        assert bar._progress is None


def test_exported():
    assert nrfx.NeuralRejuvenation is NeuralRejuvenation


def test_example_stops_cleanly_without_data(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "fashion_mnist_vgg.py"
    spec = importlib.util.spec_from_file_location("fashion_mnist_vgg", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--data", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
