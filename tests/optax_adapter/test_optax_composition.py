"""``psd``, ``perturbed_adam`` and ``sam_sps`` inside Optax's wrappers.

``optax.MultiSteps``, ``optax.masked``, ``optax.multi_transform``,
``optax.apply_if_finite``, ``optax.inject_hyperparams`` on every number argument,
and ``optax.tree_utils.tree_get`` on the wrapped state. The reference is always the
plain transformation fed what the wrapper promises to feed it (the mean of the
accumulated gradients, the unmasked subtree, ...), computed without the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psd_optax

jax.config.update("jax_enable_x64", True)

A0 = jnp.array([0.3, -0.2, 0.5])
B0 = jnp.array([[0.1, 0.4], [-0.3, 0.2]])


def loss(params):
    a, b = params["a"], params["b"]
    return jnp.sum((a - 1.0) ** 2) + jnp.sum(b**2) * (1.0 + jnp.sum(a**2))


FACTORIES = {
    "psd": lambda: psd_optax.psd(0.05, epsilon=0.3, radius=0.05, episode_length=2, t_thres=1),
    "perturbed_adam": lambda: psd_optax.perturbed_adam(
        0.05, g_thres=1.0, t_thres=2, radius=0.05, seed=3
    ),
    "sam_sps": lambda: psd_optax.sam_sps(rho=0.05, gamma_b=0.5),
}
NAMES = list(FACTORIES)


def params0():
    return {"a": A0, "b": B0}


def extras(name, params, fun=loss):
    if name == "sam_sps":
        return {"value": fun(params), "value_and_grad_fn": jax.value_and_grad(fun)}
    return {}


def jit_update(tx, grads, state, params, **kw):
    """``jax.jit(tx.update)`` with the callables among ``kw`` bound statically."""
    fns = {k: v for k, v in kw.items() if callable(v)}
    arrays = {k: v for k, v in kw.items() if not callable(v)}
    return jax.jit(functools.partial(tx.update, **fns))(grads, state, params, **arrays)


def assert_trees_close(a, b, atol=1e-12):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_multisteps_applies_the_mean_of_k_gradients(name):
    k = 3
    tx = optax.MultiSteps(FACTORIES[name](), every_k_schedule=k)
    ref = FACTORIES[name]()
    p, q = params0(), params0()
    s, r = tx.init(p), ref.init(q)
    rng = np.random.default_rng(0)
    for _ in range(4):  # four applied steps of k micro-batches each
        grads = [
            jax.tree_util.tree_map(
                lambda x: x + 0.01 * rng.standard_normal(x.shape), jax.grad(loss)(p)
            )
            for _ in range(k)
        ]
        for i, g in enumerate(grads):
            u, s = jit_update(tx, g, s, p, **extras(name, p))
            if i < k - 1:
                assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))
        mean = jax.tree_util.tree_map(lambda *x: sum(x) / k, *grads)
        v, r = ref.update(mean, r, q, **extras(name, q))
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        # MultiSteps's running mean weights 1/(i+1) are float32: agreement to ~1e-8
        assert_trees_close(p, q, atol=1e-7)
    assert int(optax.tree_utils.tree_get(s, "mini_step")) == 0


MASK = {"a": True, "b": False}


@pytest.mark.parametrize("name", NAMES)
def test_masked_trains_the_subtree_alone(name):
    """``masked(tx)``: ``a`` moves as ``tx`` on ``a`` alone (``b`` frozen at its value)."""
    tx = optax.chain(
        optax.masked(FACTORIES[name](), MASK),
        optax.masked(optax.set_to_zero(), {"a": False, "b": True}),
    )
    ref = FACTORIES[name]()
    p = params0()
    s = tx.init(p)
    qa = {"a": A0}
    r = ref.init(qa)

    def loss_a(t):
        return loss({"a": t["a"], "b": B0})

    for _ in range(6):
        value, g = jax.value_and_grad(loss)(p)
        kw = extras(name, p)
        if name == "sam_sps":
            kw["full_params"] = p
        u, s = jit_update(tx, g, s, p, **kw)
        p = optax.apply_updates(p, u)
        v, r = ref.update(jax.grad(loss_a)(qa), r, qa, **extras(name, qa, loss_a))
        qa = optax.apply_updates(qa, v)
        np.testing.assert_allclose(p["a"], qa["a"], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(p["b"], B0)


def test_sam_sps_under_masked_without_full_params_says_what_to_pass():
    tx = optax.masked(psd_optax.sam_sps(rho=0.05), MASK)
    p = params0()
    s = tx.init(p)
    with pytest.raises(ValueError, match="full_params=params"):
        tx.update(jax.grad(loss)(p), s, p, **extras("sam_sps", p))


@pytest.mark.parametrize("name", NAMES)
def test_multi_transform_with_adam_on_the_other_labels(name):
    labels = {"a": "ours", "b": "adam"}
    tx = optax.multi_transform({"ours": FACTORIES[name](), "adam": optax.adam(0.01)}, labels)
    ours, adam = FACTORIES[name](), optax.adam(0.01)
    p = params0()
    s = tx.init(p)
    qa, qb = {"a": A0}, {"b": B0}
    ra, rb = ours.init(qa), adam.init(qb)
    for _ in range(5):
        g = jax.grad(loss)(p)
        kw = extras(name, p)
        if name == "sam_sps":
            kw["full_params"] = p
        u, s = jit_update(tx, g, s, p, **kw)

        def loss_a(t, b=qb["b"]):
            return loss({"a": t["a"], "b": b})

        ua, ra = ours.update({"a": g["a"]}, ra, qa, **extras(name, qa, loss_a))
        ub, rb = adam.update({"b": g["b"]}, rb, qb)
        p = optax.apply_updates(p, u)
        qa, qb = optax.apply_updates(qa, ua), optax.apply_updates(qb, ub)
        assert_trees_close(p, {"a": qa["a"], "b": qb["b"]})


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_non_finite_steps(name):
    tx = optax.apply_if_finite(FACTORIES[name](), max_consecutive_errors=3)
    ref = FACTORIES[name]()
    p, q = params0(), params0()
    s, r = tx.init(p), ref.init(q)
    for i in range(6):
        g = jax.grad(loss)(p)
        if i in (2, 3):
            g = {"a": g["a"].at[0].set(jnp.nan), "b": g["b"]}
        u, s = jit_update(tx, g, s, p, **extras(name, p))
        p = optax.apply_updates(p, u)
        if i not in (2, 3):
            v, r = ref.update(jax.grad(loss)(q), r, q, **extras(name, q))
            q = optax.apply_updates(q, v)
        assert_trees_close(p, q)
    assert int(optax.tree_utils.tree_get(s, "total_notfinite")) == 2


# Every argument that is a number, injected (so each is traced inside ``jit``). The
# thresholds are above this problem's gradient norms (3.3 falling to 1.6 over the 8 steps)
# so that the comparison covers perturbations.
INJECT = {
    "psd": (
        psd_optax.psd,
        dict(
            learning_rate=0.05,
            epsilon=3.0,
            radius=0.05,
            episode_length=2,
            t_thres=1,
            max_episodes=3,
            ema_beta=0.3,
            seed=4,
        ),
        {},
    ),
    "psd ema": (
        psd_optax.psd,
        dict(learning_rate=0.05, epsilon=3.0, radius=0.05, episode_length=2, ema_beta=0.3),
        {"gate": "ema", "noise": "gaussian"},
    ),
    "from_theory": (
        psd_optax.from_theory,
        dict(epsilon=0.2, ell=2.0, rho=5.0, delta=0.2, delta_f=0.5, t_thres=1, seed=2),
        {},
    ),
    "perturbed_adam": (
        psd_optax.perturbed_adam,
        dict(
            learning_rate=0.05,
            b1=0.8,
            b2=0.95,
            eps=1e-6,
            g_thres=5.0,
            t_thres=2,
            radius=0.05,
            seed=3,
        ),
        {},
    ),
    "sam_sps": (
        psd_optax.sam_sps,
        dict(rho=0.05, lambd=0.7, f_star=0.01, gamma_b=0.5, weight_decay=0.01),
        {},
    ),
}


@pytest.mark.parametrize("name", list(INJECT))
def test_inject_hyperparams_on_every_number_argument(name):
    factory, numbers, static = INJECT[name]
    tx = optax.inject_hyperparams(factory)(**numbers, **static)
    ref = factory(**numbers, **static)
    p, q = params0(), params0()
    s, r = tx.init(p), ref.init(q)
    assert set(numbers) <= set(s.hyperparams)
    kind = name.split()[0]
    events = 0
    for _ in range(8):
        u, s = jit_update(tx, jax.grad(loss)(p), s, p, **extras(kind, p))
        v, r = jit_update(ref, jax.grad(loss)(q), r, q, **extras(kind, q))
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        assert_trees_close(p, q, atol=1e-10)
        events += int(bool(getattr(r, "perturbed", False)))
    assert_trees_close(s.inner_state, r, atol=1e-10)
    if kind != "sam_sps":
        assert events >= 1  # the comparison covers a perturbation

    # the hyperparameters live in the state and can be changed between steps
    if "learning_rate" in numbers:
        s.hyperparams["learning_rate"] = jnp.asarray(0.0)
        g = jax.grad(loss)(p)
        u, s2 = jax.jit(tx.update)(g, s, p)
        if not bool(s2.inner_state.perturbed):
            assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("psd", "count"),
        ("psd", "episodes"),
        ("perturbed_adam", "count"),
        ("perturbed_adam", "perturbations"),
        ("sam_sps", "step_size"),
    ],
)
def test_tree_get_reaches_the_counters_through_wrappers(name, field):
    inner = FACTORIES[name]()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.apply_if_finite(inner, 2))
    p = params0()
    s = tx.init(p)
    for _ in range(3):
        u, s = tx.update(jax.grad(loss)(p), s, p, **extras(name, p))
        p = optax.apply_updates(p, u)
    value = optax.tree_utils.tree_get(s, field)
    inner_state = optax.tree_utils.tree_get(s, "inner_state")
    np.testing.assert_array_equal(np.asarray(value), np.asarray(getattr(inner_state, field)))
    if field == "count":
        assert int(value) == 3
