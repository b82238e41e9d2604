"""PerturbedAdam as an ``optax.GradientTransformation``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psd_core import perturbation as core
from psd_core._array import tree_select, tree_size, tree_sq_norm

from ._common import (
    NoiseFn,
    all_finite,
    draws_if,
    gaussian_noise,
    init_key,
    noise_if,
    resolve_hparams,
    resolve_seed,
    uncommitted,
)

__all__ = ["PerturbedAdamState", "perturbed_adam"]

_PLACEHOLDERS = {
    "learning_rate": 0.0,
    "b1": 0.5,
    "b2": 0.5,
    "eps": 1.0,
    "g_thres": 0.0,
    "t_thres": 0,
    "radius": 0.0,
}


class PerturbedAdamState(NamedTuple):
    """The core's :class:`psd_core.perturbation.PerturbedAdamState` plus the PRNG key;
    ``mu`` and ``nu`` are pytrees shaped like the parameters."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates
    small_steps: jax.Array
    perturbations: jax.Array
    skipped: jax.Array
    perturbed: jax.Array
    key: jax.Array


def _as_psd_coeffs(c: core.AdamCoefficients) -> core.PSDCoefficients:
    # The core's generic applier computes where(finite, a * d + b * z, 0): with
    # a = c.step on the Adam direction d this is exactly the PerturbedAdam update.
    return core.PSDCoefficients(grad=c.step, noise=c.noise, finite=c.finite, perturb=c.perturb)


def _cast_like(updates: list[jax.Array], leaves: list[jax.Array]) -> list[jax.Array]:
    """The updates (computed in the accumulation dtype from the Adam direction) cast
    once to the gradient leaves' dtypes, as the core's vector layer does."""
    return [u.astype(g.dtype) if u.dtype != g.dtype else u for u, g in zip(updates, leaves)]


def _core_state(state: PerturbedAdamState, mu: list, nu: list) -> core.PerturbedAdamState:
    return core.PerturbedAdamState(
        count=state.count,
        mu=mu,
        nu=nu,
        small_steps=state.small_steps,
        perturbations=state.perturbations,
        skipped=state.skipped,
        perturbed=state.perturbed,
    )


def perturbed_adam(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    g_thres: float = 1e-3,
    t_thres: int = 10,
    radius: float = 1e-3,
    *,
    seed: int | jax.Array | None = None,
    key: int | jax.Array | None = None,
    noise: str = "gaussian",
    noise_fn: NoiseFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""PerturbedAdam (psd-optimizer semantics, global gate) on any pytree.

    Moments, bias corrections, the Adam direction, the gate and its coefficients
    all come from :mod:`psd_core.perturbation` (:func:`~psd_core.perturbation.adam_moments`,
    :func:`~psd_core.perturbation.adam_bias_corrections`,
    :func:`~psd_core.perturbation.adam_direction`,
    :func:`~psd_core.perturbation.perturbed_adam_coefficients`). The update is the
    Adam step ``-lr * m_hat / (sqrt(v_hat) + eps)``; when the global norm of the
    bias-corrected step has been at most ``g_thres`` for ``t_thres`` consecutive
    steps it is replaced by noise of radius ``radius`` (drawn only then, inside
    ``jax.lax.cond``) and both moments are reset to zero. A step with a non-finite
    gradient is skipped (zero update, moments and counters unchanged but
    ``skipped``).

    ``state.count`` is Adam's bias-correction count: it counts *applied* steps
    only (a skipped step leaves it, as in ``optax.apply_if_finite(optax.adam)``),
    so a ``learning_rate`` schedule is evaluated at the number of applied steps.
    (:func:`psd`'s ``count`` advances on every call instead.)

    Args:
        learning_rate: float, 0-d array or optax schedule of ``state.count``.
        b1, b2, eps: Adam's constants.
        g_thres, t_thres: the gate (see :func:`psd_core.perturbation.perturbed_adam_config`).
        radius: noise radius (standard deviation per coordinate for ``noise="gaussian"``,
            the published default; ball radius for ``noise="ball"``).
        seed, key: int seed, raw ``uint32[2]`` key or typed ``jax.random.key``
            (``key`` is Optax's name; give at most one; default seed 0); may be
            traced.
        noise: ``"gaussian"`` or ``"ball"``.
        noise_fn: ``noise_fn(key, leaves) -> (normals, uniform)``; defaults to
            :func:`psd_optax.gaussian_noise`.
    """
    values = dict(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        g_thres=g_thres,
        t_thres=t_thres,
        radius=radius,
        noise=noise,
    )
    cfg = resolve_hparams(core.perturbed_adam_config, values, _PLACEHOLDERS)
    seed = resolve_seed(seed, key)
    noise_fn = gaussian_noise if noise_fn is None else noise_fn

    def init_fn(params: optax.Params) -> PerturbedAdamState:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        # The counters are built under jit so that they are uncommitted (as Optax's);
        # a leafless tree (optax.tree.map_params's placeholder) has no moments.
        like = [jnp.zeros((), leaves[0].dtype if leaves else None)]
        c = uncommitted(lambda p: core.perturbed_adam_init(p, cfg), like)
        if leaves:
            m = core.perturbed_adam_init(leaves, cfg)
            mu = jax.tree_util.tree_unflatten(treedef, m.mu)
            nu = jax.tree_util.tree_unflatten(treedef, m.nu)
        else:
            mu = nu = params
        return PerturbedAdamState(
            count=c.count,
            mu=mu,
            nu=nu,
            small_steps=c.small_steps,
            perturbations=c.perturbations,
            skipped=c.skipped,
            perturbed=c.perturbed,
            key=init_key(seed),
        )

    def prologue(updates: optax.Updates, state: PerturbedAdamState) -> Any:
        """Moments, direction, norms and the core's verdict (placeholder noise statistics:
        the gate, the step coefficient and the state do not depend on them)."""
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        mu = treedef.flatten_up_to(state.mu)
        nu = treedef.flatten_up_to(state.nu)
        cstate = _core_state(state, mu, nu)
        dim = tree_size(leaves)
        g2 = tree_sq_norm(leaves)
        # Contract C4: the skip is decided by the gradient's finiteness alone.
        finite = all_finite(leaves, g2)
        mu1a, nu1a = core.adam_moments(leaves, mu, nu, cfg.b1, cfg.b2, accumulate=True)
        mu1, nu1 = core.adam_store(mu1a, mu), core.adam_store(nu1a, nu)
        bc1, bc2 = core.adam_bias_corrections(state.count + 1, cfg.b1, cfg.b2, g2)
        # In the accumulation dtype (float32 for 16-bit parameters, contract C3), from the
        # new moments before they are rounded for storage.
        direction = core.adam_direction(mu1a, nu1a, bc1, bc2, cfg.eps, eps_mode=cfg.eps_mode)
        s2 = tree_sq_norm(direction)
        one = jnp.ones_like(s2)
        probe, new = core.perturbed_adam_coefficients(
            s2, g2, cstate, cfg, dim=dim, noise_sq_norm=one, uniform=one, finite=finite
        )

        def coefficients(nsq: jax.Array, uniform: jax.Array) -> core.AdamCoefficients:
            return _noise_coefficients(s2, g2, cstate, cfg, dim, finite, nsq, uniform)

        # Moments as in the core's vector layer: new ones on a plain finite step,
        # zeros on a perturbation, old ones on a skipped step.
        zeros = [jnp.zeros_like(x) for x in mu]
        keep_new = probe.finite & ~probe.perturb
        m = tree_select(keep_new, mu1, tree_select(probe.perturb, zeros, mu))
        v = tree_select(keep_new, nu1, tree_select(probe.perturb, zeros, nu))
        return leaves, treedef, direction, s2, probe, coefficients, new, m, v

    def new_state(
        treedef: Any, new: core.PerturbedAdamState, m: list, v: list, key: jax.Array
    ) -> PerturbedAdamState:
        unflat = jax.tree_util.tree_unflatten
        return PerturbedAdamState(
            count=new.count,
            mu=unflat(treedef, m),
            nu=unflat(treedef, v),
            small_steps=new.small_steps,
            perturbations=new.perturbations,
            skipped=new.skipped,
            perturbed=new.perturbed,
            key=key,
        )

    def update_fn(
        updates: optax.Updates,
        state: PerturbedAdamState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, PerturbedAdamState]:
        del params, extra_args  # e.g. value=loss from optax.chain(..., polyak_sgd)
        leaves, treedef, direction, s2, probe, coefficients, new, m, v = prologue(updates, state)
        normals, noise_sq_norm, uniform, key = draws_if(
            probe.perturb, state.key, leaves, s2, noise_fn
        )
        coeffs = coefficients(noise_sq_norm, uniform)
        upd = _cast_like(core.psd_updates(_as_psd_coeffs(coeffs), direction, normals), leaves)
        return jax.tree_util.tree_unflatten(treedef, upd), new_state(treedef, new, m, v, key)

    def fused_apply(
        updates: optax.Updates,
        state: PerturbedAdamState,
        params: optax.Params,
        **extra_args: Any,
    ) -> tuple[optax.Params, PerturbedAdamState]:
        """One pass for the usual step: with the skip decided by the gradient alone
        (contract C4), the moments are final as soon as they are computed (new ones on a
        finite step, the old ones on a skipped step), so they are written in the pass that
        computes them, in place under donation. The direction is computed from the new
        moments in the accumulation dtype (for 16-bit moments, before they are rounded
        for storage; on a skipped step the update is zero whatever the direction), and no
        old moment has to survive until the gate is known. A perturbation's moment reset
        (to zeros) runs with the noise, in the ``lax.while_loop`` of :func:`noise_if` that
        runs only on a perturbing step."""
        del extra_args
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        mu = treedef.flatten_up_to(state.mu)
        nu = treedef.flatten_up_to(state.nu)
        p = treedef.flatten_up_to(params)
        cstate = _core_state(state, mu, nu)
        dim = tree_size(leaves)
        g2 = tree_sq_norm(leaves)
        finite = all_finite(leaves, g2)  # contract C4: the gradient decides
        mu1, nu1 = core.adam_moments(leaves, mu, nu, cfg.b1, cfg.b2, accumulate=True)
        m = tree_select(finite, core.adam_store(mu1, mu), mu)
        v = tree_select(finite, core.adam_store(nu1, nu), nu)
        bc1, bc2 = core.adam_bias_corrections(state.count + 1, cfg.b1, cfg.b2, g2)
        # from the new moments before they are rounded for storage (16-bit moments; where
        # storage keeps the dtype, the written ones, which are the same values on a finite
        # step); on a skipped step the update is zero whatever the direction is
        ma = [a if a.dtype != x.dtype else x for a, x in zip(mu1, m)]
        va = [a if a.dtype != x.dtype else x for a, x in zip(nu1, v)]
        direction = core.adam_direction(ma, va, bc1, bc2, cfg.eps, eps_mode=cfg.eps_mode)
        s2 = tree_sq_norm(direction)
        if all(a is x for a, x in zip(ma + va, m + v)):
            # The direction has two readers, its norm and the parameter update; XLA:CPU
            # then writes it out (a parameter-sized temporary, in freshly mapped memory
            # on every step at 1e7 parameters). The update recomputes it (the same core
            # formula) from the written moments, the bias corrections and eps behind an
            # optimization barrier, so that the norm's reduction computes it in its own
            # pass. (16-bit moments keep the shared direction: it comes from the
            # unrounded moments.)
            # (eps too: a constant broadcast to each leaf's shape is shared likewise)
            eps = jnp.asarray(cfg.eps, bc1.dtype)
            ma, va, bc1, bc2, eps = jax.lax.optimization_barrier((ma, va, bc1, bc2, eps))
            direction = core.adam_direction(ma, va, bc1, bc2, eps, eps_mode=cfg.eps_mode)
        one = jnp.ones_like(s2)
        probe, new = core.perturbed_adam_coefficients(
            s2, g2, cstate, cfg, dim=dim, noise_sq_norm=one, uniform=one, finite=finite
        )
        step = core.psd_updates(_as_psd_coeffs(probe), direction, None)
        p = optax.apply_updates(p, _cast_like(step, leaves))
        n = len(p)

        def add_noise(carry: list, normals: list, nsq: jax.Array, u: jax.Array) -> Any:
            c = _noise_coefficients(s2, g2, cstate, cfg, dim, finite, nsq, u)
            noise = _cast_like(core.psd_updates(_as_psd_coeffs(c), None, normals), leaves)
            # a perturbation resets both moments (the core's vector layer)
            reset = [jnp.zeros_like(x) for x in carry[n:]]
            return list(optax.apply_updates(carry[:n], noise)) + reset

        out, key = noise_if(probe.perturb, state.key, p + m + v, leaves, s2, noise_fn, add_noise)
        p, m, v = out[:n], out[n : 2 * n], out[2 * n :]
        return jax.tree_util.tree_unflatten(treedef, p), new_state(treedef, new, m, v, key)

    update_fn.fused_apply = fused_apply  # type: ignore[attr-defined]
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _noise_coefficients(
    s2: Any, g2: Any, cstate: Any, cfg: Any, dim: int, finite: Any, nsq: Any, uniform: Any
) -> core.AdamCoefficients:
    """The core's coefficients once the noise statistics are drawn (``nsq`` is used by
    the ball noise only)."""
    return core.perturbed_adam_coefficients(
        s2,
        g2,
        cstate,
        cfg,
        dim=dim,
        noise_sq_norm=nsq if cfg.noise == "ball" else None,
        uniform=uniform,
        finite=finite,
    )[0]
