"""A Hugging Face ``TrainerCallback`` that measures curvature while a ``Trainer`` trains
(``pip install 'curvscope[transformers]'``).

    trainer = Trainer(model, args, train_dataset=train,
                      callbacks=[CurvscopeCallback(eval_batch, server="gpu-box:50051", every_steps=100)])

Values are logged with ``Trainer.log``, so they reach every reporter the arguments configure
(TensorBoard, W&B, ...) and ``trainer.state.log_history``.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from . import CurvatureMonitor, Finished, check_schedule


class CurvscopeCallback(TrainerCallback):
    """Every ``every_steps`` optimizer steps (or ``every_epochs`` epochs), analyse the model on
    ``data`` (a fixed evaluation batch: ``(inputs, targets)`` or a dict of named inputs with
    ``labels``/``targets``) beside the training loop. The other keywords are those of
    ``CurvatureMonitor``: ``server``/``client``/``local``, the analyses, ``stop_policy``.

    Sharpness is compared with 2/η for the optimizer's learning rate at that step; the SGD
    verdict uses the loader's batch size times the gradient accumulation steps and processes.
    In distributed training only the main process analyses.
    """

    def __init__(self, data: Any, *, every_steps: int | None = None, every_epochs: int | None = None,
                 trainer: Trainer | None = None, **monitor_options: Any) -> None:
        check_schedule(every_steps, every_epochs)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.monitor = CurvatureMonitor(data, **monitor_options)
        self.trainer = trainer

    # The callback API hands a callback no trainer, yet the values must go through Trainer.log to
    # reach the reporters it configured. Trainer.__init__ calls on_init_end and train() calls
    # on_train_begin, so the trainer is the caller's ``self`` a few frames up.
    def _find_trainer(self) -> None:
        if self.trainer is not None:
            return
        frame = inspect.currentframe()
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                self.trainer = candidate
                return
            frame = frame.f_back

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._find_trainer()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self._find_trainer()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.every_steps and state.global_step % self.every_steps == 0 and state.is_world_process_zero:
            self._submit(args, state, kwargs)
        self._log(state, control)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.every_epochs and round(state.epoch or 0) % self.every_epochs == 0 and state.is_world_process_zero:
            self._submit(args, state, kwargs)
        self._log(state, control)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.monitor.close()  # the analysis in flight ends and is logged
        self._log(state, control)

    def _submit(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        optimizer = kwargs.get("optimizer")
        rate = optimizer.param_groups[0]["lr"] if optimizer is not None and optimizer.param_groups else None
        loader = kwargs.get("train_dataloader")
        per_step = getattr(loader, "batch_size", None) or args.per_device_train_batch_size
        batch_size = per_step * args.gradient_accumulation_steps * max(args.world_size, 1)
        self.monitor.submit(state.global_step, kwargs["model"], rate, batch_size)

    def _log(self, state: TrainerState, control: TrainerControl) -> None:
        for finished in self.monitor.collect():
            self._log_one(finished)
        if self.monitor.should_stop:
            control.should_training_stop = True

    def _log_one(self, finished: Finished) -> None:
        prefix = self.monitor.prefix
        values = {**finished.values, f"{prefix}step": float(finished.step),
                  f"{prefix}skipped": float(self.monitor.skipped)}
        if finished.error is not None:
            values[f"{prefix}failed"] = 1.0
        if self.trainer is None:
            raise RuntimeError("CurvscopeCallback found no Trainer to log through; pass trainer=")
        self.trainer.log(values)
