"""The public API: every module's ``__all__`` names what exists, public names are documented and typed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest

import nrfx

MODULES = sorted(m.name for m in pkgutil.walk_packages(nrfx.__path__, "nrfx."))


def test_top_level_names_exist():
    missing = [name for name in nrfx.__all__ if not hasattr(nrfx, name)]
    assert not missing and len(set(nrfx.__all__)) == len(nrfx.__all__)


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_true_and_documented(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ lists a name twice"
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
    for attr in exported:
        assert hasattr(module, attr), f"{name}.__all__ names {attr}, which does not exist"
        value = getattr(module, attr)
        if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == name:
            assert inspect.getdoc(value), f"{name}.{attr} has no docstring"


@pytest.mark.parametrize("name", [n for n in nrfx.__all__ if inspect.isfunction(getattr(nrfx, n))])
def test_public_functions_are_fully_typed(name):
    function = getattr(nrfx, name)
    hints = typing.get_type_hints(function)
    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    untyped = [p.name for p in parameters if p.name not in hints]
    assert not untyped and "return" in hints, f"nrfx.{name}: untyped {untyped or 'return'}"


def test_both_analyses_answer_one_protocol():
    """A whole graph and an island analysis are both ``nrfx.ModelAnalysis``: ``whole`` and ``parts()`` say which
    graphs they are made of, so callers need no type check."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    whole = nrfx.analyze(model, x)
    islands = nrfx.analyze(model, x, capture="islands")
    for analysis in (whole, islands):
        assert isinstance(analysis, nrfx.ModelAnalysis)
        assert analysis.params == sum(p.numel() for p in model.parameters())
        parts = analysis.parts()
        assert all(isinstance(part, nrfx.Analysis) and part.whole for part in parts.values())
        assert analysis.macs == sum(part.macs for part in parts.values())
    assert whole.whole and whole.parts() == {"": whole}
    assert not islands.whole and islands.parts() == islands.islands
    members = [name for name in dir(nrfx.ModelAnalysis) if not name.startswith("_")]
    for name in [*members, "capture", "capture_notes"]:
        assert hasattr(whole, name) and hasattr(islands, name), name
