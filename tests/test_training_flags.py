"""Dropout-like calls that read ``self.training`` keep following ``.train()``/``.eval()`` after a rewrite.

FX traces in eval mode, so ``F.dropout(x, p, self.training)``, torchvision's ``stochastic_depth`` and timm's
``drop_path`` would be recorded with ``training=False`` and never drop again; the tracer makes them read the
calling module's flag when the graph runs (``nrfx.capture.trace``)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from support import zero_scales
from torch import nn

import nrfx


def _timm():
    return pytest.importorskip("timm")


class Head(nn.Module):
    """conv-bn, then functional dropouts: one reads the module's flag; one has p = 0, one is forced off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        y = F.dropout(y, 0.5, self.training) + F.dropout(y, 0.0, self.training) + F.dropout(y, 0.5, training=True)
        return self.fc(y)


def _dropped(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether two runs with different seeds differ (something random is applied)."""
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    return not torch.equal(first, model(x))


def test_a_functional_dropout_follows_the_rewritten_models_mode():
    model = Head().eval()
    x = torch.randn(4, 3, 6, 6)
    analysis = nrfx.analyze(model, x)
    calls = [n for n in analysis.gm.graph.nodes if n.target is F.dropout]
    flags = [n.args[2] if len(n.args) > 2 else n.kwargs["training"] for n in calls]
    assert [f.target.__name__ if isinstance(f, torch.fx.Node) else f for f in flags] == ["by_mode", False, True]
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(2.0), example_inputs=x, analysis=analysis)
    assert sum(new.nrfx_plan.grow) > 0
    assert _dropped(new.eval(), x) and _dropped(model.eval(), x)  # training=True stays on, as in the original


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_only_the_flag_read_from_the_module_turns_off_in_eval_mode(traced_in):
    class Flagged(Head):
        def forward(self, x):
            return self.fc(F.dropout(self.bn(self.conv(x)).mean((2, 3)), 0.5, self.training))

    model = Flagged().train(traced_in == "train")  # the driver analyses and rewrites a model in train mode
    x = torch.randn(4, 3, 6, 6)
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(2.0), example_inputs=x)
    assert sum(new.nrfx_plan.grow) > 0
    assert not _dropped(new.eval(), x)  # traced in train mode, a baked True dropped in eval mode too
    assert _dropped(new.train(), x)  # traced in eval mode, a baked False never dropped
    assert not _dropped(new.eval(), x)
    pickled = io.BytesIO()
    torch.save(new, pickled)  # pickling traces the code again: the flag is read when the graph runs, still
    pickled.seek(0)
    loaded = torch.load(pickled, weights_only=False)
    assert _dropped(loaded.train(), x) and not _dropped(loaded.eval(), x)


@pytest.mark.parametrize("build", [lambda: torchvision.models.efficientnet_b0(weights=None),
                                   lambda: _timm().create_model("resnet18", drop_path_rate=0.3, zero_init_last=False)],
                         ids=["torchvision_stochastic_depth", "timm_drop_path"])
@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_stochastic_depth_draws_as_in_the_original_when_training(build, traced_in):
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build().double().eval()
    for module in model.modules():  # no dropout on resized channels: its mask would be drawn at another width
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    zero_scales(model, 0.4, seed=2, shifts=True)  # dead channels give exact zeros in train mode too
    x = torch.randn(4, 3, 48, 48, dtype=torch.double)
    model.train(traced_in == "train")
    new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.0, "macs"), example_inputs=x[:2], scheme="cr")
    assert sum(new.nrfx_plan.grow) > 0
    with torch.no_grad():
        expected = model.eval()(x)  # eval mode: running statistics, so a random-init net's outputs may be tiny
        torch.testing.assert_close(new.eval()(x), expected, rtol=1e-7, atol=1e-9 * expected.abs().max().item())
    assert not _dropped(new.eval(), x)  # exact: any drop in eval mode shows, however small the outputs
    outputs = []
    for net in (model.train(), new.train()):
        torch.manual_seed(7)  # the same row masks in the same order: stochastic depth draws one value per example
        outputs.append(net(x))
    assert outputs[0].abs().max() > 1e-3  # train mode: batch statistics keep the outputs in range
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    assert _dropped(new, x)  # (train mode: each call also moves the norms' running statistics)


def test_a_flag_left_at_its_default_is_the_callers_choice():
    timm_drop = pytest.importorskip("timm.layers.drop")

    class Defaults(Head):
        def forward(self, x):
            y = self.bn(self.conv(x)).mean((2, 3))
            return self.fc(timm_drop.drop_path(y, 0.5))  # training defaults to False: never drops

    analysis = nrfx.analyze(Defaults().eval(), torch.randn(4, 3, 6, 6))
    assert not any(n.op == "get_attr" and n.target == "training" for n in analysis.gm.graph.nodes)


# -- a Python branch on self.training: the graph keeps one mode's code, and analyze says so ---------------------------


class Branchy(nn.Module):
    """Halves its input in train mode only, by a Python ``if``: fx keeps the branch of the mode it traced in."""

    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


class WithBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.branch = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Branchy()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.branch(self.bn(self.conv(x))).mean((2, 3)))


def _mode_warnings(model: nn.Module, x: torch.Tensor, **options) -> tuple[object, list[str]]:
    """analyze, with the NrfxWarnings that say a mode differs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = nrfx.analyze(model, x, **options)
    return analysis, [str(w.message) for w in caught if "differs from the model in" in str(w.message)]


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_a_python_branch_on_the_training_flag_is_reported_with_its_line(traced_in):
    model = WithBranch().train(traced_in == "train")
    analysis, warned = _mode_warnings(model, torch.randn(4, 3, 6, 6))
    (message,) = warned
    other = "eval" if traced_in == "train" else "train"
    assert f"traced in {traced_in} mode, the graph differs from the model in {other} mode" in message
    assert "test_training_flags.py" in message and "leaf_modules" in message  # the line of the branch, the way out
    assert message in analysis.capture_notes
    assert model.training == (traced_in == "train")  # the model's flags are put back


def test_a_branch_in_a_leaf_module_runs_in_both_modes_and_is_not_reported():
    model = WithBranch().eval()
    analysis, warned = _mode_warnings(model, torch.randn(4, 3, 6, 6), leaf_modules=[Branchy])
    assert not warned
    new = nrfx.rejuvenate(model, None, None, example_inputs=torch.randn(4, 3, 6, 6), analysis=analysis)
    new.train()
    model.train()
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(new(x), model(x))  # the leaf halves in train mode, as the model does


class HarmlessFlags(Head):
    """Reads the flag where it changes nothing: a rate of 0 and a stochastic depth of 0."""

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        y = F.dropout(y, 0.0, self.training) + torchvision.ops.stochastic_depth(y, 0.0, "row", self.training)
        return self.fc(y)


def test_a_flag_that_changes_nothing_is_not_reported():
    """The two modes' traces differ (a literal flag), but the graph computes what the model does in both."""
    _, warned = _mode_warnings(HarmlessFlags().eval(), torch.randn(4, 3, 6, 6))
    assert not warned


def test_the_same_graph_in_both_modes_costs_no_forward_in_the_other_mode():
    """A trace in the other mode that gives the same graph settles it: the model runs once (in its own mode)."""
    modes: list[bool] = []

    class Counting(nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Counting(), nn.Flatten(), nn.Linear(128, 2))
    _, warned = _mode_warnings(model.eval(), torch.randn(2, 3, 6, 6), leaf_modules=[Counting])
    assert not warned and modes and True not in modes  # it ran (verification, shapes), never in train mode


class Attending(nn.Module):
    """Hugging Face's and timm's attention idiom: the dropout rate is a value read from the flag."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)  # a free space, rejuvenated
        self.conv, self.bn = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)  # split into heads below: frozen
        self.p = 0.5
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn(self.conv(x)).flatten(2).transpose(1, 2).unflatten(-1, (2, 8)).transpose(1, 2)
        y = F.scaled_dot_product_attention(y, y, y, dropout_p=self.p if self.training else 0.0)
        return self.fc(y.transpose(1, 2).flatten(2).mean(1))


def _same_draws(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """Whether two models give the same outputs from the same random state."""
    torch.manual_seed(3)
    first = a(x)
    torch.manual_seed(3)
    return torch.equal(first, b(x))


@pytest.mark.parametrize("traced_in", ["eval", "train"])
def test_a_rate_read_from_the_flag_follows_the_rewritten_models_mode(traced_in):
    """``dropout_p=self.p if self.training else 0.0`` was recorded as the number of the moment; it now reads the
    module's flag when the graph runs, through the rewrite, in either mode."""
    torch.manual_seed(0)
    model, x = Attending().train(traced_in == "train"), torch.randn(4, 3, 5, 5)
    analysis, warned = _mode_warnings(model, x)
    assert not warned
    assert any("read the calling module's flag" in n for n in analysis.capture_notes)
    zero_scales(model, 0.25, seed=1)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis, align=1)
    assert new.nrfx_plan.keep[0] != list(range(16)) and new.nrfx_plan.grow[0] > 0  # the stem's space was rewritten
    assert any(n.target is nrfx.capture.modes.by_mode for n in new.graph.nodes)
    with torch.no_grad():
        new.eval(), model.eval()
        assert not _dropped(new, x)
        torch.testing.assert_close(new(x), model(x))
        new.train(), model.train()
        assert _same_draws(new, model, x)  # the heads keep their width: the same masks, dropped as in the model
        assert _dropped(new, x)
    pickled = io.BytesIO()
    torch.save(new, pickled)  # pickling a GraphModule traces its code again: the flag is still read when it runs
    pickled.seek(0)
    loaded = torch.load(pickled, weights_only=False)
    with torch.no_grad():
        loaded.eval(), new.eval()
        assert not _dropped(loaded, x) and torch.equal(loaded(x), new(x))
        assert _same_draws(loaded.train(), new.train(), x) and _dropped(loaded, x)


def test_timm_attention_dropout_follows_the_flag():
    """timm's Attention passes ``dropout_p=self.attn_drop.p if self.training else 0.``."""
    timm = _timm()
    model = timm.create_model("vit_tiny_patch16_224", attn_drop_rate=0.1, depth=2).eval()
    x = torch.randn(2, 3, 224, 224)
    analysis, warned = _mode_warnings(model, x)
    assert not warned
    (note,) = [n for n in analysis.capture_notes if "read the calling module's flag" in n]
    assert note.startswith("capture: 2 call(s)") and "attention.py" in note
    graph = analysis.gm
    with torch.no_grad():
        graph.train(), model.train()
        assert _same_draws(graph, model, x)
        graph.eval(), model.eval()
        torch.testing.assert_close(graph(x), model(x))


def test_export_keeps_eval_mode_functional_code_and_says_so():
    """torch.export traces in eval mode: a functional dropout never drops again, and analyze says so; a dropout
    module (raised to the user's own module) follows the mode and is not reported."""
    x = torch.randn(4, 3, 6, 6)
    analysis, warned = _mode_warnings(Head().train(), x, capture="export")
    (message,) = warned
    assert "traced in eval mode (torch.export), the graph differs from the model in train mode" in message
    assert "capture='fx'" in message and message in analysis.capture_notes
    module_dropout = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.Flatten(),
                                   nn.Linear(128, 2)).train()
    _, warned = _mode_warnings(module_dropout, x, capture="export")
    assert not warned


class Halving(nn.Module):
    """No submodule, so fx keeps no call of it: the flag is read from a holder the capture adds to the graph."""

    def forward(self, x):
        return x * (0.5 if self.training else 1.0)


def test_a_literal_of_a_module_traced_through_follows_its_flag_after_the_rewrite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), Halving(), nn.Flatten(), nn.Linear(72, 2)).eval()
    x = torch.randn(4, 3, 3, 3)
    analysis, warned = _mode_warnings(model, x)
    assert not warned and any("read the calling module's flag" in n for n in analysis.capture_notes)
    zero_scales(model, 0.25, seed=0)
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis, align=1)
    assert sum(new.nrfx_plan.grow) > 0
    with torch.no_grad():
        for mode in (True, False, True):
            new.train(mode), model.train(mode)
            torch.testing.assert_close(new(x), model(x))
