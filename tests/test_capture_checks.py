"""Checks on what a capture produced: a real forward, module mapping through sliced containers, literal batches.

Properties: an fx graph is accepted only when one real forward of it matches the model's on the example
inputs (same RNG state, the model's mode, nothing of the model changed), else "auto" moves on to export
with the reason and capture="fx" raises naming the node; export raises every leaf module to the user's own
module even where the forward sliced a Sequential or ModuleList; a literal batch size in a view/reshape/expand
becomes the input's size where it provably is its batch dim, and a graph that still runs at one batch only
says so loudly.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import nrfx
from nrfx.capture.front_ends import CaptureMismatch, Example, capture


class _StepScale(nn.Module):
    """Integer steps come as a tensor and are scaled; a Proxy is not a tensor, so fx traces the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("freqs", torch.arange(1.0, 5.0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(t):
            t = t.float() / 1000
        return self.bn(self.conv(x)) + torch.sin(t[:, None] * self.freqs)[:, :, None, None]


class _StepClamp(nn.Module):
    """Steps are clamped into the table only on the tensor branch: fx's graph indexes out of range for real."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(t):
            t = t.clamp(max=9)
        return self.bn(self.conv(x)) + self.emb(t)[:, :, None, None]


def _steps():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([30, 500])


def test_fx_graph_taking_another_branch_falls_to_export_with_the_reason():
    model = _StepScale().eval()
    x, t = _steps()
    analysis = nrfx.analyze(model, (x, t))
    assert analysis.capture == "export"
    assert "the fx graph differs from the model on the example inputs" in analysis.capture_notes[0]
    assert "values differ by up to" in analysis.capture_notes[0]
    with pytest.raises(CaptureMismatch, match=r"(?s)values differ.*capture='export'"):
        nrfx.analyze(model, (x, t), capture="fx")
    new = nrfx.rejuvenate(model, None, None, example_inputs=(x, t))
    torch.testing.assert_close(new(x, t), model(x, t))


def test_fx_graph_failing_on_real_inputs_names_the_node_and_line():
    model = _StepClamp().eval()
    x, t = _steps()
    analysis = nrfx.analyze(model, (x, t))
    assert analysis.capture == "export"
    assert "node 'emb' (call_module emb)" in analysis.capture_notes[0]
    assert "IndexError" in analysis.capture_notes[0]
    with pytest.raises(CaptureMismatch, match=r"node 'emb'.*test_capture_checks.py.*IndexError") as raised:
        nrfx.analyze(model, (x, t), capture="fx")
    assert isinstance(raised.value, nrfx.errors.TraceError)


class _TrainNet(nn.Module):
    """BatchNorm and dropout in training mode, and a hook that counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_check_runs_in_the_models_mode_and_changes_nothing():
    model = _TrainNet().train()
    calls = []
    model.body[0].register_forward_hook(lambda *_: calls.append(1))
    state = copy.deepcopy(model.state_dict())
    example = Example((torch.randn(2, 3, 8, 8),))
    rng = torch.get_rng_state()
    captured = capture(model, example, "auto")
    assert captured.method == "fx", captured.notes  # dropout drew the same mask in the model and the graph
    assert not captured.notes
    assert torch.equal(torch.get_rng_state(), rng)
    assert not calls
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # running stats and num_batches_tracked put back


class _Scales(nn.Module):
    """Writes into its input, as some preprocessing does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.mul_(2))


def test_check_runs_on_copies_of_the_inputs_and_skips_meta_models():
    x = torch.randn(2, 3, 4, 4)
    kept = x.clone()
    captured = capture(_Scales().eval(), Example((x,)), "auto")
    assert captured.method == "fx" and not captured.notes  # the graph saw the same input as the model
    assert torch.equal(x, kept)
    with torch.device("meta"):
        model = _TrainNet().eval()
    assert nrfx.analyze(model, torch.randn(2, 3, 8, 8, device="meta")).capture == "fx"  # nothing to run


def test_a_failing_export_check_falls_to_islands_with_the_reason(monkeypatch):
    import nrfx.capture.front_ends as capture_module

    real = capture_module.export_capture

    def wrong(model, example, raisable):
        captured = real(model, example, raisable)
        out = next(iter(captured.gm.graph.find_nodes(op="output")))
        with captured.gm.graph.inserting_before(out):
            doubled = captured.gm.graph.call_function(torch.mul, (out.args[0][0], 2.0))
        out.args = ([doubled, *out.args[0][1:]],)
        captured.gm.recompile()
        return captured

    monkeypatch.setattr(capture_module, "export_capture", wrong)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(CaptureMismatch, match=r"torch\.export's graph of Sequential does not compute"):
        nrfx.analyze(model, torch.randn(2, 3, 8, 8), capture="export")
    model = nn.Sequential(_NestedIn(), nn.BatchNorm2d(4)).eval()
    analysis = nrfx.analyze(model, ([torch.randn(2, 3, 8, 8)],))
    assert isinstance(analysis, nrfx.analysis.islands.IslandAnalysis)
    assert any("does not compute what the model computes" in note for note in analysis.capture_notes)


class _NestedIn(nn.Module):
    """Takes a list of tensors: fx cannot, so 'auto' goes to export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(xs[0])


# -- export through sliced containers ------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


class _Sliced(nn.Module):
    """Runs ``self.body[:-1]`` in a loop, calls ``self.body[-1:]`` and loops over ``self.tail[1:]`` (renumbered from
    0); a shared module makes torch.export name modules by their access path (``body.slice(None, -1, None).0``), as
    in ultralytics.  ``sliced=False``: the same computation by plain indexing."""

    def __init__(self, sliced: bool = True) -> None:
        super().__init__()
        self.sliced = sliced
        self.body = nn.Sequential(_Block(3, 8), _Block(8, 8), _Block(8, 6))
        self.tail = nn.ModuleList([_Block(6, 4), _Block(6, 6), _Block(6, 6)])
        self.head = nn.Conv2d(4, 3, 1)
        self.act = nn.Identity()
        self.shared = self.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sliced:
            for m in self.body[:-1]:
                x = m(x)
            x = self.act(self.body[-1:](x))
            for m in self.tail[1:]:
                x = m(x)
        else:
            x = self.act(self.body[2](self.body[1](self.body[0](x))))
            x = self.tail[2](self.tail[1](x))
        return self.head(self.shared(self.tail[0](x)))


def _module_paths(model: nn.Module, x: torch.Tensor) -> set[str]:
    """The nn_module_stack paths torch.export records (to show the test meets sliced paths)."""
    program = torch.export.export(model, (x,), strict=False)
    return {path for n in program.graph.nodes for path, _ in (n.meta.get("nn_module_stack") or {}).values()}


def test_export_raises_modules_reached_through_sliced_containers():
    torch.manual_seed(0)
    model, plain = _Sliced().eval(), _Sliced(sliced=False).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert {"body.slice(None, -1, None).0.bn", "tail.slice(1, None, None).0.bn"} <= _module_paths(model, x)
    analysis = nrfx.analyze(model, x, capture="export")
    called = {n.target for n in analysis.gm.graph.nodes if n.op == "call_module"}
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    assert layers <= called  # tail.slice(1, None, None).0 is tail.1, not tail.0
    reference = nrfx.analyze(plain, x, capture="export")
    assert analysis.coverage().monitored == reference.coverage().monitored > 0.5
    assert analysis.params == reference.params and analysis.macs == reference.macs
    new = nrfx.rejuvenate(model, None, None, example_inputs=x, analysis=analysis)
    torch.testing.assert_close(new(x), model(x))


@pytest.mark.slow
@pytest.mark.third_party
def test_rtdetr_batch_norms_are_raised():
    """RT-DETR runs ``self.model[:-1]``: 3 of its 122 BatchNorms were raised before paths were resolved, 0.7% of
    its channels monitored; now every one, 55% monitored (about 45 s on a CPU)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no update checks, no downloads
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tasks.RTDETRDetectionModel("rtdetr-l.yaml", verbose=False).eval()
        except Exception as error:  # a download or a missing config: not what this test is about
            pytest.skip(f"RT-DETR could not be built offline: {error}")
        analysis = nrfx.analyze(model, torch.randn(2, 3, 160, 160), capture="export")
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    called = {n.target for n in analysis.gm.graph.nodes if n.op == "call_module"}
    assert norms <= called
    assert analysis.coverage().monitored > 0.5


# -- literal batch sizes -------------------------------------------------------------------------
class _CachedBatch(nn.Module):
    """Caches the batch size at its first call, as YOLO heads cache shapes; 4 channels viewed as 2 groups of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(2, 4, 1)
        self.table = nn.Parameter(torch.randn(2, 16))  # dim 0 sized like the batch, but not a batch
        self.bs: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bs is None:
            self.bs = x.shape[0]
        y = self.bn(self.conv(x))  # [B, 4, 4, 4]
        y = y.view(self.bs, 2, 2, 16).sum(2)  # the batch as a literal, then 2 groups: a literal 2 that is not
        y = y * self.table.view(2, 16)[None]  # a literal 2 on a value whose dim 0 is not the batch
        return self.head(y.view(self.bs, 2, 4, 4))


def _view_sizes(gm: torch.fx.GraphModule) -> list[tuple]:
    return [tuple(a if isinstance(a, int) else a.target for a in n.args[1:])
            for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]


def test_literal_batch_in_a_view_becomes_the_input_size():
    torch.manual_seed(0)
    model = _CachedBatch().eval()
    x = torch.randn(2, 3, 4, 4)
    model(x)  # an earlier call caches the batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)  # nothing to warn about: the literal is rewritten
        analysis = nrfx.analyze(model, x, capture="fx")
    assert _view_sizes(analysis.gm) == [("size", 2, 2, 16), (2, 16), ("size", 2, 4, 4)]
    assert any("literal batch size(s) (2)" in note for note in analysis.capture_notes)
    new = nrfx.rejuvenate(model, None, None, example_inputs=(x,), scheme="nr")
    x3 = torch.randn(3, 3, 4, 4)
    fresh = copy.deepcopy(model)
    fresh.bs = None
    torch.testing.assert_close(new(x3), fresh(x3))
    with pytest.raises(RuntimeError):
        model(x3)  # the model itself runs at batch 2 only
    assert model.bs == 2


class _CachedToken(nn.Module):
    """Expands a learned token to a cached batch size: no input dim to take the size from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.token = nn.Parameter(torch.randn(1, 4, 1))
        self.bs: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bs is None:
            self.bs = x.shape[0]
        return torch.cat([self.token.expand(self.bs, -1, -1), self.bn(self.conv(x)).flatten(2)], 2)


def test_a_batch_literal_that_cannot_be_traced_back_warns():
    model = _CachedToken().eval()
    x = torch.randn(2, 3, 4, 4)
    model(x)
    with pytest.warns(nrfx.NrfxWarning, match=r"(?s)specialised to batch 2.*batch 3 node 'cat'.*2 at node 'expand'"):
        analysis = nrfx.analyze(model, x)
    assert analysis.capture == "fx"
    assert any("runs at batch 2 only" in note for note in analysis.capture_notes)
    expand = next(n for n in analysis.gm.graph.nodes if n.target == "expand")
    assert expand.args[1:] == (2, -1, -1)  # left as it is


def test_a_graph_fixed_to_the_example_batch_refuses_another_batch():
    """The result of a graph that runs at the example batch only checks the batch: at batch 3 it raises, naming
    why, where it computed a wrong result or failed deep inside before."""
    model = _CachedToken().eval()
    x = torch.randn(2, 3, 4, 4)
    model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, align=1)
    torch.testing.assert_close(new(x), model(x))
    with pytest.raises(AssertionError, match=r"runs at batch 2 only: a literal batch size"):
        new(torch.randn(3, 3, 4, 4))


class _BatchFromShape(nn.Module):
    """Reads the batch from the shape: torch.export fixes it at an example batch of 1, where the reshape merges
    the batch into the features at any other batch (a wrong result, no error)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.head(y.reshape(y.shape[0], 8, -1).mean(-1))


def test_an_export_fixed_at_batch_one_refuses_another_batch():
    model, x = _BatchFromShape().eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, x, capture="export")
        new = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=x, capture="export", align=1)
        gated = nrfx.add_gates(model, x, capture="export")
    assert not analysis.unknown_ops and any("specialised the batch" in n for n in analysis.capture_notes)
    torch.testing.assert_close(new(x), model(x))
    for result in (new, gated):
        with pytest.raises(AssertionError, match=r"runs at batch 1 only: torch.export fixed the batch size"):
            result(torch.randn(3, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = nrfx.rejuvenate(model, None, nrfx.Budget.fraction(1.2), example_inputs=torch.randn(2, 3, 8, 8),
                                  capture="export", align=1)
    x3 = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(dynamic(x3), model(x3))  # an example batch of 2 keeps the batch free


def test_no_literal_check_without_batch_literals():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(x.size(0), 2, 2, -1).sum(1)  # a literal 2 in a non-batch dim

    with warnings.catch_warnings():
        warnings.simplefilter("error", nrfx.NrfxWarning)
        analysis = nrfx.analyze(Plain(), torch.randn(2, 3, 4, 4))
    assert not analysis.capture_notes
    assert _view_sizes(analysis.gm) == [("size", 2, 2, -1)]


class _ShapeRead(nn.Module):
    """fx cannot trace a Python branch on a size, so torch.export captures it; ``pool`` says how it pools."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        if y.shape[-1] > 1000:  # a branch on a size: fx gives up
            y = y * 2
        y = torch.relu(self.b2(self.c2(y)))
        if self.pool == "shape":  # a global pool written with the map's size: export fixes the kernel
            y = nn.functional.avg_pool2d(y, y.shape[-2:])
        else:
            y = nn.functional.adaptive_avg_pool2d(y, 1)
        return self.fc(y.flatten(1))


def _dead_model(pool: str) -> nn.Module:
    torch.manual_seed(0)
    model = _ShapeRead(pool).double().eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2):
            bn.weight[::3] = 0  # dead channels; their β still reaches the next layer
            bn.bias.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("scheme", ["nr", "ca"])
def test_an_input_size_export_fixed_is_asserted_where_the_graph_does_not_follow_it(scheme):
    model = _dead_model("shape")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "export"
    assert any("fixed the input size 32 (x[2], x[3])" in note for note in analysis.capture_notes)
    new = nrfx.rejuvenate(model, None, None, example_inputs=(x,), scheme=scheme, align=1, constants="keep")
    for batch in (1, 3):  # the batch stays free
        other = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(new(other), model(other), rtol=1e-9, atol=1e-9)
    bigger = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"(?s)fixed dim 2 of input 'x' at 32.*avg_pool2d.*inplace=True"):
        new(bigger)  # before: the fixed 8×8 kernel pooled a corner of the 12×12 map, without a word
    in_place = nrfx.rejuvenate(copy.deepcopy(model), None, None, example_inputs=(x,), scheme=scheme, align=1,
                               constants="keep", inplace=True)
    torch.testing.assert_close(in_place(bigger), model(bigger), rtol=1e-9, atol=1e-9)  # its own forward: any size


def test_input_sizes_the_export_graph_follows_stay_free():
    model = _dead_model("adaptive")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    analysis = nrfx.analyze(model, x)
    assert analysis.capture == "export"
    assert [note for note in analysis.capture_notes if "fixed the input size 32" in note] == []
    with pytest.raises(AssertionError, match=r"fixed dim 1 of input 'x' at 3 .*the model itself raises"):
        analysis.gm(torch.randn(2, 4, 32, 32, dtype=torch.float64))  # channels: the model takes no other number
    new = nrfx.rejuvenate(model, None, None, example_inputs=(x,), align=1, constants="keep")
    for shape in ((3, 3, 16, 16), (1, 3, 48, 40), (2, 3, 64, 64)):
        other = torch.randn(*shape, dtype=torch.float64)
        torch.testing.assert_close(new(other), model(other), rtol=1e-9, atol=1e-9)


def test_a_token_length_export_fixed_is_asserted_on_every_input_that_has_it():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = nrfx.analyze(model, (ids,), example_kwargs={"attention_mask": mask})
    note = next(n for n in analysis.capture_notes if "fixed the input size 16" in n)
    assert "input_ids[1]" in note and "attention_mask[1]" in note  # one group: the sequence and its mask
    graph = analysis.gm
    with pytest.raises(AssertionError, match="fixed dim 1 of input 'input_ids' at 16"):
        graph(ids[:, :12], mask[:, :12])


class _HandMean(nn.Module):
    """A mean written with the width read from the shape: export fixes the divisor; zeros in, zeros out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.shape[-1] > 1000:  # a branch on a size: fx gives up
            y = y * 2
        return self.fc(y.sum((-2, -1)) / (y.shape[-1] * y.shape[-2]))


def test_an_example_of_zeros_still_shows_a_size_the_graph_fixed():
    model = _HandMean().double().eval()
    zeros = torch.zeros(2, 3, 16, 16, dtype=torch.float64)  # the probe draws values: on zeros both give the bias
    analysis = nrfx.analyze(model, zeros)
    assert analysis.capture == "export"
    assert any("fixed the input size 16 (x[2], x[3])" in note for note in analysis.capture_notes)
    with pytest.raises(AssertionError, match="fixed dim 2 of input 'x' at 16"):
        analysis.gm(torch.randn(2, 3, 24, 24, dtype=torch.float64))  # before: the mean divided by 256, silently


class _Conditioned(nn.Module):
    """An image and a conditioning vector whose width merely equals the image's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.cond = nn.Linear(8, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1)) + \
            self.cond(v)


def test_inputs_that_merely_share_a_size_are_probed_input_by_input():
    model = _Conditioned().double().eval()
    x, v = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    analysis = nrfx.analyze(model, (x, v), capture="export")
    for size in (12, 24):  # before: the image's size was asserted (the model takes no 12-wide vector)
        other = torch.randn(2, 3, size, size, dtype=torch.float64)
        torch.testing.assert_close(analysis.gm(other, v), model(other, v))
    with pytest.raises(AssertionError, match="fixed dim 1 of input 'v' at 16"):
        analysis.gm(x, torch.randn(2, 17, dtype=torch.float64))
