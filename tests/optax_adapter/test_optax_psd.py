"""psd_optax.psd / from_theory / perturbed_adam against the core, Optax and the theory.

The reference is always something else than the adapter: the core's pure
transformations run on NumPy arrays (fed the very draws the adapter made, read
back from its PRNG key with the public ``psd_optax.gaussian_noise``), or Optax's own
``sgd``/``adam`` where PSD/PerturbedAdam must reduce to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax_trees import to_tree, to_vec

import psd_core
import psd_optax
from psd_core.functions import coupled_quartic, gaussian_wells

jax.config.update("jax_enable_x64", True)

# A pytree of mixed shapes holding a 5-vector (the coupled quartic's variable).
SHAPES = {"a": (2,), "b": (3, 1)}


def np_leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def draws_for(key, grads_tree):
    """The draws the adapter makes on a perturbing step with state key ``key``."""
    _, sub = jax.random.split(key)
    normals, uniform = psd_optax.gaussian_noise(sub, jax.tree_util.tree_leaves(grads_tree))
    return [np.asarray(z) for z in normals], np.asarray(uniform)


PROBLEM = coupled_quartic(5)


def grad_tree(params):
    return to_tree(PROBLEM.grad(to_vec(params)))


def run_psd_against_core(kwargs, steps=24, x0=None, dtype=jnp.float64):
    tx = psd_optax.psd(**kwargs, seed=3)
    ref = psd_core.psd(**kwargs)
    x0 = np.full(5, 1e-3) if x0 is None else x0
    params = to_tree(jnp.asarray(x0, dtype))
    ref_params = np_leaves(params)
    state = tx.init(params)
    ref_state = ref.init(ref_params)
    step = jax.jit(tx.update)
    treedef = jax.tree_util.tree_structure(params)
    episodes = 0
    for _ in range(steps):
        g = grad_tree(params)
        normals, uniform = draws_for(state.key, g)
        ref_g = np_leaves(grad_tree(jax.tree_util.tree_unflatten(treedef, ref_params)))
        upd, state = step(g, state, params)
        params = optax.apply_updates(params, upd)
        ref_upd, ref_state = ref.update(
            ref_g, ref_state, ref_params, normals=normals, uniform=uniform
        )
        ref_params = psd_core.apply_updates(ref_params, ref_upd)
        for a, b in zip(np_leaves(params), ref_params):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 if dtype == jnp.float64 else 1e-5)
        assert bool(state.perturbed) == bool(ref_state.perturbed)
        assert int(state.count) == int(ref_state.count)
        assert int(state.episodes) == int(ref_state.episodes)
        assert int(state.since_perturb) == int(ref_state.since_perturb)
        assert int(state.episode_left) == int(ref_state.episode_left)
        episodes = int(state.episodes)
    return episodes


BASE = dict(learning_rate=0.05, epsilon=0.5, radius=0.1, episode_length=5, t_thres=2)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"noise": "gaussian", "radius": 0.02},
        {"step_on_perturb": True},
        {"gate": "ema", "ema_beta": 0.3},
        {"max_episodes": 2},
        # optax's built-in schedules compute in float32 (and round differently in
        # and out of jit), so the float64 comparison uses a float64 schedule.
        {"learning_rate": lambda count: 0.08 / (1.0 + 0.1 * count)},
    ],
    ids=["ball", "gaussian", "step_on_perturb", "ema", "budget", "schedule"],
)
def test_psd_matches_core_float64(extra):
    kwargs = {**BASE, **extra}
    episodes = run_psd_against_core(kwargs)
    # The comparison must exercise the noise: several perturbations happened.
    assert episodes >= 2
    if "max_episodes" in extra:
        assert episodes == 2


def test_psd_matches_core_float32():
    episodes = run_psd_against_core(BASE, steps=16, dtype=jnp.float32)
    assert episodes >= 2


def test_psd_float32_keeps_dtypes():
    tx = psd_optax.psd(0.1, 10.0, 0.1, 3)
    params = {"w": jnp.ones((3, 2), jnp.float32), "h": jnp.ones((4,), jnp.bfloat16)}
    state = tx.init(params)
    assert state.grad_sq_ema.dtype == jnp.float32
    upd, state = jax.jit(tx.update)(params, state)
    assert upd["w"].dtype == jnp.float32 and upd["h"].dtype == jnp.bfloat16
    assert bool(state.perturbed)


def test_psd_gate_closed_is_optax_sgd():
    sched = optax.exponential_decay(0.05, 5, 0.5)
    for lr in (0.05, sched):
        tx = psd_optax.psd(lr, epsilon=0.0, radius=1.0, episode_length=3)
        ref = optax.sgd(lr)
        p = q = to_tree(jnp.linspace(0.3, 0.9, 5))
        w = to_vec(p)  # float64 transcription: w <- w - lr(k) * g(w)
        s, r = tx.init(p), ref.init(q)
        for k in range(12):
            u, s = jax.jit(tx.update)(grad_tree(p), s)
            v, r = jax.jit(ref.update)(grad_tree(q), r)
            w = w - (lr(k) if callable(lr) else lr) * to_vec(grad_tree(to_tree(w)))
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            np.testing.assert_allclose(to_vec(p), w, rtol=1e-13, atol=0)
            # optax evaluates a schedule at its int32 count, in float32: 1e-7 apart
            tol = 1e-7 if callable(lr) else 1e-13
            np.testing.assert_allclose(to_vec(p), to_vec(q), rtol=tol, atol=0)
        assert int(s.episodes) == 0


def test_psd_escapes_strict_saddle_where_sgd_cannot():
    x0 = to_tree(jnp.asarray(PROBLEM.saddle()))
    f0 = float(PROBLEM.value(to_vec(x0)))

    def run(tx):
        @jax.jit
        def loop(params):
            def body(_, carry):
                p, s = carry
                u, s = tx.update(grad_tree(p), s, p)
                return optax.apply_updates(p, u), s

            return jax.lax.fori_loop(0, 300, body, (params, tx.init(params)))

        return loop(x0)

    p_sgd, _ = run(optax.sgd(0.02))
    p_psd, s_psd = run(psd_optax.psd(0.02, epsilon=1e-3, radius=0.05, episode_length=50))
    assert float(PROBLEM.value(to_vec(p_sgd))) == f0  # zero gradient: SGD never moves
    assert float(PROBLEM.value(to_vec(p_psd))) < f0 - 0.5
    assert int(s_psd.episodes) >= 1


def test_from_theory_constants_and_dim_from_params():
    eps, ell, rho = 1e-2, PROBLEM.ell, PROBLEM.rho
    c = psd_core.psd_constants(eps, ell, rho, 0.1, 1.0, dim=5)
    explicit = psd_optax.from_theory(eps, ell, rho, dim=5, seed=1)
    lazy = psd_optax.from_theory(eps, ell, rho, seed=1)
    manual = psd_optax.psd(
        c.step_size, c.epsilon, c.radius, c.episode_length, max_episodes=c.max_episodes, seed=1
    )
    x0 = to_tree(jnp.asarray(PROBLEM.saddle()))
    outs = []
    for tx in (explicit, lazy, manual):
        p, s = x0, tx.init(x0)
        assert int(s.since_perturb) == 1  # t_thres = 0
        for _ in range(5):
            u, s = jax.jit(tx.update)(grad_tree(p), s)
            p = optax.apply_updates(p, u)
        assert int(s.episode_left) == c.episode_length - 4
        outs.append(to_vec(p))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_vmap_gaussian_wells_matches_core_per_problem():
    wells = gaussian_wells(2, n_wells=5, seed=0)
    n = 6
    starts = np.random.default_rng(1).uniform(-3, 3, (n, 2))
    kwargs = dict(learning_rate=0.05, epsilon=0.5, radius=0.3, episode_length=4, t_thres=3)
    tx = psd_optax.psd(**kwargs)
    params = {"x": jnp.asarray(starts)}
    state = jax.vmap(tx.init)(params)
    state = state._replace(key=jax.random.split(jax.random.PRNGKey(7), n))

    @jax.jit
    def step(p, s):
        u, s = jax.vmap(tx.update)({"x": wells.grad(p["x"])}, s, p)
        return optax.apply_updates(p, u), s

    ref = psd_core.psd(**kwargs)
    ref_x = [[starts[i].copy()] for i in range(n)]
    ref_s = [ref.init(ref_x[i]) for i in range(n)]
    for _ in range(30):
        keys = np.asarray(state.key)
        for i in range(n):
            g = [wells.grad(ref_x[i][0])]
            normals, uniform = draws_for(jnp.asarray(keys[i]), [jnp.asarray(g[0])])
            u, ref_s[i] = ref.update(g, ref_s[i], ref_x[i], normals=normals, uniform=uniform)
            ref_x[i] = psd_core.apply_updates(ref_x[i], u)
        params, state = step(params, state)
        np.testing.assert_allclose(
            np.asarray(params["x"]), np.stack([r[0] for r in ref_x]), rtol=0, atol=1e-10
        )
    assert int(np.sum(np.asarray(state.episodes))) >= n  # every problem perturbed


@pytest.mark.parametrize("noise", ["gaussian", "ball"])
def test_perturbed_adam_matches_core_float64(noise):
    kwargs = dict(learning_rate=0.05, g_thres=3.0, t_thres=3, radius=0.05, noise=noise)
    tx = psd_optax.perturbed_adam(
        kwargs["learning_rate"], g_thres=3.0, t_thres=3, radius=0.05, noise=noise, seed=5
    )
    ref = psd_core.perturbed_adam(**kwargs)
    params = to_tree(jnp.linspace(-0.5, 0.7, 5))
    ref_params = np_leaves(params)
    state, ref_state = tx.init(params), ref.init(ref_params)
    treedef = jax.tree_util.tree_structure(params)
    for _ in range(16):
        g = grad_tree(params)
        normals, uniform = draws_for(state.key, g)
        ref_g = np_leaves(grad_tree(jax.tree_util.tree_unflatten(treedef, ref_params)))
        u, state = jax.jit(tx.update)(g, state)
        params = optax.apply_updates(params, u)
        ru, ref_state = ref.update(ref_g, ref_state, normals=normals, uniform=uniform)
        ref_params = psd_core.apply_updates(ref_params, ru)
        np.testing.assert_allclose(
            to_vec(params), np.concatenate([r.ravel() for r in ref_params]), atol=1e-10, rtol=0
        )
        for a, b in zip(jax.tree_util.tree_leaves(state.mu), ref_state.mu):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-10, rtol=0)
        assert bool(state.perturbed) == bool(ref_state.perturbed)
        assert int(state.count) == int(ref_state.count)
    assert int(state.perturbations) >= 3


def test_perturbed_adam_without_perturbation_is_optax_adam():
    tx = psd_optax.perturbed_adam(
        0.01, b1=0.8, b2=0.99, eps=1e-6, g_thres=0.0, t_thres=1, radius=1.0
    )
    ref = optax.adam(0.01, b1=0.8, b2=0.99, eps=1e-6)
    p = q = to_tree(jnp.linspace(0.3, 0.9, 5))
    s, r = tx.init(p), ref.init(q)
    for _ in range(25):
        u, s = jax.jit(tx.update)(grad_tree(p), s)
        v, r = ref.update(grad_tree(q), r)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        np.testing.assert_allclose(to_vec(p), to_vec(q), rtol=1e-11, atol=1e-14)
    assert int(s.perturbations) == 0


def _finite_tree(tree):
    return all(
        bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float64))))
        for x in jax.tree_util.tree_leaves(tree)
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_is_skipped(bad):
    params = to_tree(jnp.linspace(0.1, 0.5, 5))
    g_bad = to_tree(jnp.asarray([0.0, 0.0, bad, 0.0, 0.0]))
    for tx in (
        psd_optax.psd(0.1, epsilon=1e9, radius=1.0, episode_length=2),  # would perturb
        psd_optax.perturbed_adam(0.1, g_thres=1e9, t_thres=1, radius=1.0),  # would perturb
    ):
        state = tx.init(params)
        # one finite step first so the state is not the initial one
        u, state = tx.update(grad_tree(params), state)
        params1 = optax.apply_updates(params, u)
        u, new_state = jax.jit(tx.update)(g_bad, state, params1)
        params2 = optax.apply_updates(params1, u)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))
        np.testing.assert_array_equal(to_vec(params2), to_vec(params1))
        assert _finite_tree(new_state)
        assert int(new_state.skipped) == int(state.skipped) + 1
        if isinstance(new_state, psd_optax.PSDState):
            # PSD's count counts every call (schedules see every step, as Optax's count);
            # PerturbedAdam's is Adam's bias-correction count: applied steps only
            assert int(new_state.count) == int(state.count) + 1
        for name in new_state._fields:
            if name in ("skipped", "perturbed") or (
                name == "count" and isinstance(new_state, psd_optax.PSDState)
            ):
                continue
            for a, b in zip(
                jax.tree_util.tree_leaves(getattr(new_state, name)),
                jax.tree_util.tree_leaves(getattr(state, name)),
            ):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        # a skipped step keeps the last step's flag (issue 11, bug 6)
        assert bool(new_state.perturbed) == bool(state.perturbed)


def test_chain_with_clip_and_inject_hyperparams():
    params = to_tree(jnp.linspace(0.1, 0.5, 5))
    chained = optax.chain(optax.clip_by_global_norm(0.1), psd_optax.psd(0.1, 1e-3, 0.01, 5))
    s = chained.init(params)
    u, s = jax.jit(chained.update)(grad_tree(params), s, params)
    g = grad_tree(params)
    clipped = 0.1 / float(optax.tree.norm(g))
    np.testing.assert_allclose(to_vec(u), -0.1 * clipped * to_vec(g), rtol=1e-12)

    sched = optax.linear_schedule(0.1, 0.01, 10)
    injected = optax.inject_hyperparams(psd_optax.psd)(
        learning_rate=sched, epsilon=0.5, radius=0.1, episode_length=5, t_thres=2
    )
    plain = psd_optax.psd(learning_rate=sched, epsilon=0.5, radius=0.1, episode_length=5, t_thres=2)
    p = q = to_tree(jnp.full(5, 1e-3))
    si, sp = injected.init(p), plain.init(q)
    lrs = []
    for _ in range(15):
        u, si = jax.jit(injected.update)(grad_tree(p), si, p)
        v, sp = jax.jit(plain.update)(grad_tree(q), sp, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        lrs.append(float(si.hyperparams["learning_rate"]))
        # inject_hyperparams evaluates the schedule at its own int32 count, in float32;
        # the plain transformation at its int64 count, in float64: float32 rounding apart
        np.testing.assert_allclose(to_vec(p), to_vec(q), rtol=2e-7, atol=1e-12)
    assert int(sp.episodes) >= 1
    np.testing.assert_allclose(lrs[0], float(sched(0)))
    # the episode counter is reachable for logging
    assert int(optax.tree_utils.tree_get(si, "episodes")) == int(sp.episodes)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: psd_optax.psd(-1.0, 1e-3, 0.1), "learning_rate"),
        (lambda: psd_optax.psd(0.1, -1e-3, 0.1), "epsilon"),
        (lambda: psd_optax.psd(0.1, 1e-3, float("nan")), "radius"),
        (lambda: psd_optax.psd(0.1, 1e-3, 0.1, -2), "episode_length"),
        (lambda: psd_optax.psd(0.1, 1e-3, 0.1, t_thres=-1), "t_thres"),
        (lambda: psd_optax.psd(0.1, 1e-3, 0.1, gate="hessian"), "gate"),
        (lambda: psd_optax.psd(0.1, 1e-3, 0.1, noise="uniform"), "noise"),
        (lambda: psd_optax.psd(0.1, 1e-3, 0.1, ema_beta=1.0), "ema_beta"),
        (lambda: psd_optax.from_theory(1e-2, 0.0, 1.0), "ell"),
        (lambda: psd_optax.from_theory(1e-2, 1.0, 1.0, delta=2.0), "delta"),
        (lambda: psd_optax.perturbed_adam(b1=1.0), "b1"),
        (lambda: psd_optax.perturbed_adam(eps=0.0), "eps"),
        (lambda: psd_optax.perturbed_adam(radius=-1.0), "radius"),
        (lambda: psd_optax.perturbed_adam(g_thres=-1.0), "g_thres"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        make()


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed"):
        psd_optax.psd(0.1, 1e-3, 0.1, seed="zero")
