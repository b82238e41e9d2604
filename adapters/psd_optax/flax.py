"""Flax helpers for :mod:`psd_optax` (imported on demand: ``import psd_optax.flax``).

``psd_optax.psd`` and ``psd_optax.perturbed_adam`` are plain Optax transformations and
work unchanged with ``flax.nnx.Optimizer`` and ``flax.training.train_state.TrainState``.
``psd_optax.sam_sps`` needs two extra keyword arguments in ``update``
(``value_and_grad_fn`` and, optionally, ``value``):

* ``nnx.Optimizer.update(model, grads, value=..., value_and_grad_fn=...)`` forwards
  them (flax >= 0.11). The function receives the parameters as an ``nnx.State`` (the
  ``wrt`` filter's state of pure arrays); :func:`nnx_value_and_grad_fn` builds it from
  a loss of the model.
* ``TrainState.apply_gradients`` does not forward them (it calls
  ``tx.update(grads, opt_state, params)``): use :func:`apply_gradients` or the
  :class:`TrainState` subclass, whose ``apply_gradients`` accepts them.

See ``docs/guides/recipes-jax.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

try:
    from flax import nnx
    from flax.training import train_state as _train_state
except ImportError as exc:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "psd_optax.flax needs flax (pip install flax); psd_optax itself does not"
    ) from exc

__all__ = ["TrainState", "apply_gradients", "nnx_value_and_grad_fn"]

_OWG = _train_state.OVERWRITE_WITH_GRADIENT


def _extra_args(value: Any, value_and_grad_fn: Callable | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if value_and_grad_fn is not None:
        extra["value_and_grad_fn"] = value_and_grad_fn
    if value is not None:
        extra["value"] = value
    return extra


def apply_gradients(
    state: _train_state.TrainState,
    *,
    grads: Any,
    value: Any = None,
    value_and_grad_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    **replace: Any,
) -> _train_state.TrainState:
    """``state.apply_gradients(grads=grads)`` that forwards SAM-SPS's extra arguments.

    Does what ``flax.training.train_state.TrainState.apply_gradients`` does
    (``tx.update``, ``optax.apply_updates``, ``step + 1``, the ``**replace`` fields
    ``.replace()``-d, the ``"overwrite_with_gradient"`` collection copied from
    ``grads``), and passes ``value`` and ``value_and_grad_fn`` to ``tx.update`` when
    they are given, so ``psd_optax.sam_sps`` (or any
    ``optax.GradientTransformationExtraArgs``) works. A transformation without extra
    arguments (``psd``, ``perturbed_adam``) ignores them, so one training step serves
    all three optimizers.

    Args:
        state: a ``TrainState`` (or subclass).
        grads: gradients with the structure of ``state.params``.
        value: the loss at ``state.params`` (optional; SAM-SPS uses it for its
            non-finite check).
        value_and_grad_fn: ``params -> (loss, grads)`` on the same mini-batch, with
            the structure of ``state.params`` (of ``state.params["params"]`` when
            the ``"overwrite_with_gradient"`` collection is present). SAM-SPS calls
            it once, at the perturbed point.
        **replace: other ``TrainState`` fields to replace.

    Returns:
        The new state.
    """
    if _OWG in grads:
        grads_with_opt, params_with_opt = grads["params"], state.params["params"]
    else:
        grads_with_opt, params_with_opt = grads, state.params
    tx = state.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
        tx = optax.with_extra_args_support(tx)  # psd, perturbed_adam: extras ignored
    updates, new_opt_state = tx.update(
        grads_with_opt,
        state.opt_state,
        params_with_opt,
        **_extra_args(value, value_and_grad_fn),
    )
    new_params_with_opt = optax.apply_updates(params_with_opt, updates)
    if _OWG in grads:
        new_params = {"params": new_params_with_opt, _OWG: grads[_OWG]}
    else:
        new_params = new_params_with_opt
    return state.replace(step=state.step + 1, params=new_params, opt_state=new_opt_state, **replace)


class TrainState(_train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards
    ``value`` and ``value_and_grad_fn`` to ``tx.update`` (see :func:`apply_gradients`).

    ``TrainState.create(apply_fn=..., params=..., tx=psd_optax.sam_sps(...))``, then
    ``state.apply_gradients(grads=g, value=loss, value_and_grad_fn=fn)``. Without the
    two arguments it behaves exactly like Flax's class.
    """

    def apply_gradients(
        self,
        *,
        grads: Any,
        value: Any = None,
        value_and_grad_fn: Callable[[Any], tuple[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> TrainState:
        return apply_gradients(
            self, grads=grads, value=value, value_and_grad_fn=value_and_grad_fn, **kwargs
        )


def nnx_value_and_grad_fn(
    loss_fn: Callable[[Any], Any], model: nnx.Module, wrt: Any = nnx.Param
) -> Callable[[nnx.State], tuple[Any, nnx.State]]:
    """The ``value_and_grad_fn`` that ``nnx.Optimizer.update`` passes to ``sam_sps``.

    ``nnx.Optimizer.update(model, grads, value=loss, value_and_grad_fn=fn)`` calls
    ``tx.update(grads, opt_state, params, ...)`` with ``params`` an ``nnx.State`` of
    the ``wrt`` variables; SAM-SPS calls ``fn`` on the perturbed state of the same
    structure. ``fn`` merges that state with the rest of ``model`` (a copy: the
    second pass does not write batch statistics or RNG counters back into ``model``)
    and returns ``(loss_fn(perturbed_model), grads)``.

    Build it inside the jitted step, after the first ``nnx.value_and_grad``, so it
    closes over the current non-parameter state.

    Args:
        loss_fn: ``model -> scalar loss`` on the current mini-batch.
        model: the model the optimizer updates.
        wrt: the optimizer's ``wrt`` filter (``nnx.Param`` by default).
    """
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def loss_of_state(params: nnx.State) -> Any:
        return loss_fn(nnx.merge(graphdef, params, rest))

    return jax.value_and_grad(loss_of_state)
