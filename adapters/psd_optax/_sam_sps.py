"""SAM-SPS (sharpness-aware minimization with the stochastic Polyak step) for Optax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from psd_core import polyak as core
from psd_core.polyak import SAMSPSState

from ._common import (
    _is_traced,
    default_float,
    has_masked_nodes,
    is_masked_node,
    resolve_hparams,
    uncommitted,
)

__all__ = ["SAMSPSState", "sam_sps"]

_PLACEHOLDERS = {"rho": 0.0, "lambd": 0.0, "f_star": 0.0, "gamma_b": 1.0, "weight_decay": 0.0}


def sam_sps(
    rho: float = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    variant: str = "sps+",
) -> optax.GradientTransformationExtraArgs:
    r"""One whole SAM-SPS step per ``update`` (Oikonomou & Loizou, ICML 2025).

    ``update(grads, state, params, *, value=None, value_and_grad_fn)``:

    * ``grads`` is :math:`g = \nabla f_S(x)` at ``params`` (after any transformation
      chained before this one, e.g. ``optax.clip_by_global_norm``);
    * ``value`` is :math:`f_S(x)`; it only feeds the non-finite check (optional);
    * ``value_and_grad_fn(tree) -> (loss, grads)`` is evaluated once, inside the
      update, at the perturbed point :math:`e = x + c\,g` with the core's
      :math:`c = \rho(1-\lambda+\lambda/\|g\|)` (same mini-batch).

    The returned updates are :math:`-\gamma(\nabla f_S(e) + w\,x)` with the core's
    Polyak step :math:`\gamma` (:func:`psd_core.polyak.sam_sps_coefficients`), which
    is also stored in ``state.step_size`` for logging
    (``optax.tree_utils.tree_get(state, "step_size")``). ``rho = 0`` gives SPS_max
    and reproduces ``optax.polyak_sgd(max_learning_rate=gamma_b, f_min=f_star,
    variant=variant)`` whenever :math:`\|g\|^2 > 10^{-12}`.

    Args:
        rho: perturbation radius :math:`\rho \ge 0`.
        lambd: :math:`\lambda\in[0,1]`: 0 USAM, 1 SAM.
        f_star: lower bound :math:`\ell^*` of the loss (explicit, finite).
        gamma_b: cap :math:`\gamma_b > 0` of the step size (0 raises: it never moves).
        weight_decay: :math:`w \ge 0`, applied in the descent step only.
        variant: ``"sps+"`` (ReLU numerator, the paper) or ``"sps"``.

    Under ``optax.masked`` or ``optax.multi_transform`` (SAM on a subset of the
    parameters) pass the whole parameter tree as ``full_params=params`` too: the
    frozen leaves are put back before ``value_and_grad_fn`` is called (it always
    receives a whole tree), and the call raises ``ValueError`` without it.

    Non-finite policy (the core's): a non-finite loss or gradient norm at ``x`` or
    at ``e`` gives :math:`\gamma = 0`, an exactly zero update, and ``skipped + 1``.
    """
    values = dict(
        rho=rho,
        lambd=lambd,
        f_star=f_star,
        gamma_b=gamma_b,
        weight_decay=weight_decay,
        variant=variant,
    )
    cfg = resolve_hparams(core.sam_sps_config, values, _PLACEHOLDERS)
    if not _is_traced(cfg.gamma_b) and not cfg.gamma_b > 0:
        raise ValueError(f"Invalid gamma_b: {gamma_b!r} (must be > 0: a cap of 0 never moves)")

    def init_fn(params: optax.Params) -> SAMSPSState:
        leaves = jax.tree_util.tree_leaves(params)
        # 0-d templates of the leaves' dtypes (they fix the step size's dtype).
        like = [jnp.zeros((), x.dtype) for x in leaves] or [jnp.zeros((), default_float())]
        return uncommitted(core.sam_sps_init, like)  # type: ignore[no-any-return]

    def update_fn(
        updates: optax.Updates,
        state: SAMSPSState,
        params: optax.Params | None = None,
        *,
        value_and_grad_fn: Callable[[optax.Params], tuple[Any, optax.Updates]],
        value: Any = None,
        full_params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMSPSState]:
        del extra_args
        if params is None:
            raise ValueError("sam_sps.update needs params (the perturbation is taken at params)")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        x = treedef.flatten_up_to(params)
        if has_masked_nodes(params):
            value_and_grad_fn = _with_frozen_leaves(value_and_grad_fn, params, full_params)
        e, offset = core.sam_sps_perturbation(leaves, x, state, cfg)
        loss_e, grads_e = value_and_grad_fn(jax.tree_util.tree_unflatten(treedef, e))
        ge = treedef.flatten_up_to(grads_e)
        upd, new_state = core.sam_sps_descent(
            leaves, ge, loss_e, offset, x, state, cfg, value=value
        )
        return jax.tree_util.tree_unflatten(treedef, upd), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_frozen_leaves(
    value_and_grad_fn: Callable[[optax.Params], tuple[Any, optax.Updates]],
    masked_params: optax.Params,
    full_params: optax.Params | None,
) -> Callable[[optax.Params], tuple[Any, optax.Updates]]:
    """``value_and_grad_fn`` seen from inside ``optax.masked`` / ``multi_transform``.

    There the parameters hold ``optax.MaskedNode`` in place of the frozen leaves
    (those of the other labels). The returned function puts the frozen leaves of
    ``full_params`` back into the perturbed tree, calls the user's function on the
    whole tree and masks the gradient again.
    """
    if full_params is None or has_masked_nodes(full_params):
        raise ValueError(
            "sam_sps inside optax.masked or optax.multi_transform: its parameters hold "
            "optax.MaskedNode for the frozen leaves, which value_and_grad_fn cannot "
            "evaluate. Pass the whole, unmasked parameter tree as update(..., "
            "full_params=params) (with masked(..., mask_compatible_extra_args=False), "
            "the default) so that the frozen leaves are put back before the call."
        )

    def merged(e: optax.Params) -> optax.Params:
        return jax.tree_util.tree_map(
            lambda a, b: b if is_masked_node(a) else a, e, full_params, is_leaf=is_masked_node
        )

    def fn(e: optax.Params) -> tuple[Any, optax.Updates]:
        loss, grads = value_and_grad_fn(merged(e))
        masked = jax.tree_util.tree_map(
            lambda a, g: a if is_masked_node(a) else g, masked_params, grads, is_leaf=is_masked_node
        )
        return loss, masked

    return fn
