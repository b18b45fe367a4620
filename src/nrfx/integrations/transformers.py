"""transformers: Neural Rejuvenation inside a Hugging Face ``Trainer`` as a ``TrainerCallback``.

``on_init_end`` registers the plan-replaying load pre-hook on the target module (``Trainer``
loads a checkpoint's weights with ``model.load_state_dict``, so a resumed run replays the saved
rounds before the tensors load); ``on_train_begin`` builds an in-place driver on the Trainer's
optimizer (accelerate's ``AcceleratedOptimizer`` unwrapped) and scheduler; ``on_pre_optimizer_step``
adds the L1 penalty (after gradient clipping, which unscales AMP grads); ``on_step_end`` /
``on_epoch_end`` check r(θ) and rejuvenate in place.  Checks go to ``state.log_history`` (and so
to ``trainer_state.json``) as ``nrfx/r``, ``nrfx/lambda``, ``nrfx/rounds``, ``nrfx/cost``.  The
driver's progress (λ, rounds, history) is written as ``nrfx_progress.json`` into every checkpoint
folder and read back when training resumes from one.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

from torch import nn

from nrfx.errors import NrfxWarning
from nrfx.integrations._common import (
    PROGRESS_FILE,
    CallbackCore,
    check_single_process,
    metrics,
    prepare_target,
    torch_optimizer,
    torch_scheduler,
)
from nrfx.rewrite.inplace import recorded_rounds

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError("nrfx.integrations.transformers needs Hugging Face transformers: pip install transformers") \
        from error

__all__ = ["NeuralRejuvenationCallback"]


class NeuralRejuvenationCallback(CallbackCore, TrainerCallback):
    """Train the Trainer's model (or its submodule ``module``) with Neural Rejuvenation, in place.

    Takes the keyword arguments of ``nrfx.NeuralRejuvenation`` plus ``every_n_steps`` (check r(θ)
    every N optimizer steps) and ``check_on_epoch_end`` (default: True when ``every_n_steps`` is
    None).  ``callback.nr`` is the driver once training started; ``callback.history`` its records.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._logs: dict[str, float] = {}

    # -- hooks ------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """At ``Trainer(...)``: one process only, and the target replays the plans of a checkpoint it loads."""
        check_single_process(args.world_size, "Hugging Face Trainer", "args.world_size")
        if model is not None:
            prepare_target(self._target(model), self.settings)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> None:
        """The in-place driver on the Trainer's optimizer and scheduler (after a checkpoint's weights loaded)."""
        target = self._target(model)
        prepare_target(target, self.settings)  # a model handed to train() after __init__
        if state.global_step > 0:
            self._runner.pending = _read_progress(args, state.global_step, bool(recorded_rounds(target)))
        self._runner.start(target, torch_optimizer(optimizer, "Hugging Face Trainer"), torch_scheduler(lr_scheduler),
                           state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The L1 sub-gradient λ·sign(γ), after backward and clipping, before the optimizer step."""
        self._runner.penalize()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Every ``every_n_steps`` optimizer steps: check r(θ), rejuvenate in place below the target."""
        self._log(state, self._runner.after_step(state.global_step))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """At an epoch end (``check_on_epoch_end``): check r(θ), rejuvenate in place below the target."""
        self._log(state, self._runner.at_epoch_end(state.global_step))

    def _log(self, state: Any, record: dict[str, Any] | None) -> None:
        """A check's record into ``state.log_history`` (saved in trainer_state.json) and the next ``on_log``."""
        if record is None:
            return
        values = metrics(record)
        state.log_history.append({**values, "step": record["step"]})
        self._logs.update(values)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """The latest check's metrics added to the logs (for the callbacks after this one)."""
        if logs is not None and self._logs:
            logs.update(self._logs)
            self._logs = {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The driver's progress as JSON into the checkpoint folder just written (process zero only)."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        progress = self._runner.progress()
        if progress is None or not args.should_save or not os.path.isdir(folder):
            return
        with open(os.path.join(folder, PROGRESS_FILE), "w") as file:
            json.dump(progress, file)


def _progress_places(args: Any, step: int) -> list[str]:
    """Where a resumed run's progress file can be: ``args.resume_from_checkpoint``, else the step's folder."""
    folders = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
    folders.append(os.path.join(args.output_dir, f"checkpoint-{step}"))
    return [os.path.join(folder, PROGRESS_FILE) for folder in folders]


def _read_progress(args: Any, step: int, rejuvenated: bool) -> dict[str, Any] | None:
    """The saved progress of a resumed run; a warning when a rejuvenated model comes without it."""
    for path in _progress_places(args, step):
        if os.path.isfile(path):
            with open(path) as file:
                return json.load(file)
    if rejuvenated:
        warnings.warn(f"resumed at step {step} with a rejuvenated model but no {PROGRESS_FILE} in "
                      f"{_progress_places(args, step)}: λ, the round count and the history start afresh. Resume "
                      f"from a checkpoint folder under args.output_dir (or set args.resume_from_checkpoint)",
                      NrfxWarning, stacklevel=3)
    return None
