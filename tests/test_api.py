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
