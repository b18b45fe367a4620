"""lightning: Neural Rejuvenation inside a Lightning 2.x ``Trainer`` as a ``Callback``.

``setup`` registers the plan-replaying load pre-hook on the target module (Lightning restores a
checkpoint's module state after ``setup``); ``on_train_start`` builds an in-place driver on
``trainer.optimizers[0]`` (and the scheduler of ``trainer.lr_scheduler_configs[0]``);
``on_before_optimizer_step`` adds the L1 penalty (after backward and AMP unscaling);
``on_train_batch_end`` / ``on_train_epoch_end`` check r(θ) and rejuvenate in place, and give the copy a
weight-averaging callback keeps (EMA, SWA) the same round.  Under
``strategy="ddp"`` rank 0 decides and plans, the other ranks replay its plan, and the callback puts
a new DistributedDataParallel around the resized module.  Every check is logged to
``trainer.loggers`` as ``nrfx/r``, ``nrfx/lambda``, ``nrfx/rounds``, ``nrfx/cost``.  The driver's
progress (λ, rounds, history) travels in the callback's ``state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch

from nrfx.integrations._common import (
    CallbackCore,
    check_single_process,
    metrics,
    prepare_target,
    torch_optimizer,
    torch_scheduler,
)
from nrfx.train.driver import DriverError

try:
    from lightning.pytorch import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as error:
        raise ImportError("nrfx.integrations.lightning needs Lightning: pip install lightning "
                          "(or pytorch_lightning)") from error

__all__ = ["NeuralRejuvenationCallback"]


class NeuralRejuvenationCallback(CallbackCore, Callback):
    """Train the LightningModule (or its submodule ``module``) with Neural Rejuvenation, in place.

    Takes the keyword arguments of ``nrfx.NeuralRejuvenation`` plus ``every_n_steps`` (check r(θ)
    every N optimizer steps) and ``check_on_epoch_end`` (default: True when ``every_n_steps`` is
    None).  ``callback.nr`` is the driver once training started; ``callback.history`` its records.
    """

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Before Lightning restores a checkpoint: one process or DDP to fit; the target replays saved plans on load."""
        if stage == "fit" and not _rebuildable_ddp(trainer.strategy):
            check_single_process(trainer.world_size, "Lightning", f"strategy {type(trainer.strategy).__name__}",
                                 'single-process training and strategy="ddp" (DDPStrategy, subprocess launcher)')
        prepare_target(self._target(pl_module), self.settings)
        for copy in _averaged_copies(trainer):  # made by a setup that ran before this one
            prepare_target(self._target(copy), self.settings)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """The in-place driver on the trainer's first optimizer and its scheduler (after any checkpoint restore)."""
        if len(trainer.optimizers) != 1:
            raise DriverError(f"Lightning: NeuralRejuvenationCallback needs exactly one optimizer, "
                              f"configure_optimizers returned {len(trainer.optimizers)}")
        configs = getattr(trainer, "lr_scheduler_configs", [])
        scheduler = torch_scheduler(configs[0].scheduler) if configs else None
        self._runner.start(self._target(pl_module), torch_optimizer(trainer.optimizers[0], "Lightning"),
                           scheduler, trainer.global_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The L1 sub-gradient λ·sign(γ), after backward (and AMP unscaling), before the optimizer step."""
        self._runner.penalize()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Every ``every_n_steps`` optimizer steps: check r(θ), rejuvenate in place below the target."""
        self._after_check(trainer, self._runner.after_step(trainer.global_step))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """At an epoch end (``check_on_epoch_end``): check r(θ), rejuvenate in place below the target."""
        self._after_check(trainer, self._runner.at_epoch_end(trainer.global_step))

    def _after_check(self, trainer: Any, record: dict[str, Any] | None) -> None:
        """A check's record to every logger of the trainer (rank 0 logs); after a rejuvenation the averaged copies
        of weight-averaging callbacks take the same plan, and a new DDP wrapper."""
        if record is None:
            return
        if record["event"] == "rejuvenate":
            for copy in _averaged_copies(trainer):
                self._runner.replay_round(self._target(copy))
            _rewrap(trainer.strategy)
        for logger in trainer.loggers:
            logger.log_metrics(metrics(record), step=record["step"])

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The driver's progress (plans, λ, counters, history; plain data), empty before training."""
        progress = self._runner.progress()
        return {"progress": progress} if progress is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved progress; ``on_train_start`` hands it to the driver it builds."""
        self._runner.pending = state_dict.get("progress")


def _rebuildable_ddp(strategy: Any) -> bool:
    """Rule: Lightning's DDPStrategy launched as subprocesses (``strategy="ddp"``) is the multi-process case the
    callback supports: it re-wraps the resized module; spawned/forked workers would hand resized weights back to a
    main-process module that cannot replay the plans."""
    try:
        from lightning.pytorch.strategies import DDPStrategy
    except ImportError:
        from pytorch_lightning.strategies import DDPStrategy
    return type(strategy) is DDPStrategy and getattr(strategy, "_start_method", None) == "popen"


def _rewrap(strategy: Any) -> None:
    """After an in-place rejuvenation under DDP, a new DistributedDataParallel around the resized LightningModule
    (its constructor broadcasts rank 0's parameters and buffers); the old wrapper is dropped with its hooks."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy._setup_model(strategy.lightning_module)
        strategy._register_ddp_hooks()


def _averaged_copies(trainer: Any) -> list[Any]:
    """The LightningModule copies that weight-averaging callbacks keep (``WeightAveraging`` and its
    ``EMAWeightAveraging``: the module of their ``AveragedModel``; ``StochasticWeightAveraging``: its copy), once made.
    They pair their parameters with the model's one to one, so they must be rejuvenated with it."""
    try:
        from lightning.pytorch.callbacks import StochasticWeightAveraging, WeightAveraging
    except ImportError:  # pytorch_lightning, or a Lightning without WeightAveraging (before 2.5)
        return []
    averaging = (WeightAveraging, StochasticWeightAveraging)
    averages = [callback._average_model for callback in trainer.callbacks if isinstance(callback, averaging)]
    return [a.module if isinstance(a, torch.optim.swa_utils.AveragedModel) else a for a in averages if a is not None]
