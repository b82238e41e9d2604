"""psd_optax through Flax's own training clients: ``nnx.Optimizer`` and ``TrainState``.

References: Optax's own optimizers where ours reduce to them (``psd`` with a gate that
never opens is ``optax.sgd``, ``perturbed_adam`` with ``g_thres=0`` is ``optax.adam``,
``sam_sps(rho=0)`` is ``optax.polyak_sgd``), and, with the perturbations on, the plain
Optax loop (``tx.update`` + ``optax.apply_updates`` on the same parameter pytree) that
the other optax tests check against SPEC. The Flax client must neither drop the extra
arguments nor lose the PRNG key held in the optimizer state.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psd_optax

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402
from flax.training import train_state  # noqa: E402

import psd_optax.flax as psd_flax  # noqa: E402

jax.config.update("jax_enable_x64", True)

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.standard_normal((32, 3)))
Y = jnp.asarray(np.sin(np.asarray(X) @ np.array([[1.0], [-2.0], [0.5]])))
STEPS = 8


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs, param_dtype=jnp.float64)
        self.l2 = nnx.Linear(8, 1, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def model_loss(model) -> jax.Array:
    return jnp.mean((model(X) - Y) ** 2)


def perturbed_adam(**kw):
    """``perturbed_adam`` with the radius under the name this checkout uses (C11)."""
    if "r" in kw and "radius" in inspect.signature(psd_optax.perturbed_adam).parameters:
        kw["radius"] = kw.pop("r")
    return psd_optax.perturbed_adam(**kw)


MAKERS = {
    # a perturbing configuration of each (the gate opens within the run)
    "psd": lambda: psd_optax.psd(0.05, epsilon=1e3, radius=0.05, episode_length=3, seed=3),
    "perturbed_adam": lambda: perturbed_adam(
        learning_rate=0.02, g_thres=1e3, t_thres=3, r=0.05, seed=3
    ),
    "sam_sps": lambda: psd_optax.sam_sps(rho=0.05, gamma_b=0.5),
}
# where ours reduce to Optax's own optimizer
REDUCES_TO = {
    "psd": (
        lambda: psd_optax.psd(0.05, epsilon=1e-30, radius=0.05, episode_length=3),
        lambda: optax.sgd(0.05),
    ),
    "perturbed_adam": (
        lambda: perturbed_adam(learning_rate=0.02, g_thres=0.0, t_thres=3, r=0.05),
        lambda: optax.adam(0.02),
    ),
    "sam_sps": (
        lambda: psd_optax.sam_sps(rho=0.0, f_star=0.0, gamma_b=0.5),
        lambda: optax.polyak_sgd(max_learning_rate=0.5, f_min=0.0),
    ),
}


def _leaves_close(a, b, rtol=1e-11, atol=1e-13):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- NNX
def nnx_train(tx, steps=STEPS):
    # one step function for all: psd / perturbed_adam ignore the extra arguments
    tx = optax.with_extra_args_support(tx)
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(model_loss)(model)
        opt.update(
            model,
            grads,
            value=loss,
            value_and_grad_fn=psd_flax.nnx_value_and_grad_fn(model_loss, model),
        )
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return model, opt, losses


def plain_train(tx, params, loss_of_params, steps=STEPS):
    """The plain Optax loop on a parameter pytree: the reference for the clients."""
    vg = jax.value_and_grad(loss_of_params)
    tx = optax.with_extra_args_support(tx)

    @jax.jit
    def step(p, s):
        v, g = vg(p)
        u, s = tx.update(g, s, p, value=v, value_and_grad_fn=vg)
        return optax.apply_updates(p, u), s

    s = tx.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return params, s


def nnx_initial_params():
    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.as_pure(params)

    def loss_of_params(p):
        return model_loss(nnx.merge(graphdef, p, rest))

    return params, loss_of_params


@pytest.mark.parametrize("name", list(REDUCES_TO))
def test_nnx_optimizer_reduces_to_optax(name):
    ours, theirs = REDUCES_TO[name]
    model_a, _, losses = nnx_train(ours())
    model_b, _, _ = nnx_train(theirs())
    _leaves_close(nnx.state(model_a, nnx.Param), nnx.state(model_b, nnx.Param))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", list(MAKERS))
def test_nnx_optimizer_equals_the_plain_optax_loop(name):
    model, opt, losses = nnx_train(MAKERS[name]())
    params0, loss_of_params = nnx_initial_params()
    p_ref, s_ref = plain_train(MAKERS[name](), params0, loss_of_params)
    _leaves_close(nnx.as_pure(nnx.state(model, nnx.Param)), p_ref)
    _leaves_close(nnx.as_pure(opt.opt_state), s_ref)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    state = nnx.as_pure(opt.opt_state)
    if name == "psd":
        assert int(state.episodes) >= 1  # the perturbation ran, the key lived in nnx's state
    if name == "perturbed_adam":
        assert int(state.perturbations) >= 1
    if name == "sam_sps":
        assert int(state.count) == STEPS and int(state.skipped) == 0


def test_nnx_sam_sps_runs_two_passes_per_step():
    """Eagerly (no jit), the model's forward runs exactly twice per optimizer step."""
    calls = []

    def counting_loss(model):
        calls.append(1)
        return model_loss(model)

    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, psd_optax.sam_sps(rho=0.05, gamma_b=0.5), wrt=nnx.Param)
    for _ in range(3):
        loss, grads = nnx.value_and_grad(counting_loss)(model)
        opt.update(
            model,
            grads,
            value=loss,
            value_and_grad_fn=psd_flax.nnx_value_and_grad_fn(counting_loss, model),
        )
    assert len(calls) == 6
    assert int(opt.step[...]) == 3


def test_nnx_sam_sps_without_the_function_fails_loudly():
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, psd_optax.sam_sps(rho=0.05), wrt=nnx.Param)
    grads = nnx.grad(model_loss)(model)
    with pytest.raises(TypeError, match="value_and_grad_fn"):
        opt.update(model, grads)


# ---------------------------------------------------------------------- TrainState
def ts_params():
    rng = np.random.default_rng(1)
    return {
        "w1": jnp.asarray(0.5 * rng.standard_normal((3, 8))),
        "b1": jnp.zeros(8),
        "w2": jnp.asarray(0.5 * rng.standard_normal((8, 1))),
    }


def apply_fn(variables, x):
    p = variables["params"]
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def ts_loss(params):
    return jnp.mean((apply_fn({"params": params}, X) - Y) ** 2)


def ts_train(tx, cls=psd_flax.TrainState, use_function=False, steps=STEPS):
    state = cls.create(apply_fn=apply_fn, params=ts_params(), tx=tx)
    vg = jax.value_and_grad(ts_loss)

    @jax.jit
    def step(state):
        loss, grads = vg(state.params)
        if use_function:
            return psd_flax.apply_gradients(state, grads=grads, value=loss, value_and_grad_fn=vg)
        return state.apply_gradients(grads=grads, value=loss, value_and_grad_fn=vg)

    for _ in range(steps):
        state = step(state)
    return state


def test_flax_train_state_cannot_forward_sam_sps_arguments():
    """The documented failure that the helper exists for."""
    state = train_state.TrainState.create(
        apply_fn=apply_fn, params=ts_params(), tx=psd_optax.sam_sps(rho=0.05)
    )
    grads = jax.grad(ts_loss)(state.params)
    with pytest.raises(TypeError, match="value_and_grad_fn"):
        state.apply_gradients(grads=grads)


@pytest.mark.parametrize("name", ["psd", "perturbed_adam"])
def test_flax_train_state_runs_psd_and_perturbed_adam_unchanged(name):
    state = train_state.TrainState.create(apply_fn=apply_fn, params=ts_params(), tx=MAKERS[name]())
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(ts_loss)(s.params)))
    for _ in range(STEPS):
        state = step(state)
    p_ref, s_ref = plain_train(MAKERS[name](), ts_params(), ts_loss)
    _leaves_close(state.params, p_ref)
    _leaves_close(state.opt_state, s_ref)
    assert int(state.step) == STEPS


@pytest.mark.parametrize(
    ("name", "use_function"),
    [("psd", False), ("perturbed_adam", True), ("sam_sps", False), ("sam_sps", True)],
)
def test_sam_train_state_equals_the_plain_optax_loop(name, use_function):
    state = ts_train(MAKERS[name](), use_function=use_function)
    p_ref, s_ref = plain_train(MAKERS[name](), ts_params(), ts_loss)
    _leaves_close(state.params, p_ref)
    _leaves_close(state.opt_state, s_ref)
    assert int(state.step) == STEPS
    assert float(ts_loss(state.params)) < float(ts_loss(ts_params()))


def test_sam_train_state_with_rho_zero_is_optax_polyak_sgd():
    ours, theirs = REDUCES_TO["sam_sps"]
    a = ts_train(ours())
    b = ts_train(theirs())
    _leaves_close(a.params, b.params)


def test_apply_gradients_helper_on_flax_own_train_state_and_owg_collection():
    """The function also works on Flax's own class; the OWG collection is copied."""
    owg = train_state.OVERWRITE_WITH_GRADIENT
    params = {"params": ts_params(), owg: {"scale": jnp.ones(())}}
    state = train_state.TrainState.create(
        apply_fn=apply_fn, params=params, tx=psd_optax.sam_sps(rho=0.05, gamma_b=0.5)
    )
    vg = jax.value_and_grad(ts_loss)
    loss, g = vg(state.params["params"])
    grads = {"params": g, owg: {"scale": jnp.full((), 7.0)}}
    new = psd_flax.apply_gradients(state, grads=grads, value=loss, value_and_grad_fn=vg)
    assert float(new.params[owg]["scale"]) == 7.0
    assert int(new.step) == 1 and int(new.opt_state.count) == 1
    p_ref, _ = plain_train(psd_optax.sam_sps(rho=0.05, gamma_b=0.5), ts_params(), ts_loss, 1)
    _leaves_close(new.params["params"], p_ref)
