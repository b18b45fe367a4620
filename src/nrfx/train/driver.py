"""The training driver: SGD with Neural Rejuvenation (paper Algorithm 1, Sec. 3.1.3).

``NeuralRejuvenation`` wraps a model and any torch optimizer.  ``step()`` adds the L1
sub-gradient ``λ·sign(γ)`` to the scales of the norms on free channel spaces, steps the
optimizer, and every ``interval`` steps reads r(θ) from γ alone (no forward pass).  λ starts
at ``lam`` (0: the paper's adaptive rule) and grows by Δλ at every check where r did not fall
by Δr (``delta_lambda=0``: λ stays fixed, the official code's CIFAR mode); when ``r < target``
the current model is rejuvenated under the budget, the optimizer is rebuilt (with the state of
every surviving slice carried over, or fresh with ``carry_state=False``), and λ goes back to
``lam``.  When the monitored scales shrink together for many checks while r stays near 1 (the
relative dead test cannot fire), an ``NrfxWarning`` says so once.  Optimizer-state slicing lives
in ``nrfx.rewrite.optim_state``, history, plot and progress bar in ``nrfx.train.history``.

Everything a rejuvenation builds (model, analysis, optimizer, scheduler, wrapper) is made
first and swapped in only when all of it succeeded: an error leaves the driver as it was.
Checkpoints hold the replayable plans, so a driver over a fresh copy of the original model
rebuilds the same architecture and continues bit for bit.

With ``inplace=True`` the rejuvenation rewrites the user's model object itself
(``rejuvenate(..., inplace=True, optimizer=...)``): ``nr.model``/``nr.module``, ``nr.optimizer``
(which may be passed as an optimizer instead of a factory) and ``nr.scheduler`` stay the same
objects through every round; only a ``wrap`` (DDP) is rebuilt around the resized model.  The
in-place rewrite is undone whole if it fails its check.  ``penalize()``, ``check()`` and
``progress_state()``/``load_progress()`` are what framework callbacks (``nrfx.integrations``) drive.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nrfx.analysis.cost import by_kind
from nrfx.analysis.front import analyze
from nrfx.analysis.masks import norm_masks
from nrfx.analysis.whole import Analysis
from nrfx.capture.inputs import check_real_weights
from nrfx.errors import NrfxError, NrfxWarning, PlanError
from nrfx.plan.planner import SCHEMES, Budget, Plan, check_align, check_constants, check_gamma0, check_residual
from nrfx.rewrite.inplace import PLANS_KEY, freeze_for_inplace
from nrfx.rewrite.optim_state import carry_optimizer_state, copy_group_settings
from nrfx.rewrite.rejuvenate import apply_plan, rejuvenate
from nrfx.train.history import PROGRESS_KINDS, Progress, plot_history, save_history

__all__ = [
    "NeuralRejuvenation",
    "DriverError",
    "ddp_wrapper",
    "check_settings",
    "carry_optimizer_state",
    "save_history",
    "plot_history",
]

COLLAPSE_SCALE = 0.2  # collapse: a norm's max|γ| below this fraction of its value at the start of the round,
COLLAPSE_SHARE = 0.5  # in at least this share of the monitored norms,
COLLAPSE_R = 0.9  # while r(θ) is still at least this,
COLLAPSE_CHECKS = 10  # at this many checks in a row (a fast but healthy λ ramp passes through it in fewer)
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
_FORMAT = "nrfx.train.driver/1"


class DriverError(NrfxError):
    """The driver was given bad settings, a bad optimizer factory, or a model it cannot monitor."""


# -- one stage: everything that a rejuvenation replaces ---------------------------------------
@dataclass(eq=False)
class _Penalty:
    """The monitored scales laid out once per stage for the L1 term: masked norms first, then the rest."""

    gammas: list[nn.Parameter]
    masks: list[torch.Tensor]  # masks[i] goes with gammas[i]; the norms past len(masks) have none

    @classmethod
    def of(cls, norms: list[tuple[str, nn.Parameter, torch.Tensor | None]]) -> _Penalty:
        """The norms with a mask of free channels first (in order), then those whose channels are all free."""
        masked = [(gamma, mask) for _, gamma, mask in norms if mask is not None]
        return cls([g for g, _ in masked] + [g for _, g, m in norms if m is None], [m for _, m in masked])

    def with_grads(self) -> tuple[_Penalty, list[torch.Tensor]]:
        """The layout restricted to the scales that have a grad (itself when all have one), and those grads."""
        grads = [gamma.grad for gamma in self.gammas]
        if all(grad is not None for grad in grads):
            return self, grads
        keep = [i for i, grad in enumerate(grads) if grad is not None]
        layout = _Penalty([self.gammas[i] for i in keep], [self.masks[i] for i in keep if i < len(self.masks)])
        return layout, [grads[i] for i in keep]

    def apply(self, lam: float) -> None:
        """grad += λ·sign(γ)·mask (mask 1 where all channels are free), in three foreach calls at most."""
        layout, grads = self.with_grads()
        if not grads:
            return
        with torch.no_grad():
            signs = torch._foreach_sign(layout.gammas)
            if layout.masks:
                torch._foreach_mul_(signs[: len(layout.masks)], layout.masks)
            torch._foreach_add_(grads, signs, alpha=lam)


@dataclass
class _Stage:
    """The current model with its analysis, monitored scales, optimizer, scheduler and wrapper."""

    module: nn.Module
    model: nn.Module
    analysis: Analysis
    norms: list[tuple[str, nn.Parameter, torch.Tensor | None]]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    plans: list[Plan] = field(default_factory=list)
    sites: frozenset[str] = frozenset()  # norms whose masks the analysis follows (frozen ones left out)
    penalty: _Penalty = field(init=False)

    def __post_init__(self) -> None:
        self.penalty = _Penalty.of(self.norms)


def _monitored_norms(analysis: Analysis, module: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """(name, γ, mask of free channels or None for all) of every norm scale on a free space."""
    found: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for name, norm, segments in analysis.norm_spaces(module):
        weight = norm.weight
        covered = sum(entries.stop - entries.start for _, entries in segments)
        if not isinstance(weight, nn.Parameter) or covered != weight.numel():
            continue
        free = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        for s, entries in segments:
            free[entries] = not analysis.spaces[s].is_frozen
        if not free.any():
            continue
        previous = found.get(name)
        found[name] = (weight, free if previous is None else previous[1] | free)
    return [(name, w, None if bool(m.all()) else m.to(w.device, w.dtype)) for name, (w, m) in found.items()]


def _largest_scales(norms: list[tuple[str, nn.Parameter, torch.Tensor | None]]) -> list[float]:
    """max|γ| over the free channels of every monitored norm (one transfer to the host)."""
    with torch.no_grad():
        values = [(g.detach().abs() if m is None else g.detach().abs() * m).max().float() for _, g, m in norms]
        return torch.stack([v.to(values[0].device) for v in values]).tolist() if values else []


def _build_optimizer(factory: OptimizerFactory, module: nn.Module) -> torch.optim.Optimizer:
    """Call the factory with the module's parameters; it must hold exactly those it was given."""
    optimizer = factory(module.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise DriverError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                          "pass e.g. lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    foreign = len(held - names.keys())
    missing = [n for i, n in names.items() if i not in held and module.get_parameter(n).requires_grad]
    if foreign or missing:
        raise DriverError(
            f"the optimizer built by optimizer_factory does not hold exactly the parameters it was given "
            f"({foreign} foreign, {len(missing)} missing, e.g. {missing[:3]}): build it from the argument, "
            "lambda params: Opt(params, ...), not from a model captured outside — after a rejuvenation the "
            "model's parameters are new tensors"
        )
    return optimizer


def _no_signal_message(module: nn.Module, analysis: Analysis) -> str:
    """Why nothing can be monitored, and the way out: gates where free spaces lack a norm, else what froze them."""
    cover = analysis.coverage()
    text = (f"{type(module).__name__} has no norm scale to monitor: Neural Rejuvenation reads liveliness from the γ "
            "of per-channel norms (BatchNorm/InstanceNorm with affine=True) or an nrfx.Gate on channels nrfx may "
            f"resize, and none of its {cover.channels:,} channels has one")
    if cover.unsignalled:
        return (text + f" ({cover.free:.0%} are free). Give them a gate: build the driver on "
                "nrfx.add_gates(model, example_inputs) (a copy with an nrfx.Gate, all ones, in every free space "
                "without a norm: the same function), or add batch norms after the convolutions; on the command "
                "line, nrfx report / nrfx rejuvenate MODEL --add-gates")
    return text + ", and every channel space is frozen: check analysis.frozen_spaces for why"


def _restart_in_place(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``restart_schedule`` in place: every group back at its ``initial_lr``, the scheduler at its first step."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise DriverError(f"restart_schedule in place needs a torch LRScheduler, got {type(scheduler).__name__}; "
                          "use restart_schedule=False (the schedule continues) or inplace=False")
    scheduler.last_epoch = 0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# -- distributed helpers ------------------------------------------------------------------------
def _distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank (identity when not distributed)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_rank0() -> bool:
    """Whether this process decides (rank 0, or the only process)."""
    return not _distributed() or dist.get_rank() == 0


def ddp_wrapper(**ddp_kwargs: Any) -> Callable[[nn.Module], nn.Module]:
    """A ``wrap`` that puts the model (again, after every rejuvenation) in DistributedDataParallel."""
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        return DistributedDataParallel(module, **ddp_kwargs)

    return wrap


def _progress_kind(progress: bool | str) -> str:
    """The bar's kind for ``progress=True`` (tqdm, else plain text) / ``"tqdm"`` / ``"rich"`` / ``"text"``."""
    kind = "auto" if progress is True else progress
    if kind not in PROGRESS_KINDS:
        raise DriverError(f"progress must be False, True, 'tqdm', 'rich' or 'text', got {progress!r}")
    return kind


# -- the driver --------------------------------------------------------------------------------------
def _plan_option(check: Callable[[Any], Any], value: Any) -> Any:
    """A plan option checked at construction (``check_gamma0``, ``check_align``), a failure raised as a DriverError."""
    try:
        return check(value)
    except PlanError as error:
        raise DriverError(str(error)) from error


def check_settings(target: float, interval: int | None, delta_r: float, delta_lambda: float,
                    max_rounds: int | None, scheme: str, lam: float) -> None:
    """Settings within their ranges, else a DriverError saying which."""
    if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise DriverError(f"lam (the initial λ) must be a finite number >= 0, got {lam!r}; the official CIFAR "
                          "code uses a fixed 1.5e-4 (lam=1.5e-4, delta_lambda=0), the paper's ImageNet run 0")
    if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise DriverError(f"target must be a utilization ratio in (0, 1), got {target!r}; the paper uses 0.5")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise DriverError(f"interval must be a positive number of steps or None (call check() yourself), "
                          f"got {interval!r}")
    if not (math.isfinite(delta_r) and delta_r >= 0 and math.isfinite(delta_lambda) and delta_lambda >= 0):
        raise DriverError(f"delta_r and delta_lambda must be finite and >= 0, got {delta_r!r}, {delta_lambda!r}")
    if max_rounds is not None and (isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 0):
        raise DriverError(f"max_rounds must be None or an int >= 0, got {max_rounds!r}")
    if scheme not in SCHEMES:
        raise DriverError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")


class NeuralRejuvenation:
    """Train any model with Neural Rejuvenation: sparsify γ, monitor r(θ), rejuvenate below the target.

    ``nr.model`` and ``nr.optimizer`` are the current ones (both change at a rejuvenation, unless
    ``inplace=True``: then they stay the user's objects); ``nr.module`` is the model without the
    ``wrap`` (DDP) around it.
    """

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, *, example_inputs: Any,
                 budget: Budget | int | None = None, target: float = 0.5, interval: int | None = 100,
                 delta_r: float = 0.01, delta_lambda: float = 5e-5, scheme: str = "nr", rescale: bool = False,
                 gamma0: float | str | None = None, max_rounds: int | None = None, seed: int | None = None,
                 scheduler_factory: SchedulerFactory | None = None, restart_schedule: bool = False,
                 threshold: float = 0.01, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 progress: bool | str = False, total: int | None = None, lam: float = 0.0,
                 carry_state: bool = True, example_kwargs: dict[str, Any] | None = None,
                 capture: str = "auto", align: int = 8, inplace: bool = False, constants: str = "drop",
                 residual: str = "rejuvenate") -> None:
        check_settings(target, interval, delta_r, delta_lambda, max_rounds, scheme, lam)
        check_real_weights(model)  # at construction, not at the first rejuvenation
        if not callable(optimizer_factory) and not (inplace and isinstance(optimizer_factory, torch.optim.Optimizer)):
            raise DriverError("optimizer_factory must be callable: params -> torch.optim.Optimizer (with inplace=True "
                              "it may also be the optimizer itself)")
        self.inplace = bool(inplace)
        self.target, self.interval = float(target), interval
        self.delta_r, self.delta_lambda = float(delta_r), float(delta_lambda)  # floats: no tensor λ, no sync
        self.scheme, self.rescale, self.max_rounds, self.threshold = scheme, bool(rescale), max_rounds, threshold
        self.gamma0 = _plan_option(check_gamma0, gamma0)
        self.align = _plan_option(check_align, align)
        self.constants = _plan_option(check_constants, constants)
        self.residual = _plan_option(check_residual, residual)
        self.example_inputs = example_inputs
        self._capture = {"example_kwargs": example_kwargs, "capture": capture}
        self.seed = int(seed) if seed is not None else torch.initial_seed() % 2**31
        self._factory, self._scheduler_factory, self._wrap = optimizer_factory, scheduler_factory, wrap
        self.restart_schedule, self.carry_state, self.lam0 = restart_schedule, bool(carry_state), float(lam)
        analysis = self._analyze(model)
        if not analysis.whole:
            raise DriverError(f"{type(model).__name__} was captured as islands ({', '.join(analysis.islands)}): the "
                              "driver trains one graph. Build it on one island (model.get_submodule(path)), or "
                              "call nrfx.rejuvenate on the whole model yourself")
        kind, value = Budget.coerce(budget).resolve(analysis)
        self.budget = Budget.of(kind, value)
        self._stage = self._new_stage(model, analysis, [])
        self.lam, self.rounds, self.steps = self.lam0, 0, 0
        self.history: list[dict[str, Any]] = []
        self._r_prev = _from_rank0(self.utilization())
        self._scale0, self._collapse_warned, self._collapse_run = _largest_scales(self._stage.norms), False, 0
        self._progress = Progress(_progress_kind(progress), total) if progress and _is_rank0() else None

    def _analyze(self, module: nn.Module) -> Analysis:
        """The analysis of a model; in place, with the spaces its own code pins frozen (they are not monitored)."""
        analysis = analyze(module, self.example_inputs, **self._capture)
        return freeze_for_inplace(analysis, module) if self.inplace and analysis.whole else analysis

    # -- the current stage --------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model to call in the training loop (wrapped, e.g. in DDP, when ``wrap`` was given)."""
        return self._stage.model

    @property
    def module(self) -> nn.Module:
        """The current model without the wrapper."""
        return self._stage.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The current optimizer (rebuilt by the factory at every rejuvenation)."""
        return self._stage.optimizer

    @property
    def scheduler(self) -> Any:
        """The current LR scheduler from ``scheduler_factory`` (None without one)."""
        return self._stage.scheduler

    @property
    def analysis(self) -> Analysis:
        """The analysis of the current model (shares its parameters)."""
        return self._stage.analysis

    @property
    def plans(self) -> list[Plan]:
        """The plans of every rejuvenation so far, in order (replayable on the original model)."""
        return list(self._stage.plans)

    @property
    def finished(self) -> bool:
        """Whether ``max_rounds`` rejuvenations are done: no more penalty, checks only record r."""
        return self.max_rounds is not None and self.rounds >= self.max_rounds

    def _new_stage(self, module: nn.Module, analysis: Analysis, plans: list[Plan]) -> _Stage:
        """Monitored norms, optimizer and scheduler for a model (nothing is swapped in here); in place after the
        first stage, the optimizer and scheduler are the current ones."""
        norms = _monitored_norms(analysis, module)
        if not norms:
            raise DriverError(_no_signal_message(module, analysis))
        if self.inplace and plans:
            optimizer, scheduler = self.optimizer, self.scheduler
        else:
            optimizer = self._factory if isinstance(self._factory, torch.optim.Optimizer) else \
                _build_optimizer(self._factory, module)
            scheduler = self._scheduler_factory(optimizer) if self._scheduler_factory is not None else None
        model = self._wrap(module) if self._wrap is not None else module
        sites = frozenset(analysis.mask_sites) - frozenset(analysis.frozen_sites)
        return _Stage(module, model, analysis, norms, optimizer, scheduler, plans, sites)

    # -- Algorithm 1 --------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        """Live channels of the current model's followed norms: ``|γ| >= threshold · max|γ|`` (paper Sec. 3.1)."""
        return {k: v for k, v in norm_masks(self.module, self.threshold).items() if k in self._stage.sites}

    def utilization(self) -> float:
        """r(θ) of the current model, read from γ alone, in the budget's kind (params or MACs)."""
        use = self.analysis.utilization(self.masks())
        return by_kind(self.budget.kind, use.r_params, use.r_macs)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """λ·sign(γ) into the grads of the monitored scales, an optimizer step, and a check every interval."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        self.penalize()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.steps += 1
        record = self.check() if self.interval and self.steps % self.interval == 0 else None
        if self._progress is not None:
            self._progress.update(None if record is None else
                                  f"r={record['r']:.3f} λ={record['lam']:.2e} round={record['rounds']}")

    def penalize(self) -> None:
        """Add the L1 sub-gradient λ·sign(γ) to the grads of the scales of free norms (no host sync, O(1) calls).

        ``step()`` calls it before the optimizer step; a training framework that steps the optimizer
        itself calls it after backward (and after unscaling, with AMP) and then ``check()`` every interval.
        """
        if self.lam == 0.0 or self.finished:
            return
        self._stage.penalty.apply(self.lam)

    def check(self) -> dict[str, Any]:
        """Measure r(θ); rejuvenate below the target, else adapt λ; returns the history record."""
        r = _from_rank0(self.utilization())
        if self.finished:
            return self._record(r, "monitor")
        if r < self.target:
            return self._rejuvenate(r)
        record = self._record(r, "check")
        self._warn_if_collapsed(r, record)
        self.lam = self.lam if r < self._r_prev - self.delta_r else self.lam + self.delta_lambda
        self._r_prev = r
        return record

    def _warn_if_collapsed(self, r: float, record: dict[str, Any]) -> None:
        """Warn once when the monitored scales stay shrunk together: the relative dead test cannot fire."""
        if self._collapse_warned or r < COLLAPSE_R or self.lam == 0.0:
            self._collapse_run = 0
            return
        now = _largest_scales(self._stage.norms)
        shrunk = sum(n < COLLAPSE_SCALE * s for n, s in zip(now, self._scale0, strict=True))
        self._collapse_run = self._collapse_run + 1 if shrunk >= max(1, COLLAPSE_SHARE * len(now)) else 0
        if self._collapse_run < COLLAPSE_CHECKS:
            return
        self._collapse_warned = record["collapsed"] = True
        warnings.warn(
            f"the norm scales shrink together: in {shrunk} of {len(now)} monitored norms the largest |γ| fell below "
            f"{COLLAPSE_SCALE:.0%} of its value at the start of this round, and r(θ) = {r:.2f} stayed near 1, "
            f"for {COLLAPSE_CHECKS} checks in a row. "
            f"The relative dead test |γ| < {self.threshold}·max|γ| cannot fire, so λ = {self.lam:.3g} keeps "
            "growing and no rejuvenation comes. Use a smaller delta_lambda or a fixed λ (lam=1.5e-4, "
            "delta_lambda=0, the official CIFAR setting), and check that the training loss is not ~0 (a task "
            "the net fits exactly leaves nothing to resist the L1 term)", NrfxWarning, stacklevel=4)

    def _record(self, r: float, event: str, **extra: Any) -> dict[str, Any]:
        """Append one history record and return it."""
        record = {"step": self.steps, "r": r, "lam": self.lam, "event": event, "rounds": self.rounds,
                  "cost": self._cost(), **extra}
        self.history.append(record)
        return record

    def _cost(self) -> int:
        """c(A) of the current model in the budget's kind."""
        return by_kind(self.budget.kind, self.analysis.params, self.analysis.macs)

    def _rejuvenate(self, r: float) -> dict[str, Any]:
        """Rewrite the model, rebuild the optimizer with carried state; swap only when all succeeded.

        In place the model, optimizer and scheduler objects stay (the rewrite is undone whole if it
        fails its check); only a ``wrap`` (DDP) is rebuilt around the resized model.
        """
        module = self._rejuvenated_module(self.masks())
        stage = self._new_stage(module, self._analyze(module), [*self._stage.plans, module.nrfx_plan])
        if not self.inplace:
            self._carry(stage)
        elif self.restart_schedule:
            _restart_in_place(stage.scheduler, stage.optimizer)
        lam, cost, self._stage = self.lam, self._cost(), stage
        self.rounds += 1
        self.lam = self.lam0
        self._r_prev = _from_rank0(self.utilization())
        self._scale0, self._collapse_run = _largest_scales(stage.norms), 0
        return self._record(r, "rejuvenate", lam_before=lam, r_after=self._r_prev, cost_before=cost,
                            widths=list(module.nrfx_plan.new_widths))

    def _rejuvenated_module(self, masks: dict[str, torch.Tensor]) -> nn.Module:
        """The new model: planned on rank 0; other ranks replay rank 0's plan on their (identical) model."""
        module, message = None, None
        if _is_rank0():
            try:
                module = rejuvenate(self.module, masks, self.budget, example_inputs=self.example_inputs,
                                    **self._capture, **self._inplace_options(),
                                    scheme=self.scheme, rescale=self.rescale, gamma0=self.gamma0,
                                    seed=self.seed + self.rounds, align=self.align, constants=self.constants,
                                    residual=self.residual, analysis=self.analysis)
            except Exception as error:
                if not _distributed():
                    raise
                message = f"{type(error).__name__}: {error}"
        shared = _from_rank0(message or (module.nrfx_plan.to_dict() if module is not None else None))
        if isinstance(shared, str):
            raise DriverError(f"rejuvenation failed on rank 0: {shared}")
        if module is not None:
            return module
        return apply_plan(self.module, shared, self.example_inputs, **self._capture, **self._inplace_options())

    def _inplace_options(self) -> dict[str, Any]:
        """The in-place keywords of a rewrite: the model and this optimizer rewritten where they are."""
        return {"inplace": True, "optimizer": self.optimizer, "carry_state": self.carry_state} if self.inplace else {}

    def _carry(self, stage: _Stage) -> None:
        """Optimizer state (unless ``carry_state=False``), group settings and schedule into a new stage."""
        dropped = carry_optimizer_state(self.optimizer, stage.optimizer, self.module, stage.module,
                                        stage.module.nrfx_param_map) if self.carry_state else []
        if dropped:
            warnings.warn(f"optimizer state of {len(dropped)} parameters could not be sliced and starts fresh: "
                          f"{dropped[:5]}", NrfxWarning, stacklevel=4)
        if self.restart_schedule:
            return
        if stage.scheduler is not None and self.scheduler is not None:
            stage.scheduler.load_state_dict(self.scheduler.state_dict())
        copy_group_settings(self.optimizer, stage.optimizer)

    # -- checkpoints --------------------------------------------------------------------------
    def progress_state(self) -> dict[str, Any]:
        """Plans, seed, λ, counters and history: the driver's own state, plain data (JSON-safe)."""
        return {
            "format": _FORMAT, "plans": [p.to_dict() for p in self._stage.plans], "seed": self.seed,
            "lam": self.lam, "r_prev": self._r_prev, "rounds": self.rounds, "steps": self.steps,
            "scale0": list(self._scale0), "collapse_warned": self._collapse_warned, "collapse_run": self._collapse_run,
            "history": json.loads(json.dumps(self.history)),
            "budget": {"params": self.budget.params, "macs": self.budget.macs},
        }

    def load_progress(self, state: dict[str, Any]) -> None:
        """Take λ, counters, history and seed from ``progress_state()``; in place, for a model a framework already
        rebuilt (its state dict replayed the plans): the plans are only recorded, nothing is rewritten."""
        if not self.inplace:
            raise DriverError("load_progress is for a driver in place (inplace=True); use load_state_dict")
        if not isinstance(state, dict) or state.get("format") != _FORMAT or not isinstance(state.get("plans"), list):
            raise DriverError("not a NeuralRejuvenation progress_state (format key missing or different)")
        plans = [Plan.from_dict(data) for data in state["plans"]]
        self._stage = self._new_stage(self.module, self._analyze(self.module), plans) if plans else self._stage
        self._set_progress(state)

    def _set_progress(self, state: dict[str, Any]) -> None:
        """Budget, seed, λ, counters and history from a saved state."""
        kind, value = next((k, v) for k, v in state["budget"].items() if v is not None)
        self.budget = Budget.of("macs" if kind == "flops" else kind, value)  # flops: written before the rename
        self.seed, self.lam, self._r_prev = state["seed"], float(state["lam"]), state["r_prev"]
        self.rounds, self.steps, self.history = state["rounds"], state["steps"], list(state["history"])
        self._scale0 = list(state.get("scale0", _largest_scales(self._stage.norms)))
        self._collapse_warned = bool(state.get("collapse_warned", False))
        self._collapse_run = int(state.get("collapse_run", 0))

    def state_dict(self) -> dict[str, Any]:
        """``progress_state()`` plus model/optimizer/scheduler state (tensors not copied)."""
        return {
            **self.progress_state(),
            "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the saved plans on this (fresh, original) model, then load every state; atomic."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise DriverError("not a NeuralRejuvenation state_dict (format key missing or different)")
        if self._stage.plans or self.rounds:
            raise DriverError("load_state_dict needs a driver built over a fresh copy of the original model "
                              f"(this one has already rejuvenated {self.rounds} times)")
        _check_checkpoint(state)
        module, plans = self.module, []
        for data in state["plans"]:
            plan = Plan.from_dict(data)
            module = apply_plan(module, plan, self.example_inputs, **self._capture, **self._inplace_options())
            plans.append(plan)
        _check_model_state(module, state["model"])
        analysis = self._analyze(module) if plans else self.analysis
        stage = self._new_stage(module, analysis, plans)
        _load_part("optimizer", stage.optimizer, state["optimizer"])
        if stage.scheduler is not None and state["scheduler"] is not None:
            _load_part("scheduler", stage.scheduler, state["scheduler"])
        module.load_state_dict(state["model"])  # last: keys and shapes were checked, nothing else can fail
        self._stage = stage
        self._set_progress(state)

    # -- history --------------------------------------------------------------------------------
    def save_history(self, path: str) -> None:
        """Write the history records as JSON."""
        save_history(self.history, path)

    def plot_history(self, path: str) -> bool:
        """Plot r(θ) and λ over steps to ``path``; False (and a warning) without matplotlib."""
        return plot_history(self.history, path, target=self.target)

    def close(self) -> None:
        """Close the progress bar."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None


_CHECKPOINT_TYPES: dict[str, tuple[type, ...]] = {
    "plans": (list,), "seed": (int,), "lam": (int, float), "rounds": (int,), "steps": (int,), "history": (list,),
    "budget": (dict,), "model": (dict,), "optimizer": (dict,), "scheduler": (dict, type(None)),
    "r_prev": (int, float, type(None)),
}


def _check_checkpoint(state: dict[str, Any]) -> None:
    """Every key a driver checkpoint needs, of its type and range, before anything is replaced."""
    for key, types in _CHECKPOINT_TYPES.items():
        if key not in state:
            raise DriverError(f"driver checkpoint: key {key!r} is missing (a partial or corrupt file?)")
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise DriverError(f"driver checkpoint: {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                              f"got {type(value).__name__}")
    if not math.isfinite(state["lam"]) or state["lam"] < 0:
        raise DriverError(f"driver checkpoint: 'lam' must be finite and >= 0, got {state['lam']!r}")
    if min(state["rounds"], state["steps"], state["seed"]) < 0:
        raise DriverError("driver checkpoint: 'rounds', 'steps' and 'seed' must be >= 0")
    budget = state["budget"]
    if set(budget) not in ({"params", "macs"}, {"params", "flops"}) or sum(v is not None for v in budget.values()) != 1:
        raise DriverError("driver checkpoint: 'budget' must be {'params': N or None, 'macs': N or None}, one set")


def _load_part(key: str, target: Any, state: dict[str, Any]) -> None:
    """``target.load_state_dict(state)``, a failure raised as a DriverError naming the checkpoint key."""
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
        raise DriverError(f"driver checkpoint: {key!r} does not fit the rebuilt {key}: {error}") from error


def _check_model_state(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """The saved model state has exactly this module's keys and shapes (checked before loading; the plans an
    in-place model carries are compared by the load itself)."""
    own = module.state_dict()
    bad = sorted(set(own) ^ set(saved)) + [k for k in own.keys() & saved.keys() if k != PLANS_KEY and
                                            tuple(own[k].shape) != tuple(saved[k].shape)]
    if bad:
        raise DriverError(f"the checkpoint's model state does not fit the replayed model ({len(bad)} keys differ, "
                          f"e.g. {bad[:3]}): was the driver built over a fresh copy of the original model?")
