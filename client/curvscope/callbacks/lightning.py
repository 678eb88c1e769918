"""A PyTorch Lightning ``Callback`` that measures curvature while a ``Trainer`` fits
(``pip install 'curvscope[lightning]'``).

    trainer = L.Trainer(callbacks=[CurvscopeCallback((x_eval, y_eval), server="gpu-box:50051", every_steps=100)])

Values go to every logger of the trainer (``trainer.loggers``: TensorBoard, W&B, CSV, ...) at
the current global step, and into ``trainer.callback_metrics`` (so ``EarlyStopping`` or
``ModelCheckpoint`` can monitor them).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from .. import in_memory
from . import CurvatureMonitor, Finished, check_schedule


class CurvscopeCallback(pl.Callback):
    """Every ``every_steps`` optimizer steps (or ``every_epochs`` epochs), analyse the
    LightningModule on ``data`` (a fixed evaluation batch) beside the training loop. The other
    keywords are those of ``CurvatureMonitor``: ``server``/``client``/``local``, the analyses,
    ``stop_policy`` (a failed gate sets ``trainer.should_stop``).

    Sharpness is compared with 2/η for the first optimizer's learning rate at that step; the SGD
    verdict uses the training loader's batch size times ``accumulate_grad_batches``.
    """

    def __init__(self, data: Any, *, every_steps: int | None = None, every_epochs: int | None = None,
                 **monitor_options: Any) -> None:
        check_schedule(every_steps, every_epochs)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.monitor = CurvatureMonitor(data, **monitor_options)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_steps and trainer.global_step > 0 and trainer.global_step % self.every_steps == 0 \
                and trainer.global_step != getattr(self, "_last_step", None):
            self._last_step = trainer.global_step  # one optimizer step may span several batches
            self._submit(trainer, pl_module, trainer.global_step)
        self._log(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_epochs and (trainer.current_epoch + 1) % self.every_epochs == 0:
            self._submit(trainer, pl_module, trainer.global_step)
        self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.close()  # the analysis in flight ends and is logged
        self._log(trainer)

    def _submit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not trainer.is_global_zero:
            return  # in distributed training only the main process analyses
        optimizers = trainer.optimizers
        rate = optimizers[0].param_groups[0]["lr"] if optimizers and optimizers[0].param_groups else None
        loader = trainer.train_dataloader
        per_step = getattr(loader, "batch_size", None)
        batch_size = per_step * trainer.accumulate_grad_batches if per_step else None
        self.monitor.submit(step, pl_module, rate, batch_size)

    def _log(self, trainer: pl.Trainer) -> None:
        for finished in self.monitor.collect():
            self._log_one(trainer, finished)
        if self.monitor.should_stop:
            trainer.should_stop = True

    def _log_one(self, trainer: pl.Trainer, finished: Finished) -> None:
        prefix = self.monitor.prefix
        values = {**finished.values, f"{prefix}step": float(finished.step),
                  f"{prefix}skipped": float(self.monitor.skipped)}
        if finished.error is not None:
            values[f"{prefix}failed"] = 1.0
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        torch = in_memory.caller_torch()
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
