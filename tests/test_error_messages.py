"""Error messages and freeze reasons name what really failed, in the user's terms.

* A node that cannot run on meta tensors (its code needs real values) while the example
  inputs are fine must not be reported as "the example inputs do not run through the model".
* nrfx's private tracing proxy (``_InplaceProxy``) must not leak into automatic-leaf reasons,
  the report or trace errors: the user never wrote that class.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import nrfx


# -- a node that fails on meta tensors, with valid inputs --------------------------------------------
class _Whiten(nn.Module):
    """Whitening: data-dependent check (untraceable: becomes an automatic leaf) and a Cholesky factor."""

    def forward(self, x):
        if not torch.isfinite(x).all():  # needs real values: fails on meta tensors
            raise ValueError("non-finite activations")
        flat = x.flatten(2)
        cov = flat @ flat.transpose(1, 2) / flat.shape[-1]
        return torch.linalg.solve_triangular(torch.linalg.cholesky(cov), flat, upper=False).view_as(x)


class _WhitenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.whiten = _Whiten()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.whiten(self.stem(x)))


def _whiten_error() -> str:
    """The message nrfx gives for _WhitenNet, whose example input is fine."""
    model = _WhitenNet().eval()
    x = torch.randn(1, 3, 8, 8)
    assert model(x).shape == (1, 4, 8, 8)  # the inputs are fine: the model runs on them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)  # the automatic-leaf notice
        with pytest.raises(nrfx.NrfxError) as info:
            nrfx.analyze(model, x, capture="fx")  # "auto" would retry with torch.export, which captures it
    return str(info.value)


def test_node_failing_on_meta_is_not_blamed_on_the_inputs():
    message = _whiten_error()
    # what really failed: the node, its op and the original exception
    assert "node 'whiten'" in message and "call_module" in message
    assert "Tensor.item() cannot be called on meta tensors" in message
    # not the inputs' fault: no advice to reshape them
    assert "do not run through" not in message
    assert "example_inputs shaped" not in message and "pass a tuple shaped" not in message


def test_node_failing_on_meta_names_the_line_that_raised():
    message = _whiten_error()
    assert "if not torch.isfinite(x).all():" in message


def test_advice_for_a_leaf_that_needs_real_data_is_not_to_make_it_a_leaf():
    message = _whiten_error()
    assert "automatic leaf" in message  # 'whiten' already is one: the message says so ...
    assert "leaf_modules=[...]" not in message  # ... and does not offer that as the way out


# -- _InplaceProxy leaks ----------------------------------------------------------------------------------
class _TokensToMap(nn.Module):
    """Tokens to a square map: int() of a traced size is untraceable, so this becomes an automatic leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, tokens):
        side = int(math.sqrt(tokens.shape[1]))
        y = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        out = self.conv(y)
        out += y
        return out


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.to_map = _TokensToMap()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.to_map(self.embed(x)))


def test_inplace_proxy_does_not_leak_into_leaf_reasons_or_the_report():
    model = _TokenNet().eval()
    x = torch.randn(2, 16, 3)
    assert model(x).shape == (2, 4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nrfx.NrfxWarning)  # the automatic-leaf notice
        analysis = nrfx.analyze(model, x, capture="fx")  # "auto" would export: the leaf holds most parameters
    assert list(analysis.auto_leaves) == ["to_map"]
    reason = analysis.auto_leaves["to_map"]
    assert "TypeError" in reason and "int()" in reason  # the real cause is still named
    report = analysis.report()
    texts = [*analysis.auto_leaves.values(), str(report), json.dumps(report.to_dict())]
    texts += [r.frozen for r in report.rows if r.frozen]
    assert not [t for t in texts if "_InplaceProxy" in t]


def test_inplace_proxy_does_not_leak_into_trace_errors():
    with pytest.raises(nrfx.TraceError) as info:
        nrfx.analyze(_TokensToMap(), torch.randn(2, 16, 8), capture="fx")
    message = str(info.value)
    assert "int()" in message and "side = int(math.sqrt(tokens.shape[1]))" in message
    assert "_InplaceProxy" not in message


def test_a_rewrite_that_does_not_run_blames_the_graph_not_the_inputs():
    """The original ran on the example inputs, so the error names the node and never asks for other inputs."""
    from nrfx.rewrite.rejuvenate import _check_runs

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(5, 4), nn.Linear(3, 2)))  # a width the rewrite missed
    with pytest.raises(nrfx.RewriteError) as info:
        _check_runs(gm, [torch.randn(2, 5)])
    text = str(info.value)
    assert "(call_module 1) failed" in text and "does not run on the example inputs" in text
    assert "Pass example_inputs" not in text and "The example inputs were" not in text
