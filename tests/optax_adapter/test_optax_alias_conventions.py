"""The generic checks that Optax's own ``alias_test.py`` applies to every alias, ours.

Each factory of ``psd_optax`` must behave as an Optax alias does: it returns a
``GradientTransformationExtraArgs``; a jitted step compiles once (``init`` returns
uncommitted arrays); ``update`` ignores extra keyword arguments; it can be wrapped in
``optax.inject_hyperparams`` (same updates and states); ``optax.tree.map_params``
works on its state; updates keep the gradients' dtype (float16, bfloat16, float32,
float64) and the state keeps its shapes and dtypes; it accumulates under
``optax.MultiSteps``; and it solves a parabola. The references are Optax's
conventions and the parabola's known minimum, never the adapter itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psd_optax

jax.config.update("jax_enable_x64", True)

FACTORIES = {
    "psd": (psd_optax.psd, dict(learning_rate=0.05, epsilon=1e-3, radius=1e-2, episode_length=5)),
    "from_theory": (psd_optax.from_theory, dict(epsilon=1e-2, ell=10.0, rho=24.0)),
    "perturbed_adam": (
        psd_optax.perturbed_adam,
        dict(learning_rate=0.02, g_thres=1e-3, t_thres=10, radius=1e-3),
    ),
    "sam_sps": (psd_optax.sam_sps, dict(rho=0.05, gamma_b=1.0)),
}
NAMES = list(FACTORIES)

TARGET = jnp.array([1.0, -1.0, 1.0])


def objective(params):
    return jnp.sum((params - TARGET.astype(params.dtype)) ** 2)


def extras(name, params, fun=objective):
    """The extra arguments an alias needs (sam_sps: the loss and its second pass)."""
    if name == "sam_sps":
        return {"value": fun(params), "value_and_grad_fn": jax.value_and_grad(fun)}
    return {}


def jit_update(tx, grads, state, params, **kw):
    """``jax.jit(tx.update)`` with the callables among ``kw`` bound statically."""
    fns = {k: v for k, v in kw.items() if callable(v)}
    arrays = {k: v for k, v in kw.items() if not callable(v)}
    return jax.jit(functools.partial(tx.update, **fns))(grads, state, params, **arrays)


def make(name):
    factory, kwargs = FACTORIES[name]
    return factory(**kwargs)


@contextlib.contextmanager
def compilations():
    """The XLA compilations logged inside the block (what Optax's test counts)."""
    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            if re.search(r"Finished .* compilation", record.getMessage()):
                records.append(record)

    handler = Handler()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield records
    finally:
        logger.removeHandler(handler)


def jitted_step(name, tx):
    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(objective)(params)
        kw = extras(name, params)
        kw["value"] = value
        updates, state = tx.update(grads, state, params, **kw)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("name", NAMES)
def test_factory_returns_extra_args_transformation(name):
    assert isinstance(make(name), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", NAMES)
def test_init_returns_uncommitted_arrays(name):
    state = make(name).init(jnp.array([-1.0, 10.0, 1.0]))
    for leaf in jax.tree_util.tree_leaves(state):
        assert not leaf.committed, leaf


@pytest.mark.parametrize("name", NAMES)
def test_optimization_solves_a_parabola_without_recompiling(name):
    tx = make(name)
    step = jitted_step(name, tx)
    params = jnp.array([-1.0, 10.0, 1.0])
    state = tx.init(params)
    state = optax.tree.map_params(tx, lambda v: v, state)  # a no-op, as Optax checks
    for it in range(3000):
        if it == 1:
            with compilations() as logs:
                params, state = step(params, state)
            assert not logs, "the step recompiles on its second call"
        else:
            params, state = step(params, state)
    np.testing.assert_allclose(params, TARGET, rtol=3e-2, atol=3e-2)

    # a fresh state from init: calls 1 and 2 share one compilation
    params = jnp.array([-1.0, 10.0, 1.0])
    state = tx.init(params)
    params, state = step(params, state)
    with compilations() as logs:
        step(params, state)
    assert not logs


@pytest.mark.parametrize("name", NAMES)
def test_update_accepts_unexpected_extra_args(name):
    tx = make(name)
    params = jnp.array([-1.0, 10.0, 1.0])

    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        kw = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1, **extras(name, params)}
        updates, state = tx.update(grads, state, params, **kw)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(2):
        params, state = step(params, state)
    assert bool(jnp.all(jnp.isfinite(params)))


@pytest.mark.parametrize("name", NAMES)
def test_can_be_wrapped_in_inject_hyperparams(name):
    factory, kwargs = FACTORIES[name]
    tx = factory(**kwargs)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]

    def fun(p):
        return sum(jnp.sum(x**2) for x in p)

    kw = extras(name, params, fun)
    state = jax.jit(tx.init)(params)
    updates, new_state = jit_update(tx, grads, state, params, **kw)
    state_i = jax.jit(injected.init)(params)
    updates_i, new_state_i = jit_update(injected, grads, state_i, params, **kw)
    for a, b in zip(jax.tree_util.tree_leaves(updates_i), jax.tree_util.tree_leaves(updates)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    a = jax.tree_util.tree_leaves(optax.tree.unwrap_random_key_data(new_state_i.inner_state))
    b = jax.tree_util.tree_leaves(optax.tree.unwrap_random_key_data(new_state))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_map_params_on_a_placeholder_tree(name):
    tx = make(name)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    state = tx.init(params)
    # the usual way to build shardings or copies of the optimizer state
    same = optax.tree.map_params(tx, lambda v: v, state)
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(state)
    doubled = optax.tree.map_params(
        tx, lambda v: 2 * v + 1, state, transform_non_params=lambda v: v
    )
    if name == "perturbed_adam":
        # the moments are the parameter-shaped trees: exactly those are mapped
        np.testing.assert_array_equal(doubled.mu["w"], jnp.ones((3, 2)))
        np.testing.assert_array_equal(doubled.nu["b"], jnp.ones((2,)))
    np.testing.assert_array_equal(np.asarray(doubled.count), np.asarray(state.count))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_updates_keep_the_gradient_dtype(name, dtype):
    tx = make(name)

    def fun(x):
        return jnp.sum(x**2)

    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(fun)(params)
    state = jax.jit(tx.init)(params)
    updates, _ = jit_update(tx, grads, state, params, **extras(name, params, fun))
    assert updates.dtype == grads.dtype


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_state_shape_and_dtype_are_stable(name, dtype):
    tx = make(name)
    params = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)

    @jax.jit
    def step(params, state):
        grads = jax.grad(objective)(params)
        kw = extras(name, params)
        # lax.cond needs both branches' states to have one type: shapes, dtypes, weak types
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, state = jax.lax.cond(
            cond, lambda: tx.update(grads, state, params, **kw), lambda: (params, state)
        )
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    types = jax.tree_util.tree_map(jax.typeof, state)
    for _ in range(2):
        params, state = step(params, state)
        assert params.dtype == dtype
        assert jax.tree_util.tree_map(jax.typeof, state) == types


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation_with_multisteps(name, dtype):
    tx = optax.MultiSteps(make(name), every_k_schedule=4)

    def fun(x):
        return jnp.sum(x**2)

    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(fun)(params)
    state = jax.jit(tx.init)(params)
    kw = extras(name, params, fun)
    static = {k: v for k, v in kw.items() if not isinstance(v, jax.Array)}
    dynamic = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
    step = jax.jit(lambda g, s, p, **d: tx.update(g, s, p, **static, **d))
    updates, _ = step(grads, state, params, **dynamic)
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "after", ["polyak_sgd", "reduce_on_plateau"], ids=["polyak_sgd", "reduce_on_plateau"]
)
def test_chain_passing_value_to_every_member(name, after):
    """``optax.chain`` hands every member the same extra arguments (here ``value``)."""
    other = (
        optax.polyak_sgd(max_learning_rate=1.0)
        if after == "polyak_sgd"
        else optax.contrib.reduce_on_plateau(patience=2)
    )
    tx = optax.chain(make(name), other)
    params = jnp.array([-1.0, 10.0, 1.0])
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(objective)(params)
        kw = {**extras(name, params), "value": value}
        updates, state = tx.update(grads, state, params, **kw)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert bool(jnp.all(jnp.isfinite(params)))
