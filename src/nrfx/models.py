"""Build a model from a name: torchvision, timm (when installed) or ``package.module:factory``.

Named models are always built without pretrained weights (nothing is downloaded): every
``*weights*`` argument of a torchvision builder (``weights``, ``weights_backbone``) is None,
timm's ``pretrained`` is False.  A ``module:factory`` is called as written (it may load the
user's own checkpoint), with the current directory importable.  The default example input
size is the crop size of the torchvision weights' transforms, the input size of timm's
pretrained config, or 3×224×224.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from nrfx.errors import NrfxError

__all__ = ["DEFAULT_INPUT_SIZE", "VIDEO_FRAMES", "default_input_size", "meta_parameters", "no_weights_kwargs",
           "resolve_model"]

DEFAULT_INPUT_SIZE: tuple[int, ...] = (3, 224, 224)
VIDEO_FRAMES = 16  # clip length of torchvision's video models (their `_ops` metadata uses 16 frames)

_SPELLINGS = (
    "  - a torchvision model name, e.g. 'resnet50' (see torchvision.models.list_models())\n"
    "  - a timm model name, e.g. 'convnext_tiny' (needs timm installed; see timm.list_models())\n"
    "  - a factory 'package.module:function' that returns an nn.Module, e.g. 'mypkg.nets:build'"
)


def _torchvision_names() -> list[str]:
    """Every model name torchvision can build."""
    import torchvision

    return list(torchvision.models.list_models())


def _timm():
    """The timm module, or None when it is not installed (or broken)."""
    try:
        import timm
    except Exception:
        return None
    return timm


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory is on ``sys.path`` inside (as for ``python -m``), and only there."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _from_factory(spec: str) -> nn.Module:
    """Import ``package.module`` (the current directory included) and call its ``factory`` with no arguments."""
    module_name, _, attr = spec.partition(":")
    with _cwd_importable():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise NrfxError(f"cannot import '{module_name}' for model '{spec}': {error}; check the module path "
                            "(run from the directory that holds it) and that its package is installed") from error
        factory = module
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise NrfxError(f"'{module_name}' has no attribute '{attr}' (model '{spec}'); "
                                "name a function that returns an nn.Module after the colon")
        try:
            model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        except Exception as error:  # the user's factory: any failure is theirs, reported as one line
            raise NrfxError(f"the factory '{spec}' raised {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise NrfxError(f"'{spec}' returned {type(model).__name__}, not an nn.Module; "
                        "the factory must build and return the model")
    return model


def resolve_model(spec: str) -> nn.Module:
    """A fresh model (random weights) for a torchvision name, a timm name, or ``module:factory``."""
    spec = spec.strip()
    if ":" in spec:
        return _from_factory(spec)
    if spec in _torchvision_names():
        import torchvision

        return torchvision.models.get_model(spec, **no_weights_kwargs(torchvision.models.get_model_builder(spec)))
    timm = _timm()
    if timm is not None and timm.is_model(spec):
        return timm.create_model(spec, pretrained=False)
    raise NrfxError(_unknown_message(spec, timm))


def no_weights_kwargs(builder: Any) -> dict[str, Any]:
    """Rule: every parameter of ``builder`` whose name has "weights" is None; ``pretrained*`` flags are False.

    Read from the builder's signature, so a torchvision builder's ``weights_backbone`` (detection,
    segmentation) or any future ``*weights*`` argument cannot fetch a checkpoint behind our back.
    """
    try:
        names = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature: the common spelling
        return {"weights": None}
    kwargs: dict[str, Any] = {n: None for n in names if "weights" in n}
    kwargs.update({n: False for n in names if n in ("pretrained", "pretrained_backbone")})
    return kwargs


def _unknown_message(spec: str, timm: Any) -> str:
    """Say that a model name is unknown, suggest close names and how to spell each kind."""
    names = _torchvision_names()
    if timm is not None:
        names += timm.list_models()
    close = difflib.get_close_matches(spec, list(dict.fromkeys(names)), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    module_name, _, attr = spec.rpartition(".")
    if module_name and _importable(module_name):  # 'package.module.factory': the colon is missing
        hint += f" Did you mean the factory '{module_name}:{attr}'? (a colon separates module and function)"
    missing = "" if timm is not None else " (timm is not installed, so timm names are not available)"
    return f"unknown model '{spec}'{missing}.{hint} A model is named by one of:\n{_SPELLINGS}"


def _importable(module_name: str) -> bool:
    """Whether ``module_name``'s top-level package can be found (without importing the module)."""
    with _cwd_importable():
        try:
            return importlib.util.find_spec(module_name.split(".")[0]) is not None
        except (ImportError, ValueError):
            return False


def default_input_size(name: str, model: nn.Module | None = None) -> tuple[int, ...]:
    """Example input size without the batch dim: torchvision crop, timm config, else 3×224×224."""
    size = _torchvision_size(name) if ":" not in name else None
    if size is None:
        size = _timm_size(name, model)
    return size or DEFAULT_INPUT_SIZE


def _torchvision_size(name: str) -> tuple[int, ...] | None:
    """Input size from the default weights' transforms of a torchvision model."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:
        return None
    keywords = getattr(weights.transforms, "keywords", None) or {}
    side = keywords.get("crop_size", keywords.get("resize_size"))
    if side is None:
        return None
    height, width = (side, side) if isinstance(side, int) else (tuple(side) * 2)[:2]
    if "Video" in getattr(weights.transforms, "func", weights.transforms).__name__:
        return (3, VIDEO_FRAMES, height, width)
    return (3, height, width)


def _timm_size(name: str, model: nn.Module | None) -> tuple[int, ...] | None:
    """Input size from timm's pretrained config (of the model, or looked up by name)."""
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(s) for s in cfg["input_size"])
    timm = _timm()
    if timm is None or ":" in name:
        return None
    try:
        found = timm.get_pretrained_cfg(name)
    except Exception:
        return None
    size = getattr(found, "input_size", None)
    return tuple(int(s) for s in size) if size else None


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every parameter registered inside lands on the meta device (no init, no memory); buffers stay real.

    Build a model inside it to analyse its costs without its weights' memory: ``analyze`` needs
    parameter shapes only (``norm_masks`` skips meta scales, so U(θ) counts them alive).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
