"""Hugging Face ``transformers.Trainer`` support: :class:`SAMTrainer` runs ``SAM_SPS``.

``PSD`` and ``PerturbedAdam`` need no helper: they are per-step optimizers, pass them as
``Trainer(..., optimizers=(opt, scheduler))``. ``SAM_SPS`` needs two forward/backward
passes on the same batch, but ``Trainer`` calls ``optimizer.step()`` without a closure
after one backward (``SAM_SPS.step()`` then raises ``ValueError``). :class:`SAMTrainer`
overrides ``Trainer.training_step`` -- the hook the Trainer documents for custom steps --
to run the whole two-pass step there with the optimizer's two-pass API
(:meth:`~psd_torch.SAM_SPS.first_step`, a second forward/backward at the perturbed point,
:meth:`~psd_torch.SAM_SPS.second_step`); the Trainer's later ``optimizer.step()`` is a
no-op for that optimizer. Both passes go through ``Trainer.training_step`` itself, so the
loss (``compute_loss``), autocast and ``accelerator.backward`` are the Trainer's own.

Importing this module imports ``transformers`` (it is not imported by ``psd_torch``).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers import Trainer

from .sam_sps import SAM_SPS

__all__ = ["PolyakStepSizeScheduler", "SAMTrainer"]


class PolyakStepSizeScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A scheduler that changes nothing and reports ``SAM_SPS``'s step size.

    ``SAM_SPS`` writes its Polyak step size into ``param_groups[i]["lr"]`` every step;
    this scheduler's ``get_last_lr()`` returns those values (what the Trainer logs as
    ``learning_rate``) and its ``step()`` leaves them in place. :class:`SAMTrainer` uses it
    when no scheduler is given (the Trainer's default linear schedule would overwrite the
    reported step size; the update itself never reads ``lr``).
    """

    def get_lr(self) -> list[Any]:
        return [group["lr"] for group in self.optimizer.param_groups]


def _step_in_training_step(self: SAM_SPS, closure: Any = None, **kwargs: Any) -> Any:
    """``SAM_SPS.step`` as :class:`SAMTrainer` installs it on its optimizer: the Trainer's
    closure-less call is a no-op (the step already ran in ``training_step``); a call with
    a closure is the class's own two-pass step."""
    self._opt_called = True  # what an LR scheduler's step-tracking wrapper would record
    if closure is None:
        return None
    return SAM_SPS.step(self, closure, **kwargs)


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is a :class:`psd_torch.SAM_SPS`.

    Use it like ``Trainer``: ``SAMTrainer(model, args, train_dataset=...,
    optimizers=(SAM_SPS(model.parameters(), ...), None))``. Each training step runs the
    first forward/backward at :math:`x`, ``first_step(loss)``, the second forward/backward
    at :math:`e` and ``second_step(loss_e)``; the loss logged is the loss at :math:`x`.
    The gradients left for the Trainer (its clipping and its logged ``grad_norm``) are
    those at :math:`e` after the step has been applied; clipping them changes nothing.

    ``SAM_SPS`` sets ``param_groups[i]["lr"]`` to its Polyak step size every step and never
    reads it, so an LR scheduler has no effect on the update. Without one,
    :class:`PolyakStepSizeScheduler` is used, so ``optimizer.param_groups[0]["lr"]`` and
    the logged ``learning_rate`` are the step size (a user's scheduler would overwrite them).

    Raises:
        ValueError: ``args.gradient_accumulation_steps != 1`` (SAM perturbs along the
            full-batch gradient; accumulated two-pass steps are not implemented).
        TypeError: the optimizer is not a ``SAM_SPS`` (checked at the first step).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ga = self.args.gradient_accumulation_steps
        if ga != 1:
            raise ValueError(
                f"gradient_accumulation_steps: SAMTrainer needs 1, got {ga!r} (the perturbation "
                "uses the full-batch gradient; accumulated two-pass steps are not implemented)"
            )

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = PolyakStepSizeScheduler(
                self.optimizer if optimizer is None else optimizer
            )
        return self.lr_scheduler

    def _sam(self) -> SAM_SPS:
        opt = self.optimizer
        sam = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
        if not isinstance(sam, SAM_SPS):
            raise TypeError(
                f"optimizers: SAMTrainer needs a psd_torch.SAM_SPS, got {type(sam).__name__}"
            )
        if getattr(sam.step, "__func__", None) is not _step_in_training_step:
            sam.step = types.MethodType(_step_in_training_step, sam)  # type: ignore[method-assign]
        return sam

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        sam = self._sam()
        scaler = getattr(self.accelerator, "scaler", None)
        sam.zero_grad(set_to_none=True)
        with sam.first_pass(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if sam.first_step(loss, scaler=scaler):
            with sam.second_pass(model):
                loss_e = super().training_step(model, inputs, num_items_in_batch)
            sam.second_step(loss_e, scaler=scaler)
        return loss
