"""Autocast and grad-mode regions in a forward: analysed through, kept in the rewritten graph.

torch.export wraps each ``torch.autocast`` / ``torch.no_grad`` block into one higher-order op
(its body a submodule): nrfx inlines it between the calls that enter and leave the context, so
the layers inside are analysed like any other (a model whose whole forward autocasts, as under a
Hugging Face Trainer with ``bf16=True``, was one frozen node), and the rewritten model still runs
them in the region.  fx tracing runs a switch at trace time and records nothing: it is refused
(naming the line), and ``capture='auto'`` moves on to export.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import nrfx

pytestmark = pytest.mark.filterwarnings("ignore::nrfx.NrfxWarning")


class Plain(nn.Module):
    """conv-BN-relu ×3, a linear head; the regions below wrap parts of this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def stem(self, x):
        return torch.relu(self.b1(self.c1(x)))

    def middle(self, h):
        return torch.relu(self.b2(self.c2(h)))

    def last(self, h):
        return torch.relu(self.b3(self.c3(h)))

    def forward(self, x):
        return self.fc(self.last(self.middle(self.stem(x))).mean((2, 3)))


class Decorated(Plain):
    """The whole forward under ``@torch.autocast``: bf16 out."""

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, x):
        return super().forward(x)


class Nested(Plain):
    """An autocast block with an autocast-off block inside, then a no_grad branch added to the result."""

    def forward(self, x):
        h = self.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.middle(h)
            with torch.autocast("cpu", enabled=False):
                h = self.last(h.float())
        with torch.no_grad():
            side = h.detach() * 0.5
        return self.fc((h + side).mean((2, 3)))


class NoGradStem(Plain):
    """The stem under no_grad (a frozen front end): its parameters get no gradient."""

    def forward(self, x):
        with torch.no_grad():
            h = self.stem(x)
        return self.fc(self.last(self.middle(h)).mean((2, 3)))


def _dead(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """Half of every norm's channels dead, β and running means random; eval mode."""
    torch.manual_seed(0)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight[: norm.num_features // 2] = 0
                norm.bias.normal_()
                norm.running_mean.normal_()
    return model


def _accelerated(model: nn.Module) -> nn.Module:
    """What accelerate does under mixed precision: the instance's forward wrapped in autocast."""
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


BUILDS = {"decorated": Decorated, "nested": Nested, "no_grad_stem": NoGradStem,
          "accelerated": lambda: _accelerated(Plain())}
X = torch.randn(3, 3, 8, 8)


def _figures(analysis: nrfx.Analysis) -> tuple:
    used = analysis.utilization()
    return analysis.params, analysis.macs, used.r_params, used.r_macs, len(analysis.spaces), len(analysis.unknown_ops)


@pytest.mark.parametrize("name", BUILDS)
def test_regions_are_analysed_like_the_plain_forward(name):
    model = _dead(BUILDS[name]())
    plain = _dead(Plain())
    plain.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.UnknownOpWarning)  # no op is left without a rule
        analysis = nrfx.analyze(model, X)
    assert analysis.capture == "export"
    assert _figures(analysis) == _figures(nrfx.analyze(plain, X))
    assert analysis.utilization().r_params < 0.8 and not analysis.unknown_ops


def _close(a: torch.Tensor, b: torch.Tensor, bf16: bool) -> bool:
    """Equal up to float32 rounding, or bf16's where the model autocasts."""
    tol = 3e-2 if bf16 else 1e-5
    scale = b.float().abs().max().item()
    return a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
@pytest.mark.parametrize("name", BUILDS)
def test_the_rewritten_model_keeps_the_regions(name, scheme):
    model = _dead(BUILDS[name]())
    budget = nrfx.Budget.fraction(1.2) if scheme == "nr" else None
    new = nrfx.rejuvenate(model, None, budget, example_inputs=X, scheme=scheme, align=1, constants="keep")
    pickled = io.BytesIO()
    torch.save(new, pickled)  # pickling a GraphModule traces its code again: the region calls stay nodes
    pickled.seek(0)
    loaded = torch.load(pickled, weights_only=False)
    for graph_module in (new, loaded):
        code = graph_module.code
        assert ("enter_autocast" in code) == (name != "no_grad_stem")
        assert ("enter_grad_mode" in code) == (name in ("nested", "no_grad_stem"))
    for batch in (2, 5):
        x = torch.randn(batch, 3, 8, 8)
        assert _close(new(x), model(x), bf16=name != "no_grad_stem")
        assert torch.equal(loaded(x), new(x)) and loaded(x).requires_grad == model(x).requires_grad
        with torch.no_grad():  # the grad mode the graph leaves behind is the caller's
            new(x)
            assert not torch.is_grad_enabled()
        assert torch.is_grad_enabled()


@pytest.mark.parametrize("scheme", ["nr", "cr", "ca"])
def test_parameters_inside_a_no_grad_region_still_get_no_gradient(scheme):
    model = _dead(NoGradStem(), torch.float64)
    new = nrfx.rejuvenate(model, None, example_inputs=X.double(), scheme=scheme, align=1, constants="keep")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)
    new(x).sum().backward()
    stem = [p for n, p in new.named_parameters() if n.split(".")[0] in ("c1", "b1")]
    rest = [p for n, p in new.named_parameters() if n.split(".")[0] not in ("c1", "b1")]
    assert stem and all(p.grad is None for p in stem) and all(p.grad is not None for p in rest)


@pytest.mark.parametrize("name", BUILDS)
def test_in_place_keeps_the_users_forward(name):
    model = _dead(BUILDS[name]())
    reference = copy.deepcopy(model)
    same = nrfx.rejuvenate(model, None, example_inputs=X, scheme="cr", align=1, constants="keep", inplace=True)
    assert same is model and model.c2.out_channels != 16
    assert _close(model(X), reference(X), bf16=name != "no_grad_stem")


class CudaAutocast(Plain):
    """An autocast region that changes nothing on the CPU: the fx graph matches there, and drops it."""

    def forward(self, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return super().forward(x)


@pytest.mark.parametrize("build, switch", [(CudaAutocast, "autocast switch"), (NoGradStem, "grad-mode switch")])
def test_fx_refuses_a_forward_that_switches_and_auto_moves_on(build, switch):
    model = _dead(build())
    with pytest.raises(nrfx.TraceError, match=rf"{switch}.*test_context_regions.py:\d+: with torch.*capture='export'"):
        nrfx.analyze(model, X, capture="fx")
    assert nrfx.analyze(model, X).capture == "export"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch disables a CUDA autocast only where CUDA is missing")
def test_a_cuda_autocast_exported_without_cuda_is_said_to_be_recorded_disabled():
    """torch turns autocast('cuda') off on a machine without CUDA and export records it off: the graph would run
    the region in full precision on a GPU, so the capture says so (naming the line); a CPU region is quiet."""
    with pytest.warns(nrfx.NrfxWarning, match=r"autocast\('cuda'\) region around .*test_context_regions.py\", "
                                              r"line \d+.* as disabled: CUDA is not available.*inplace=True"):
        analysis = nrfx.analyze(_dead(CudaAutocast()), X)
    assert analysis.capture == "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)
        assert all(nrfx.analyze(_dead(build()), X).capture == "export" for build in BUILDS.values())
        assert nrfx.analyze(_dead(CudaAutocastOff()), X).capture == "export"  # written off: torch said nothing


class CudaAutocastOff(Plain):
    """A CUDA autocast region the forward itself turns off (an fp32 island under a caller's autocast)."""

    def forward(self, x):
        with torch.autocast("cuda", enabled=False):
            return super().forward(x)


def test_a_leaf_that_switches_keeps_fx():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.conv = NoGradStem(), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.inner(self.conv(x))

    assert nrfx.analyze(Outer().eval(), X, capture="fx", leaf_modules=["inner"]).capture == "fx"


class Checkpointed(Plain):
    """The middle block under torch.utils.checkpoint (reentrant or not)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.middle, self.stem(x), use_reentrant=self.reentrant)
        return self.fc(self.last(h).mean((2, 3)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_layers_keep_their_gradients(reentrant):
    """A reentrant checkpoint runs its function under no_grad (its backward runs it again): fx keeps the plain calls;
    an export graph would keep the no_grad and is refused. The non-reentrant one exports as plain calls."""
    model = _dead(Checkpointed(reentrant), torch.float64)
    x = X.double()
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "fx"
    if reentrant:
        with pytest.raises(nrfx.TraceError, match=r"reentrant torch.utils.checkpoint.*use_reentrant=False"):
            nrfx.analyze(model, x, capture="export")
    else:
        assert nrfx.analyze(model, x, capture="export").capture == "export"
    for capture in ("auto",) if reentrant else ("auto", "export"):
        new = nrfx.rejuvenate(model, None, example_inputs=x, scheme="cr", align=1, constants="keep", capture=capture)
        torch.testing.assert_close(new(x), model(x), rtol=1e-9, atol=1e-9)
        new(x).sum().backward()
        assert all(p.grad is not None for p in new.parameters() if p.requires_grad)


def test_the_region_calls_do_not_break_torch_compile():
    model = _dead(Nested())
    new = nrfx.rejuvenate(model, None, example_inputs=X, scheme="ca", align=1, constants="keep")
    counts = []
    for module in (model, new):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(module)(X)
        counts.append((explained.graph_count, explained.graph_break_count))
    torch._dynamo.reset()
    assert counts[0] == counts[1] == (1, 0)


@pytest.mark.parametrize("name", ["decorated", "nested"])
def test_nrfx_runs_that_fail_inside_a_region_leave_the_callers_autocast_and_grad_mode(name):
    model = _dead(BUILDS[name]())
    for capture in ("auto", "export"):  # the checks and probes run the graph at sizes it may fail at, in a region
        nrfx.rejuvenate(model, None, None, example_inputs=X, align=1, constants="keep", capture=capture)
        assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()  # before: bf16 autocast left on
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # torch's default, untouched
