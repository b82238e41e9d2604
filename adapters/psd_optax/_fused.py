"""One fused step, ``update`` and ``apply_updates`` together, where a transformation has one."""

from __future__ import annotations

from typing import Any

import optax

__all__ = ["update_and_apply"]


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    state: optax.OptState,
    params: optax.Params,
    **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
    r"""``tx.update`` followed by :func:`optax.apply_updates`, fused where possible.

    Equivalent to::

        updates, state = tx.update(grads, state, params, **extra_args)
        params = optax.apply_updates(params, updates)

    :func:`psd_optax.psd`, :func:`psd_optax.from_theory` and
    :func:`psd_optax.perturbed_adam` (called directly, not wrapped in
    ``optax.chain`` or ``optax.inject_hyperparams``) have a fused step: the
    deterministic part of the update is added to the parameters in one pass and the
    noise is added by a ``jax.lax.while_loop`` that runs once on a perturbing step and
    not at all otherwise. A while loop updates its buffers in place, so a
    non-perturbing step writes nothing parameter-sized besides the new parameters,
    where the plain ``update`` has to return its noise operand from a ``lax.cond``
    in fresh buffers (zeros on that branch). Same state, same draws, same new
    parameters (bit for bit unless ``step_on_perturb=True``, where the two roundings
    of :math:`p + (a g + b z)` and :math:`(p + a g) + b z` may differ by an ulp).

    Any other transformation (or extra arguments, as ``sam_sps`` needs) takes the
    plain route above, so the function is safe to use with every optax
    transformation. Use it inside your jitted step, ideally with
    ``donate_argnums`` for ``params`` and ``state``.
    """
    fused = getattr(tx.update, "fused_apply", None)
    if fused is not None and not extra_args:
        return fused(grads, state, params)  # type: ignore[no-any-return]
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state
