"""The front door: ``nrfx.analyze`` and its one fallback policy (one graph of the whole model, else islands).

Capturing one graph (fx, else torch.export: ``capture.front_ends.capture``, where that order and its reasons
live) is tried first; when it raises a TraceError under ``capture='auto'`` the model is analysed as
islands (``islands.find_islands``).  Both results answer the ``ModelAnalysis`` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from nrfx.analysis.islands import find_islands
from nrfx.analysis.whole import ModelAnalysis, analyze_whole, as_example
from nrfx.capture.front_ends import CAPTURES
from nrfx.capture.inputs import check_example, check_model
from nrfx.errors import TraceError

__all__ = ["analyze", "CAPTURE_CHOICES"]

CAPTURE_CHOICES = (*CAPTURES, "islands")


def analyze(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Sequence[Callable] = (),
) -> ModelAnalysis:
    """Capture ``model`` (``capture``: 'auto', 'fx', 'export' or 'islands'), follow its channels, count c(A), U(θ).

    ``example_inputs``: a tensor or a tuple of positional arguments (any nest of lists, tuples and
    dicts of tensors); ``example_kwargs``: keyword arguments.  With 'auto', a model that neither
    fx nor torch.export captures whole is analysed as islands (``nrfx.analysis.islands.IslandAnalysis``,
    the same reporting API).  The model is not modified.
    """
    check_model(model)
    example = as_example(example_inputs, example_kwargs)
    check_example(model, example)
    options = {"leaf_modules": leaf_modules, "concrete_args": concrete_args, "autowrap_functions": autowrap_functions}
    if capture not in CAPTURE_CHOICES:
        raise TraceError(f"capture must be one of {CAPTURE_CHOICES}, got {capture!r}")
    if capture == "islands":
        return find_islands(model, example, "capture='islands' was asked for", **options)
    try:
        return analyze_whole(model, example, capture, **options)
    except TraceError as error:
        if capture != "auto":
            raise
        return find_islands(model, example, str(error), **options)
