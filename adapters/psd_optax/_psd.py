"""PSD (perturbed saddle-escape descent) as an ``optax.GradientTransformation``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psd_core import perturbation as core
from psd_core._array import tree_acc_dtype, tree_all_finite, tree_size, tree_sq_norm
from psd_core.theory import psd_constants

from ._common import (
    NoiseFn,
    _concrete,
    _is_traced,
    as_count,
    default_float,
    draws_if,
    gaussian_noise,
    init_key,
    noise_if,
    resolve_hparams,
    resolve_seed,
    uncommitted,
)

__all__ = ["PSDState", "from_theory", "psd"]

_PLACEHOLDERS = {
    "learning_rate": 0.0,
    "epsilon": 0.0,
    "radius": 0.0,
    "episode_length": 0,
    "t_thres": 0,
    "max_episodes": 0,
    "ema_beta": 0.5,
}


class PSDState(NamedTuple):
    """The core's :class:`psd_core.perturbation.PSDState` fields plus the PRNG key."""

    count: jax.Array
    since_perturb: jax.Array
    episode_left: jax.Array
    episodes: jax.Array
    grad_sq_ema: jax.Array
    skipped: jax.Array
    perturbed: jax.Array
    key: jax.Array
    """Raw ``uint32[2]`` key; split once per perturbation (unchanged otherwise)."""


def _to_core(state: PSDState) -> core.PSDState:
    return core.PSDState(*state[:-1])


def _from_core(state: core.PSDState, key: jax.Array) -> PSDState:
    return PSDState(*state, key=key)


def _psd_update_fn(cfg_fn: Any, noise_fn: NoiseFn) -> Any:
    """``update(grads, state, params=None)`` for a config built per call by ``cfg_fn(leaves)``.

    The returned function carries the fused step ``update.fused_apply(grads, state,
    params) -> (new_params, new_state)`` used by :func:`psd_optax.update_and_apply`.
    """

    def prologue(updates: optax.Updates, state: PSDState) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        cfg = cfg_fn(leaves)
        cstate = _to_core(state)
        g2 = tree_sq_norm(leaves)
        # The skip rests on the gradient's finiteness, not on its squared norm (which
        # overflows for a finite 1e20 in float32): contract C2.
        finite = tree_all_finite(leaves)
        return leaves, treedef, cfg, tree_size(leaves), cstate, (g2, finite)

    def coefficients(g: Any, cstate: Any, cfg: Any, dim: int, nsq: Any, uniform: Any) -> Any:
        g2, finite = g
        return core.psd_coefficients(
            g2,
            cstate,
            cfg,
            dim=dim,
            noise_sq_norm=nsq if cfg.noise == "ball" else None,
            uniform=uniform,
            finite=finite,
        )

    def update_fn(
        updates: optax.Updates,
        state: PSDState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PSDState]:
        del params, extra_args  # e.g. value=loss from optax.chain(..., polyak_sgd)
        leaves, treedef, cfg, dim, cstate, g = prologue(updates, state)
        gate = core.psd_gate(g[0], cstate, cfg, finite=g[1])
        normals, noise_sq_norm, uniform, key = draws_if(
            gate.open, state.key, leaves, g[0], noise_fn
        )
        coeffs, new_state = coefficients(g, cstate, cfg, dim, noise_sq_norm, uniform)
        new_leaves = core.psd_updates(coeffs, leaves, normals)
        return jax.tree_util.tree_unflatten(treedef, new_leaves), _from_core(new_state, key)

    def fused_apply(
        updates: optax.Updates, state: PSDState, params: optax.Params, **extra_args: Any
    ) -> tuple[optax.Params, PSDState]:
        del extra_args
        leaves, treedef, cfg, dim, cstate, g = prologue(updates, state)
        g2 = g[0]
        p_leaves = treedef.flatten_up_to(params)
        # The state and the gradient coefficient do not depend on the draws (only
        # the noise coefficient does): ask the core with placeholder statistics.
        one = jnp.ones_like(g2)
        coeffs, new_state = coefficients(g, cstate, cfg, dim, one, one)
        p_leaves = optax.apply_updates(p_leaves, core.psd_updates(coeffs, leaves, None))

        def add_noise(p: list[jax.Array], normals: list[jax.Array], nsq: Any, u: Any) -> Any:
            c, _ = coefficients(g, cstate, cfg, dim, nsq, u)
            return optax.apply_updates(p, core.psd_updates(c, None, normals))

        p_leaves, key = noise_if(
            coeffs.perturb, state.key, p_leaves, leaves, g2, noise_fn, add_noise
        )
        return jax.tree_util.tree_unflatten(treedef, p_leaves), _from_core(new_state, key)

    update_fn.fused_apply = fused_apply  # type: ignore[attr-defined]
    return update_fn


def _psd_init(cfg_for: Any, seed: Any) -> Any:
    """``init(params)``: the core's initial state (uncommitted, see
    :func:`psd_optax._common.uncommitted`) plus the key from ``seed``.

    A tree without leaves (``optax.tree.map_params``'s placeholder) gets the
    state of a one-scalar problem in the default float dtype.
    """

    def init_fn(params: optax.Params) -> PSDState:
        leaves = jax.tree_util.tree_leaves(params)
        acc = tree_acc_dtype(leaves) if leaves else default_float()
        cfg = cfg_for(leaves if leaves else [jnp.zeros((), acc)])
        cstate = uncommitted(
            lambda like: core.psd_init(like, cfg, acc_dtype=acc), jnp.zeros((), acc)
        )
        return _from_core(cstate, init_key(seed))

    return init_fn


def psd(
    learning_rate: optax.ScalarOrSchedule,
    epsilon: float,
    radius: float,
    episode_length: int = 0,
    *,
    seed: int | jax.Array | None = None,
    key: int | jax.Array | None = None,
    t_thres: int = 0,
    max_episodes: int | None = None,
    gate: str = "grad_norm",
    ema_beta: float = 0.1,
    noise: str = "ball",
    step_on_perturb: bool = False,
    noise_fn: NoiseFn | None = None,
) -> optax.GradientTransformation:
    r"""Perturbed saddle-escape descent on any pytree of parameters.

    The state machine, the gate, every coefficient and the non-finite policy come
    from :mod:`psd_core.perturbation` (see :func:`psd_core.perturbation.psd_config`
    for the hyperparameters). This transformation flattens the pytree, computes
    :math:`\|g\|^2`, asks the core whether the gate is open and, inside
    ``jax.lax.cond``, draws the noise only on a perturbing step.

    Updates are ``where(finite, a * g + b * z, 0)`` with the core's coefficients
    ``a`` (``-learning_rate`` or 0) and ``b`` (the ball scale or ``radius``, 0
    unless perturbing); apply them with :func:`optax.apply_updates`.

    Args:
        learning_rate: float, 0-d array or optax schedule ``count -> lr`` of
            ``state.count`` (the core's count, see :class:`psd_core.perturbation.PSDState`).
            A schedule negative at count 0 raises; later negative values (and
            negative traced values) are clamped at 0.
        epsilon, radius, episode_length, t_thres, max_episodes, gate, ema_beta,
            noise, step_on_perturb: as in :func:`psd_core.perturbation.psd_config`.
        seed, key: int seed, raw ``uint32[2]`` key or typed ``jax.random.key`` of
            the key kept in the state (``key`` is Optax's name; give at most one;
            default seed 0); may be traced (``jax.vmap`` over seeds or keys).
            Or, under ``jax.vmap`` of ``init``, give each problem its own key:
            ``state._replace(key=jax.random.split(key, n))``.
        noise_fn: ``noise_fn(key, leaves) -> (normals, uniform)``; defaults to
            :func:`psd_optax.gaussian_noise`. A hook to inject draws (tests).

    Raises:
        ValueError / TypeError: a bad hyperparameter, naming it.
    """
    values = dict(
        learning_rate=learning_rate,
        epsilon=epsilon,
        radius=radius,
        episode_length=episode_length,
        t_thres=t_thres,
        max_episodes=max_episodes,
        gate=gate,
        ema_beta=ema_beta,
        noise=noise,
        step_on_perturb=step_on_perturb,
    )
    cfg = resolve_hparams(core.psd_config, values, _PLACEHOLDERS)
    seed = resolve_seed(seed, key)
    noise_fn = gaussian_noise if noise_fn is None else noise_fn
    return optax.GradientTransformationExtraArgs(
        _psd_init(lambda leaves: cfg, seed), _psd_update_fn(lambda leaves: cfg, noise_fn)
    )


def from_theory(
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    dim: int | None = None,
    *,
    seed: int | jax.Array | None = None,
    key: int | jax.Array | None = None,
    t_thres: int = 0,
    gate: str = "grad_norm",
    ema_beta: float = 0.1,
    noise: str = "ball",
    step_on_perturb: bool = False,
    noise_fn: NoiseFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r""":func:`psd` with the paper's constants (:func:`psd_core.theory.psd_constants`):
    ``learning_rate = 1/(2 ell)``, ``radius = sqrt(epsilon/rho)/8``, episode length
    ``T``, episode budget ``M``, gate threshold ``epsilon``.

    ``dim`` (the number of scalars :math:`d`, which enters ``T``) may be left
    ``None``: it is then taken from the parameters, statically, by ``init`` and by
    every ``update`` (their shapes are known at trace time). Under ``jax.vmap`` the
    per-problem shapes are seen, so ``d`` is the dimension of one problem. The
    arguments are validated here, at construction, when they are concrete
    (Python numbers or concrete arrays, as ``optax.inject_hyperparams`` passes them
    outside ``jit``). Traced values (``inject_hyperparams`` inside ``jit``) go
    through the core's array arithmetic unvalidated, in their dtype; ``T`` and
    ``M`` are then cast to the counters' integer dtype, saturating at its maximum.
    ``t_thres``, ``gate``, ``ema_beta``, ``noise``, ``step_on_perturb``, ``seed``,
    ``key`` and ``noise_fn`` are :func:`psd`'s (they are explicit keyword arguments,
    not ``**kwargs``, so that ``optax.inject_hyperparams`` sees them).
    """
    kwargs = dict(
        t_thres=t_thres, gate=gate, ema_beta=ema_beta, noise=noise, step_on_perturb=step_on_perturb
    )
    theory = dict(epsilon=epsilon, ell=ell, rho=rho, delta=delta, delta_f=delta_f)
    theory = {name: _concrete(name, v) for name, v in theory.items()}
    dim = _concrete("dim", dim)
    if not any(_is_traced(v) for v in (*theory.values(), dim)):
        psd_constants(**theory, dim=1 if dim is None else dim)  # validate now
    seed = resolve_seed(seed, key)

    def cfg_for(leaves: list[jax.Array]) -> core.PSDConfig:
        c = psd_constants(**theory, dim=tree_size(leaves) if dim is None else dim)
        values = dict(
            learning_rate=c.step_size,
            epsilon=c.epsilon,
            radius=c.radius,
            episode_length=as_count(c.episode_length),
            max_episodes=as_count(c.max_episodes),
            **kwargs,
        )
        return resolve_hparams(core.psd_config, values, _PLACEHOLDERS)  # type: ignore[no-any-return]

    # Validate the remaining keyword arguments once, with d = 1.
    cfg_for([jnp.zeros(())])
    noise_fn = gaussian_noise if noise_fn is None else noise_fn
    return optax.GradientTransformationExtraArgs(
        _psd_init(cfg_for, seed), _psd_update_fn(cfg_for, noise_fn)
    )
