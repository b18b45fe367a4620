"""_common: what the framework callbacks share — settings, the target module, the in-place driver, metrics.

A callback (``nrfx.integrations.lightning``, ``nrfx.integrations.transformers``) never owns the
training loop: it builds a ``NeuralRejuvenation`` driver with ``inplace=True`` on the framework's own
model, optimizer and scheduler, adds the L1 penalty after backward, calls ``check()`` at the
framework's epoch ends or every N optimizer steps, and keeps the step counter in sync with the
framework's.  Checkpoint resume rests on the model's own state dict: ``prepare_target`` registers
the load pre-hook that replays the plans a state dict carries (``nrfx_plans``) before the
framework loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from nrfx.analysis.whole import as_example
from nrfx.rewrite.inplace import skeleton
from nrfx.rewrite.rejuvenate import apply_plan, replays_plans
from nrfx.train.driver import DriverError, NeuralRejuvenation, check_settings

__all__ = ["Settings", "Runner", "CallbackCore", "driver_options", "target_module", "prepare_target", "build_driver",
           "metrics", "check_single_process", "torch_optimizer", "torch_scheduler", "PROGRESS_FILE"]

PROGRESS_FILE = "nrfx_progress.json"  # the driver's progress in a Hugging Face checkpoint folder


@dataclass
class Settings:
    """The driver's keyword arguments a callback passes through, and when it checks r(θ)."""

    example_inputs: Any
    example_kwargs: dict[str, Any] | None = None
    module: str | None = None
    every_n_steps: int | None = None
    check_on_epoch_end: bool | None = None
    driver: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.every_n_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise DriverError(f"every_n_steps must be a positive int or None (check at epoch ends), got {steps!r}")
        if self.check_on_epoch_end is None:
            self.check_on_epoch_end = steps is None
        if steps is None and not self.check_on_epoch_end:
            raise DriverError("every_n_steps=None and check_on_epoch_end=False: r(θ) would never be checked; "
                              "set every_n_steps=N or check_on_epoch_end=True")
        if self.module is not None and not isinstance(self.module, str):
            raise DriverError(f"module must be the dotted path of a submodule (a str) or None, got {self.module!r}")
        as_example(self.example_inputs, self.example_kwargs)  # a bad example fails at construction

    def checks_at_step(self, step: int) -> bool:
        """Rule: a check after optimizer step ``step`` when it is a positive multiple of ``every_n_steps``."""
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0


def target_module(model: nn.Module, path: str | None) -> nn.Module:
    """The submodule at ``path`` (the whole model for None or ""), else a DriverError naming the paths there are."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        children = [name for name, _ in model.named_children()]
        raise DriverError(f"module={path!r}: {type(model).__name__} has no such submodule ({error}); "
                          f"its children are {children}") from error


def prepare_target(module: nn.Module, settings: Settings) -> None:
    """Rule: the target remembers the example's skeleton and replays the plans a loaded state dict carries."""
    module.__dict__["_nrfx_example"] = skeleton(as_example(settings.example_inputs, settings.example_kwargs))
    replays_plans(module)


def _on_device(tree: Any, device: torch.device) -> Any:
    """The tensors of an example moved to the model's device."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def build_driver(module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 settings: Settings) -> NeuralRejuvenation:
    """A driver in place on the framework's module, optimizer and scheduler; ``check()`` is called by the callback."""
    device = next(module.parameters()).device
    return NeuralRejuvenation(
        module, optimizer, inplace=True, interval=None,
        example_inputs=_on_device(settings.example_inputs, device),
        example_kwargs=_on_device(settings.example_kwargs, device),
        scheduler_factory=(lambda _optimizer: scheduler) if scheduler is not None else None,
        **settings.driver,
    )


def torch_optimizer(optimizer: Any, framework: str) -> torch.optim.Optimizer:
    """The torch optimizer under a framework's wrapper (accelerate's ``AcceleratedOptimizer.optimizer``)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):  # a wrapper may subclass Optimizer
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise DriverError(f"{framework}: Neural Rejuvenation needs a torch.optim.Optimizer to rewrite in place, "
                          f"got {type(optimizer).__name__}")
    return inner


def torch_scheduler(scheduler: Any) -> Any:
    """The scheduler under a framework's wrapper (accelerate's ``AcceleratedScheduler.scheduler``), or None."""
    while getattr(scheduler, "scheduler", None) is not None:
        scheduler = scheduler.scheduler
    return scheduler


def metrics(record: dict[str, Any]) -> dict[str, float]:
    """A history record as logger metrics: ``nrfx/r``, ``nrfx/lambda``, ``nrfx/rounds``, ``nrfx/cost``
    (and ``nrfx/r_after`` at a rejuvenation)."""
    out = {"nrfx/r": float(record["r"]), "nrfx/lambda": float(record["lam"]),
           "nrfx/rounds": float(record["rounds"]), "nrfx/cost": float(record["cost"])}
    if record.get("event") == "rejuvenate":
        out["nrfx/r_after"] = float(record["r_after"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def check_single_process(world_size: int, framework: str, how: str, supported: str = "single-process training") -> None:
    """Rule: one process only — an in-place rewrite under a framework's DDP wrapper would leave the wrapper stale."""
    if world_size > 1:
        raise DriverError(
            f"{framework}: NeuralRejuvenationCallback supports {supported} only (this run has "
            f"{world_size} processes, {how}). An in-place rejuvenation resizes the model under the framework's "
            "distributed wrapper, which must then be rebuilt, and this framework setup cannot do that mid-run. "
            "Train on one device, or for DDP use a plain loop: nrfx.NeuralRejuvenation(model, optimizer, "
            "inplace=True, wrap=nrfx.train.driver.ddp_wrapper(device_ids=[rank]), ...) (see docs/driver.md, DDP)")


def driver_options(*, budget: Any, target: float, lam: float, delta_lambda: float, delta_r: float, scheme: str,
                   rescale: bool, gamma0: Any, align: int, max_rounds: int | None, carry_state: bool,
                   restart_schedule: bool, threshold: float, seed: int | None, capture: str,
                   constants: str = "drop", residual: str = "rejuvenate") -> dict[str, Any]:
    """The driver keywords a callback passes through, range-checked now (not at the first training step)."""
    check_settings(target, None, delta_r, delta_lambda, max_rounds, scheme, lam)
    return dict(budget=budget, target=target, lam=lam, delta_lambda=delta_lambda, delta_r=delta_r, scheme=scheme,
                rescale=rescale, gamma0=gamma0, align=align, max_rounds=max_rounds, carry_state=carry_state,
                restart_schedule=restart_schedule, threshold=threshold, seed=seed, capture=capture,
                constants=constants, residual=residual)


class Runner:
    """Algorithm 1 driven from a framework's hooks: one driver per fit, progress waiting until it exists."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nr: NeuralRejuvenation | None = None
        self.pending: dict[str, Any] | None = None  # progress loaded from a checkpoint before the driver exists
        self.stepped = 0  # the framework's optimizer step at the last call (batches that accumulate do not step)

    def start(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int) -> None:
        """Build the driver on the framework's objects; a resumed run takes its saved progress (λ, rounds, history)."""
        self.nr = build_driver(module, optimizer, scheduler, self.settings)
        if self.pending is not None:
            self.nr.load_progress(self.pending)
            self.pending = None
        self.nr.steps = self.stepped = step

    def penalize(self) -> None:
        """λ·sign(γ) into the grads of the monitored scales (after backward and unscaling, before the step)."""
        if self.nr is not None:
            self.nr.penalize()

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Rule: once per optimizer step (not per accumulated batch) the step counter follows the framework's,
        and every N steps a check."""
        if self.nr is None or step == self.stepped:
            return None
        self.nr.steps = self.stepped = step
        return self.nr.check() if self.settings.checks_at_step(step) else None

    def at_epoch_end(self, step: int) -> dict[str, Any] | None:
        """Rule: a check at an epoch end when ``check_on_epoch_end``, unless this step was just checked."""
        if self.nr is None or not self.settings.check_on_epoch_end:
            return None
        if self.nr.history and self.nr.history[-1]["step"] == step:
            return None
        self.nr.steps = step
        return self.nr.check()

    def replay_round(self, copy: nn.Module) -> None:
        """Rule: a copy of the target the framework keeps beside it (an averaged model) takes the round just made,
        in place: the same plan on its own weights, so its survivors keep their values and its parameters pair
        one to one with the model's again."""
        prepare_target(copy, self.settings)
        device = next(copy.parameters()).device
        apply_plan(copy, self.nr.plans[-1], _on_device(self.settings.example_inputs, device),
                   example_kwargs=_on_device(self.settings.example_kwargs, device), inplace=True)  # the plan's capture

    def progress(self) -> dict[str, Any] | None:
        """The driver's progress (JSON-safe), or the progress still waiting to be loaded, or None."""
        return self.nr.progress_state() if self.nr is not None else self.pending


class CallbackCore:
    """What both callbacks hold: the settings, the runner, and the driver and its history once training started.

    Takes the keyword arguments of ``nrfx.NeuralRejuvenation`` plus ``every_n_steps`` (check r(θ)
    every N optimizer steps), ``check_on_epoch_end`` (default: True when ``every_n_steps`` is
    None) and ``module`` (the submodule to rejuvenate; default the whole model).
    """

    def __init__(self, *, example_inputs: Any, example_kwargs: dict[str, Any] | None = None,
                 module: str | None = None, every_n_steps: int | None = None,
                 check_on_epoch_end: bool | None = None, budget: Any = None,
                 target: float = 0.5, lam: float = 0.0, delta_lambda: float = 5e-5, delta_r: float = 0.01,
                 scheme: str = "nr", rescale: bool = False, gamma0: float | str | None = None, align: int = 8,
                 max_rounds: int | None = None, carry_state: bool = True, restart_schedule: bool = False,
                 threshold: float = 0.01, seed: int | None = None, capture: str = "auto",
                 constants: str = "drop", residual: str = "rejuvenate") -> None:
        options = driver_options(budget=budget, target=target, lam=lam, delta_lambda=delta_lambda, delta_r=delta_r,
                                 scheme=scheme, rescale=rescale, gamma0=gamma0, align=align, max_rounds=max_rounds,
                                 carry_state=carry_state, restart_schedule=restart_schedule, threshold=threshold,
                                 seed=seed, capture=capture, constants=constants, residual=residual)
        self.settings = Settings(example_inputs, example_kwargs, module, every_n_steps, check_on_epoch_end, options)
        self._runner = Runner(self.settings)

    @property
    def nr(self) -> NeuralRejuvenation | None:
        """The driver (None before training starts)."""
        return self._runner.nr

    @property
    def history(self) -> list[dict[str, Any]]:
        """The driver's history records (empty before training)."""
        return self._runner.nr.history if self._runner.nr is not None else []

    def _target(self, model: nn.Module) -> nn.Module:
        """The module rejuvenated: ``module`` inside the framework's model, or all of it."""
        return target_module(model, self.settings.module)
