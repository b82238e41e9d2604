"""SAM-SPS training step for ``model.fit``: :class:`SAMTrainStep`, :class:`SAMModel`, :class:`SAMSequential`.

A SAM-SPS step evaluates the mini-batch loss twice: the gradient ``g`` at the
parameters ``x``, then the loss and gradient at the perturbed point
``e = x + c g`` (``c`` from :func:`psd_core.sam_perturbation_scale`). The
optimizer :class:`psd_keras.SAM_SPS` does the math (through the core's
:func:`psd_core.sam_sps`); this module supplies the second evaluation as a
``value_and_grad_fn`` for each backend:

* TensorFlow: a second ``tf.GradientTape`` pass (with ``e`` assigned into the
  variables) inside the same ``tf.function``;
* JAX: a second ``jax.value_and_grad`` of the stateless loss at ``e``;
* PyTorch: a second forward/``backward`` with ``e`` copied into the parameters.

Both passes differentiate ``optimizer.scale_loss(loss)`` (the loss times
``loss_scale_factor``, as Keras's own ``train_step`` does); the optimizer unscales
and clips both gradients inside Keras's ``Optimizer.apply``.

Non-trainable state (BatchNorm moving statistics, dropout seed generators) is
advanced by the *first* pass only: the second pass starts from the pre-step
non-trainable values (so it sees the same dropout mask, i.e. the same ``f_S``) and
its updates are discarded. Metrics are computed from the first pass's predictions.

Usage (at most two changed lines)::

    model = psd_keras.SAMSequential([...])          # was keras.Sequential
    model.compile(optimizer=psd_keras.SAM_SPS(rho=0.05), loss=...)
    model.fit(x, y)

or ``class MyModel(psd_keras.SAMTrainStep, keras.Model)`` for subclassed models.
"""

from __future__ import annotations

from typing import Any

import keras

from .optimizers import SAM_SPS

__all__ = ["SAMModel", "SAMSequential", "SAMTrainStep"]

_BACKEND = keras.backend.backend()


def _unpack(data: Any) -> tuple[Any, Any, Any]:
    return keras.utils.unpack_x_y_sample_weight(data)


def _batch_size(x: Any) -> Any:
    return next(i for i in keras.tree.flatten(x) if i is not None).shape[0]


class SAMTrainStep:
    """Mixin that replaces ``train_step`` by a SAM-SPS step (put it before the Keras class).

    The model must be compiled with :class:`psd_keras.SAM_SPS`. With the
    ``mixed_float16`` policy pass ``compile(..., auto_scale_loss=False)`` (Keras
    would wrap the optimizer in a ``LossScaleOptimizer``, which cannot run a
    two-pass step) or use ``mixed_bfloat16``.
    """

    def _sam_optimizer(self) -> SAM_SPS:
        opt = self.optimizer
        if not isinstance(opt, SAM_SPS):
            raise TypeError(
                f"{type(self).__name__} trains with psd_keras.SAM_SPS; got optimizer "
                f"{type(opt).__name__} (with mixed_float16 compile with auto_scale_loss=False)"
            )
        return opt

    def _sam_forward_loss(self, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Any]:
        y_pred = self(x, training=True) if self._call_has_training_arg else self(x)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        return y_pred, loss

    if _BACKEND == "tensorflow":

        def train_step(self, data: Any) -> Any:
            import tensorflow as tf

            opt = self._sam_optimizer()
            x, y, sample_weight = _unpack(data)
            ntv = list(self.non_trainable_variables)
            ntv0 = [tf.identity(v.value) for v in ntv]
            with tf.GradientTape() as tape:
                y_pred, loss = self._sam_forward_loss(x, y, sample_weight)
                scaled = opt.scale_loss(loss)
            self._loss_tracker.update_state(
                loss, sample_weight=tf.shape(keras.tree.flatten(x)[0])[0]
            )
            tw = list(self.trainable_weights)
            grads = tape.gradient(scaled, tw)

            def value_and_grad_fn(e: list[Any]) -> tuple[Any, list[Any]]:
                ntv1 = [tf.identity(v.value) for v in ntv]
                for v, val in zip(ntv, ntv0):
                    v.assign(val)
                for v, val in zip(tw, e):
                    v.assign(val)
                with tf.GradientTape() as tape2:
                    _, loss_e = self._sam_forward_loss(x, y, sample_weight)
                    scaled_e = opt.scale_loss(loss_e)
                grads_e = tape2.gradient(scaled_e, tw)
                grads_e = [tf.zeros_like(v.value) if g is None else g for g, v in zip(grads_e, tw)]
                for v, val in zip(ntv, ntv1):
                    v.assign(val)
                return loss_e, grads_e

            grads = [tf.zeros_like(v.value) if g is None else g for g, v in zip(grads, tw)]
            opt.sam_apply(grads, tw, value_and_grad_fn=value_and_grad_fn, loss=loss)
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    elif _BACKEND == "torch":

        def train_step(self, data: Any) -> Any:
            import torch

            opt = self._sam_optimizer()
            x, y, sample_weight = _unpack(data)
            ntv = list(self.non_trainable_variables)
            ntv0 = [v.value.detach().clone() for v in ntv]
            tw = list(self.trainable_weights)

            def grads_of(loss: Any) -> list[Any]:
                self.zero_grad()
                opt.scale_loss(loss).backward()
                return [
                    torch.zeros_like(v.value)
                    if v.value.grad is None
                    else v.value.grad.detach().clone()
                    for v in tw
                ]

            y_pred, loss = self._sam_forward_loss(x, y, sample_weight)
            self._loss_tracker.update_state(loss, sample_weight=_batch_size(x))
            grads = grads_of(loss)

            def value_and_grad_fn(e: list[Any]) -> tuple[Any, list[Any]]:
                with torch.no_grad():
                    ntv1 = [v.value.detach().clone() for v in ntv]
                    for v, val in zip(ntv, ntv0):
                        v.assign(val)
                    for v, val in zip(tw, e):
                        v.assign(val)
                _, loss_e = self._sam_forward_loss(x, y, sample_weight)
                grads_e = grads_of(loss_e)
                with torch.no_grad():
                    for v, val in zip(ntv, ntv1):
                        v.assign(val)
                return loss_e.detach(), grads_e

            opt.sam_apply(grads, tw, value_and_grad_fn=value_and_grad_fn, loss=loss.detach())
            self.zero_grad()
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    elif _BACKEND == "jax":

        def train_step(self, state: Any, data: Any) -> Any:
            import jax

            opt = self._sam_optimizer()
            trainable, non_trainable, optimizer_vars, metrics_vars = state
            x, y, sample_weight = _unpack(data)
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
            (_, aux), grads = grad_fn(
                trainable,
                non_trainable,
                metrics_vars,
                x,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_vars,
            )
            unscaled_loss, y_pred, new_non_trainable, new_metrics_vars = aux

            def value_and_grad_fn(e: list[Any]) -> tuple[Any, list[Any]]:
                # Same batch, pre-step non-trainables (same dropout mask); outputs discarded.
                (_, aux_e), grads_e = grad_fn(
                    list(e),
                    non_trainable,
                    metrics_vars,
                    x,
                    y,
                    sample_weight,
                    training=True,
                    optimizer_variables=optimizer_vars,
                )
                return aux_e[0], list(grads_e)

            trainable, optimizer_vars = opt.stateless_sam_apply(
                optimizer_vars,
                list(grads),
                trainable,
                value_and_grad_fn=value_and_grad_fn,
                loss=unscaled_loss,
            )
            logs, new_metrics_vars = self._update_metrics_variables(
                new_metrics_vars, unscaled_loss, x, y, y_pred, sample_weight
            )
            return logs, (trainable, new_non_trainable, optimizer_vars, new_metrics_vars)


@keras.saving.register_keras_serializable(package="psd_keras")
class SAMModel(SAMTrainStep, keras.Model):
    """``keras.Model`` (functional or subclassed) whose ``fit`` runs SAM-SPS steps."""


@keras.saving.register_keras_serializable(package="psd_keras")
class SAMSequential(SAMTrainStep, keras.Sequential):
    """``keras.Sequential`` whose ``fit`` runs SAM-SPS steps."""
