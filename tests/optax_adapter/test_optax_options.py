"""psd_optax options that Optax users pass: seeds and keys, traced hyperparameters,
large integers, schedules, and the arguments that are rejected.

References: Optax's own conventions (``optax.noisy_sgd``'s ``key``), the core's
constants (``psd_core.psd_constants``) and plain Python arithmetic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psd_core
import psd_optax

jax.config.update("jax_enable_x64", True)

PARAMS = {"w": jnp.array([0.2, -0.1, 0.05]), "b": jnp.array([[1e-3]])}
TINY = jax.tree_util.tree_map(lambda x: 1e-4 * jnp.ones_like(x), PARAMS)  # gate open


def perturbing(**seeds):
    """One factory per kind that perturbs on its first update (gate wide open)."""
    return {
        "psd": psd_optax.psd(0.1, epsilon=1.0, radius=0.5, episode_length=2, **seeds),
        "from_theory": psd_optax.from_theory(1.0, 1.0, 1.0, noise="gaussian", **seeds),
        "perturbed_adam": psd_optax.perturbed_adam(
            0.1, g_thres=1e9, t_thres=1, radius=0.5, **seeds
        ),
    }


KINDS = ["psd", "from_theory", "perturbed_adam"]


def first_update(tx):
    state = tx.init(PARAMS)
    u, state = jax.jit(tx.update)(TINY, state, PARAMS)
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(u)])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(lambda: {"seed": 7}, id="int"),
        pytest.param(lambda: {"seed": np.int64(7)}, id="numpy int"),
        pytest.param(lambda: {"seed": jnp.asarray(7)}, id="0-d array"),
        pytest.param(lambda: {"seed": jax.random.PRNGKey(7)}, id="raw key"),
        pytest.param(lambda: {"seed": jax.random.key(7)}, id="typed key"),
        pytest.param(lambda: {"key": 7}, id="key int"),
        pytest.param(lambda: {"key": jax.random.key(7)}, id="key typed"),
    ],
)
def test_every_seed_form_gives_the_draws_of_that_key(kind, seed):
    ref = first_update(perturbing(seed=7)[kind])
    got = first_update(perturbing(**seed())[kind])
    np.testing.assert_array_equal(got, ref)
    other = first_update(perturbing(seed=8)[kind])
    assert not np.array_equal(other, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_seeds_and_over_keys(kind):
    seeds = jnp.arange(4)

    def run(seed=None, key=None):
        tx = perturbing(seed=seed, key=key)[kind]
        state = tx.init(PARAMS)
        u, _ = tx.update(TINY, state, PARAMS)
        return u

    by_seed = jax.jit(jax.vmap(lambda s: run(seed=s)))(seeds)
    by_key = jax.vmap(lambda k: run(key=k))(jax.vmap(jax.random.key)(seeds))
    for i in range(4):
        ref = jax.tree_util.tree_leaves(run(seed=i))
        for a, b, c in zip(
            jax.tree_util.tree_leaves(by_seed), jax.tree_util.tree_leaves(by_key), ref
        ):
            np.testing.assert_allclose(a[i], c, rtol=1e-13, atol=0)  # jit vs eager: an ulp
            np.testing.assert_allclose(b[i], c, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_injected_seed_traced_inside_jit(kind):
    factory = {
        "psd": lambda seed: psd_optax.psd(0.1, 1.0, 0.5, 2, seed=seed),
        "from_theory": lambda seed: psd_optax.from_theory(1.0, 1.0, 1.0, seed=seed),
        "perturbed_adam": lambda seed: psd_optax.perturbed_adam(
            0.1, g_thres=1e9, t_thres=1, radius=0.5, seed=seed
        ),
    }[kind]
    tx = optax.inject_hyperparams(factory)(seed=5)
    state = jax.jit(tx.init)(PARAMS)
    u, state = jax.jit(tx.update)(TINY, state, PARAMS)
    ref = factory(5)
    v, _ = ref.update(TINY, ref.init(PARAMS), PARAMS)
    other = factory(6)
    w, _ = other.update(TINY, other.init(PARAMS), PARAMS)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (u, v, w))):
        # the same draws: jitted and eager agree to float64 rounding (a CI run saw 1 ulp,
        # 1.4e-16, between XLA's compiled arithmetic and eager ops), where another seed
        # differs in the first digits
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)
        assert not np.allclose(a, c, rtol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": "zero"}, TypeError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": jnp.zeros(3, jnp.uint32)}, ValueError, "seed"),
        ({"seed": jnp.zeros(2, jnp.float32)}, TypeError, "seed"),
        ({"seed": jax.random.split(jax.random.key(0), 2)}, ValueError, "seed"),
        ({"seed": 1, "key": 1}, ValueError, "either seed or key"),
    ],
)
def test_bad_seeds_raise_at_construction(kwargs, error, match):
    for make in (
        lambda: psd_optax.psd(0.1, 1e-3, 0.1, **kwargs),
        lambda: psd_optax.perturbed_adam(**kwargs),
        lambda: psd_optax.from_theory(1e-2, 1.0, 1.0, **kwargs),
    ):
        with pytest.raises(error, match=match):
            make()


def test_inject_hyperparams_from_theory_eager_and_traced():
    """Item 9: concrete arrays are validated as numbers; traced ones go through the
    core's array arithmetic and give the same constants."""
    numbers = dict(epsilon=0.2, ell=2.0, rho=5.0, delta=0.2, delta_f=0.5)
    tx = optax.inject_hyperparams(psd_optax.from_theory)(**numbers)
    ref = psd_optax.from_theory(**numbers)
    p = PARAMS
    s, r = tx.init(p), ref.init(p)
    # eager (concrete 0-d arrays) and jitted (tracers) updates
    u, s = tx.update(TINY, s, p)
    v, r = ref.update(TINY, r, p)
    for _ in range(4):
        u, s = jax.jit(tx.update)(TINY, s, p)
        v, r = jax.jit(ref.update)(TINY, r, p)
        for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    c = psd_core.psd_constants(**numbers, dim=4)
    assert int(s.inner_state.episode_left) == int(r.episode_left)
    assert int(r.episodes) == 1 and int(r.episode_left) == c.episode_length - 4
    # a bad value still raises, eagerly, naming the argument
    with pytest.raises(ValueError, match="ell"):
        optax.inject_hyperparams(psd_optax.from_theory)(0.2, -1.0, 5.0).init(p)


def test_core_constants_in_array_arithmetic_match_python():
    numbers = dict(epsilon=1e-3, ell=500.0, rho=10.0, delta=0.1, delta_f=1.0)
    c = psd_core.psd_constants(**numbers, dim=1000)
    a = jax.jit(lambda e: psd_core.psd_constants(e, 500.0, 10.0, 0.1, 1.0, dim=1000))(
        jnp.asarray(1e-3)
    )
    assert c.max_episodes == 64_000_000_001  # 1 + ceil(128 * 500 / 1e-6)
    for field in ("radius", "step_size", "gamma", "max_episodes", "episode_length"):
        np.testing.assert_allclose(float(getattr(a, field)), getattr(c, field), rtol=1e-12)


LARGE = [
    pytest.param(lambda: psd_optax.psd(0.1, 1.0, 0.1, 2, max_episodes=2**31), id="max_episodes"),
    pytest.param(lambda: psd_optax.psd(0.1, 1.0, 0.1, 2**31), id="episode_length"),
    pytest.param(lambda: psd_optax.psd(0.1, 1.0, 0.1, 2, t_thres=2**33), id="t_thres"),
    pytest.param(lambda: psd_optax.from_theory(1e-3, 500.0, 10.0), id="from_theory M"),
    pytest.param(
        lambda: psd_optax.perturbed_adam(g_thres=1e9, t_thres=2**40), id="perturbed_adam t_thres"
    ),
]


LARGE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, psd_optax
    params = {"w": jnp.array([0.2, -0.1, 0.05]), "b": jnp.array([[1e-3]])}
    tiny = jax.tree_util.tree_map(lambda x: 1e-4 * jnp.ones_like(x), params)
    makers = {
        "max_episodes": lambda: psd_optax.psd(0.1, 1.0, 0.1, 2, max_episodes=2**31),
        "episode_length": lambda: psd_optax.psd(0.1, 1.0, 0.1, 2**31),
        "t_thres": lambda: psd_optax.psd(0.1, 1.0, 0.1, 2, t_thres=2**33),
        "from_theory": lambda: psd_optax.from_theory(1e-3, 500.0, 10.0),
        "adam_t_thres": lambda: psd_optax.perturbed_adam(g_thres=1e9, t_thres=2**40),
    }
    for name, make in makers.items():
        tx = make()
        s = tx.init(params)
        u, s = jax.jit(tx.update)(tiny, s, params)
        u, s = jax.jit(tx.update)(tiny, s, params)
        leaves = jax.tree_util.tree_leaves(s)
        assert all(bool(jnp.all(x >= 0)) for x in leaves if jnp.issubdtype(x.dtype, jnp.integer)), name
        if name == "episode_length":
            # the episode started by the first (perturbing) step is effectively unlimited
            assert int(s.episode_left) >= 2**31 - 3, int(s.episode_left)
        if name == "max_episodes":
            assert int(s.episodes) == 1
        if name == "t_thres":
            # the first small gradient perturbs (the last perturbation counts as more
            # than t_thres steps ago, as Jin et al.'s t_noise = -t_thres - 1); the next
            # one needs 2**33 more steps, which neither int64 nor saturating int32 wraps
            assert int(s.episodes) == 1, int(s.episodes)
        if name == "adam_t_thres":
            assert int(s.perturbations) == 0
        print("ok", name, s.count.dtype)
    """
)


@pytest.mark.parametrize("x64", ["1", "0"], ids=["x64", "no-x64"])
def test_large_integer_hyperparameters(x64):
    """Item 10 (contract C1): ints beyond int32 are accepted at construction and work at
    the first updates, with x64 (int64 counters) and without (saturating int32)."""
    env = {**os.environ, "JAX_ENABLE_X64": x64, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", LARGE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok ") == 5, out.stdout


@pytest.mark.parametrize("make", LARGE)
def test_large_integers_are_validated_at_construction(make):
    make()  # no OverflowError here or later (see the subprocess test)


def test_negative_schedule_value_rejected_at_count_zero_and_clamped_later():
    with pytest.raises(ValueError, match="learning_rate"):
        psd_optax.psd(lambda c: -0.1, 1e-3, 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        psd_optax.perturbed_adam(lambda c: -0.1 + 0.0 * c)
    # a schedule that turns negative later is clamped at 0: no ascent, just no step
    sched = optax.linear_schedule(0.1, -0.1, 4)
    for tx in (
        psd_optax.psd(sched, epsilon=0.0, radius=0.1),
        psd_optax.perturbed_adam(sched, g_thres=0.0),
    ):
        p = PARAMS
        s = tx.init(p)
        g = jax.tree_util.tree_map(jnp.ones_like, p)
        for i in range(8):
            u, s = jax.jit(tx.update)(g, s, p)
            if i >= 2:  # sched(2) = 0, then negative
                assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u)), i
            else:
                assert all(bool(jnp.all(x < 0)) for x in jax.tree_util.tree_leaves(u)), i
    # a traced negative learning rate (inject_hyperparams, changed in the state) too
    tx = optax.inject_hyperparams(psd_optax.psd)(learning_rate=0.1, epsilon=0.0, radius=0.1)
    s = tx.init(PARAMS)
    s.hyperparams["learning_rate"] = jnp.asarray(-0.5)
    u, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.ones_like, PARAMS), s, PARAMS)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize("gamma_b", [0.0, -1.0])
def test_sam_sps_gamma_b_must_be_positive(gamma_b):
    with pytest.raises(ValueError, match="gamma_b"):
        psd_optax.sam_sps(gamma_b=gamma_b)


def test_perturbed_adam_names_the_radius_radius():
    import inspect

    params = inspect.signature(psd_optax.perturbed_adam).parameters
    assert "radius" in params and "r" not in params
    with pytest.raises(TypeError):
        psd_optax.perturbed_adam(r=1e-3)  # no alias (contract C11)


def test_perturbed_adam_count_is_the_applied_steps_like_apply_if_finite_adam():
    """Item 14 / C6: perturbed_adam's count is Adam's bias-correction count."""
    tx = psd_optax.perturbed_adam(0.01, g_thres=0.0)
    ref = optax.apply_if_finite(optax.adam(0.01), 10)
    p = q = PARAMS
    s, r = tx.init(p), ref.init(q)
    for i in range(5):
        g = jax.tree_util.tree_map(jnp.ones_like, p)
        if i == 2:
            g = jax.tree_util.tree_map(lambda x: x * jnp.nan, g)
        u, s = tx.update(g, s, p)
        v, r = ref.update(g, r, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    assert int(s.count) == int(optax.tree_utils.tree_get(r, "count")) == 4
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
