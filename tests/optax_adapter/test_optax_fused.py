"""psd_optax.update_and_apply: the fused step equals ``update`` + ``apply_updates``.

The reference is the plain Optax route of the same transformation, which the other
test files check against the core, Optax and psd_torch. Trajectories are long
enough to go through perturbations, episodes and a non-finite step, so every branch
of the fused step (gradient part, noise in the while loop, skipped step) is compared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_trees import to_tree, to_vec

import psd_optax
from psd_core.functions import coupled_quartic, gaussian_wells

jax.config.update("jax_enable_x64", True)

PROBLEM = coupled_quartic(5)


def grad_tree(params, bad_at=None, step=None):
    g = PROBLEM.grad(to_vec(params))
    if bad_at is not None and step == bad_at:
        g = g.at[2].set(jnp.nan)
    return to_tree(g)


def plain_step(tx):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def fused_step(tx):
    def step(p, s, g):
        return psd_optax.update_and_apply(tx, g, s, p)

    return step


def compare_along_plain_trajectory(tx, steps, x0, dtype, donate=False, bad_at=None):
    """Walk the plain route; from every (params, state) on it take one fused step too.

    Returns the final plain state. Integer, boolean and key fields must be equal;
    floating ones equal to a few ulps (XLA may contract ``p + b * z`` into one FMA
    on one route and not on the other).
    """
    plain = jax.jit(plain_step(tx))
    fused = jax.jit(fused_step(tx), donate_argnums=(0, 1) if donate else ())
    rtol = 1e-13 if dtype == jnp.float64 else 1e-5
    p = to_tree(jnp.asarray(x0, dtype))
    s = tx.init(p)
    for t in range(steps):
        g = grad_tree(p, bad_at, t)
        copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731
        fp, fs = fused(copy(p), copy(s), g)
        p, s = plain(p, s, g)
        np.testing.assert_allclose(
            np.asarray(to_vec(fp)), np.asarray(to_vec(p)), rtol=rtol, atol=0, err_msg=f"step {t}"
        )
        assert fp["a"].dtype == jnp.dtype(dtype)
        for name in s._fields:
            for a, b in zip(
                jax.tree_util.tree_leaves(getattr(fs, name)),
                jax.tree_util.tree_leaves(getattr(s, name)),
            ):
                a, b = np.asarray(a), np.asarray(b)
                if np.issubdtype(a.dtype, np.floating):
                    np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=f"{name}, step {t}")
                else:
                    np.testing.assert_array_equal(a, b, err_msg=f"{name}, step {t}")
    return p, s


MAKERS = {
    "psd ball": lambda: psd_optax.psd(0.05, epsilon=1.0, radius=0.2, episode_length=4, seed=1),
    "psd gaussian ema": lambda: psd_optax.psd(
        0.05, 1.0, 0.2, 4, t_thres=2, noise="gaussian", gate="ema", seed=2
    ),
    "psd schedule": lambda: psd_optax.psd(
        optax.linear_schedule(0.08, 0.02, 20), 1.0, 0.2, 3, max_episodes=3, seed=4
    ),
    "from_theory": lambda: psd_optax.from_theory(
        epsilon=1.0, ell=10.0, rho=5.0, delta=0.1, delta_f=1.0, seed=6, t_thres=2
    ),
    "perturbed_adam gaussian": lambda: psd_optax.perturbed_adam(
        0.05, g_thres=3.0, t_thres=3, radius=0.05, seed=5
    ),
    "perturbed_adam ball": lambda: psd_optax.perturbed_adam(
        0.05, g_thres=3.0, t_thres=3, radius=0.05, noise="ball", seed=7
    ),
}


def events(state):
    for name in ("episodes", "perturbations"):
        if hasattr(state, name):
            return int(getattr(state, name))
    raise AssertionError(state)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("name", list(MAKERS))
def test_fused_step_equals_update_then_apply(name, donate, dtype):
    tx = MAKERS[name]()
    assert callable(getattr(tx.update, "fused_apply", None))
    p, s = compare_along_plain_trajectory(tx, 30, np.full(5, 1e-3), dtype, donate, bad_at=11)
    # the noise branch really ran (from_theory's episode outlasts the run)
    assert events(s) >= (1 if name == "from_theory" else 3), events(s)
    assert int(s.skipped) == 1  # and the non-finite step was skipped
    assert np.all(np.isfinite(np.asarray(to_vec(p))))


def test_step_on_perturb():
    tx = psd_optax.psd(0.05, 1.0, 0.2, 4, step_on_perturb=True, seed=3)
    _, s = compare_along_plain_trajectory(tx, 30, np.full(5, 1e-3), jnp.float64)
    assert int(s.episodes) >= 2


def test_other_transformations_take_the_plain_route():
    p = to_tree(jnp.linspace(0.1, 0.5, 5))
    g = grad_tree(p)
    for tx in (
        optax.sgd(0.1),
        optax.adam(0.01),
        optax.chain(optax.clip_by_global_norm(0.1), psd_optax.psd(0.1, 1e9, 0.01, 5)),
    ):
        s = tx.init(p)
        want = plain_step(tx)(p, s, g)
        got = psd_optax.update_and_apply(tx, g, s, p)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Extra arguments (sam_sps needs value and value_and_grad_fn) go to tx.update.
    tx = psd_optax.sam_sps(rho=0.05, gamma_b=0.5)
    loss = lambda q: jnp.sum(to_vec(q) ** 4) + jnp.sum(to_vec(q) ** 2)  # noqa: E731
    vg = jax.value_and_grad(loss)
    s = tx.init(p)
    v, g = vg(p)
    u, s_ref = tx.update(g, s, p, value=v, value_and_grad_fn=vg)
    got_p, got_s = psd_optax.update_and_apply(tx, g, s, p, value=v, value_and_grad_fn=vg)
    np.testing.assert_array_equal(to_vec(got_p), to_vec(optax.apply_updates(p, u)))
    assert float(got_s.step_size) == float(s_ref.step_size) > 0


def test_fused_step_under_vmap_matches_plain_vmap():
    # Under vmap the while loop's predicate is batched: the body runs while any
    # problem perturbs and each problem keeps its own result.
    wells = gaussian_wells(2, n_wells=5, seed=0)
    n = 6
    starts = np.random.default_rng(1).uniform(-3, 3, (n, 2))
    tx = psd_optax.psd(0.05, epsilon=0.5, radius=0.3, episode_length=4, t_thres=3)
    params = {"x": jnp.asarray(starts)}
    state = jax.vmap(tx.init)(params)
    state = state._replace(key=jax.random.split(jax.random.PRNGKey(7), n))

    @jax.jit
    def plain(p, s):
        u, s = jax.vmap(tx.update)({"x": wells.grad(p["x"])}, s, p)
        return optax.apply_updates(p, u), s

    @jax.jit
    def fused(p, s):
        g = {"x": wells.grad(p["x"])}
        return jax.vmap(lambda g, s, p: psd_optax.update_and_apply(tx, g, s, p))(g, s, p)

    p1, s1 = params, state
    perturbing_alone = 0
    for _ in range(30):
        p2, s2 = fused(p1, s1)
        p1, s1 = plain(p1, s1)
        np.testing.assert_allclose(np.asarray(p2["x"]), np.asarray(p1["x"]), rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(s2.key), np.asarray(s1.key))
        k = int(np.sum(np.asarray(s2.perturbed)))
        perturbing_alone += 0 < k < n
    assert perturbing_alone >= 1  # some step perturbed only part of the batch
