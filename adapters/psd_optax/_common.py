"""Shared plumbing of the Optax adapter: hyperparameters, pytrees and draws.

Nothing here computes optimizer math: that is :mod:`psd_core`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psd_core._array import tree_acc_dtype, tree_all_finite, tree_sq_norm

__all__ = [
    "NoiseFn",
    "as_count",
    "check_schedule",
    "clamp_schedule",
    "default_float",
    "has_masked_nodes",
    "resolve_seed",
    "uncommitted",
    "draws_if",
    "noise_if",
    "gaussian_noise",
    "init_key",
    "resolve_hparams",
]

NoiseFn = Callable[[jax.Array, Sequence[jax.Array]], tuple[list[jax.Array], jax.Array]]
"""``noise_fn(key, leaves) -> (normals, uniform)``: standard normal draws shaped and
typed like ``leaves`` and one :math:`U(0, 1)` draw (0-d). Must be traceable."""


def gaussian_noise(
    key: jax.Array, leaves: Sequence[jax.Array]
) -> tuple[list[jax.Array], jax.Array]:
    """The default draws: one standard normal array per leaf and one uniform.

    ``key`` is split into ``len(leaves) + 1`` keys; leaf ``i`` gets
    ``jax.random.normal(keys[i], leaf.shape, leaf.dtype)`` and the uniform is
    ``jax.random.uniform(keys[-1], (), acc_dtype)`` with ``acc_dtype`` the
    accumulation dtype of the tree (float32 for float16/bfloat16/float32 leaves,
    float64 for float64 leaves). Under explicit sharding each normal array is drawn
    with its leaf's sharding (a custom ``noise_fn`` must do the same). Public so that tests and users can reproduce the
    draws of a step exactly (see the adapter docs).
    """
    keys = jax.random.split(key, len(leaves) + 1)
    normals = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x), out_sharding=_sharding_of(x))
        for k, x in zip(keys[:-1], leaves)
    ]
    uniform = jax.random.uniform(keys[-1], (), tree_acc_dtype(list(leaves)))
    return normals, uniform


def _sharding_of(x: jax.Array) -> Any:
    """The sharding in ``x``'s type (explicit-axes meshes), or ``None``.

    Drawing with it keeps the draws' type equal to the leaf's, which ``lax.cond``
    and explicit sharding require; with JAX's partitionable threefry the values do
    not depend on the sharding.
    """
    s = getattr(jax.typeof(x), "sharding", None)
    if s is None or not getattr(s, "mesh", None) or not s.mesh.axis_names:
        return None
    return s


def init_key(seed: Any) -> jax.Array:
    """The raw ``uint32[2]`` PRNG key kept in the state, from ``seed``.

    Accepted, as :func:`optax.noisy_sgd`'s ``key`` accepts them: a Python/NumPy
    int, a 0-d integer array (concrete or traced, e.g. under ``jax.vmap`` over
    seeds or ``optax.inject_hyperparams`` inside ``jit``), an old-style raw key
    (``jax.random.PRNGKey(1)``, ``uint32[2]``) or a new-style typed key
    (``jax.random.key(1)``), concrete or traced.
    """
    if isinstance(seed, jax.Array | np.ndarray | np.generic):
        dtype = seed.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if jnp.ndim(seed) != 0:
                raise ValueError(
                    f"Invalid seed: expected one typed PRNG key, got shape {jnp.shape(seed)}"
                )
            return jax.random.key_data(seed)
        if not jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_):
            raise TypeError(f"seed must be an int or a PRNG key, got an array of dtype {dtype}")
        if jnp.ndim(seed) == 0:
            return jax.random.PRNGKey(seed)
        if jnp.shape(seed) == (2,) and dtype == jnp.uint32:
            return jnp.asarray(seed)
        raise ValueError(
            f"Invalid seed: expected an int, a raw uint32[2] key or a typed key, "
            f"got an array of shape {jnp.shape(seed)} and dtype {dtype}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a PRNG key, got {seed!r} ({type(seed).__name__})")
    return jax.random.PRNGKey(seed)


def resolve_seed(seed: Any, key: Any) -> Any:
    """``key`` (Optax's name) or ``seed`` (this package's), validated when concrete.

    At most one may be given; neither means seed 0. A traced value (``vmap`` over
    seeds, ``inject_hyperparams`` inside ``jit``) is only used by ``init``.
    """
    if key is not None and seed is not None:
        raise ValueError("pass either seed or key, not both")
    value = key if key is not None else (0 if seed is None else seed)
    if not _is_traced(value):
        init_key(value)
    return value


def uncommitted(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` evaluated inside ``jax.jit`` so that its arrays are uncommitted.

    The core builds its initial state with ``device=`` of a template array, which
    commits the arrays to that device; Optax's own ``init`` returns uncommitted
    ones, and a jitted step fed a mix of committed state and uncommitted params
    compiles twice (on the first and on the second call). Under ``jit`` the
    template is a tracer, whose device is ``None``, so nothing is committed.
    """
    return jax.jit(fn)(*args)


def as_count(value: Any) -> Any:
    """A traced integral float (the core's array-valued theory constants) as a count
    of the default integer dtype, saturating at its maximum; anything else unchanged."""
    if not _is_traced(value):
        return value
    dt = jnp.asarray(0).dtype
    top = jnp.iinfo(dt).max
    return jnp.where(value >= float(top), top, value.astype(dt))


def default_float() -> Any:
    """The float dtype of a parameter-less template (``init`` on placeholder trees)."""
    return jnp.zeros(()).dtype


def check_schedule(name: str, schedule: Any) -> None:
    """Reject a schedule whose value at count 0 is a concrete negative number.

    Later values are traced (they cannot be checked); :func:`clamp_schedule`
    clamps them at 0 so that a negative value never makes the optimizer ascend.
    """
    if not callable(schedule):
        return
    v = schedule(jnp.zeros((), jnp.int32))
    if not _is_traced(v) and np.ndim(v) == 0 and float(np.asarray(v)) < 0:
        raise ValueError(
            f"Invalid {name}: the schedule returns {float(np.asarray(v))!r} at count 0 "
            "(must be >= 0)"
        )


def clamp_schedule(value: Any) -> Any:
    """A schedule or traced learning rate clamped at 0 (see :func:`check_schedule`)."""
    if callable(value):
        return lambda count: jnp.maximum(value(count), 0)
    if _is_traced(value):
        return jnp.maximum(value, 0)
    return value


def is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: Any) -> bool:
    """Whether ``tree`` holds ``optax.MaskedNode``s (from ``optax.masked`` / ``multi_transform``)."""
    return any(is_masked_node(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_masked_node))


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _concrete(name: str, value: Any) -> Any:
    """A concrete 0-d JAX/NumPy array as a Python scalar (``optax.inject_hyperparams``
    hands hyperparameters over as arrays); anything else unchanged."""
    if isinstance(value, jax.Array | np.ndarray | np.generic) and not _is_traced(value):
        if np.ndim(value) != 0:
            raise ValueError(
                f"Invalid {name}: expected a scalar, got an array of shape {np.shape(value)}"
            )
        return np.asarray(value).item()
    return value


def resolve_hparams(
    make_config: Callable[..., Any],
    values: Mapping[str, Any],
    placeholders: Mapping[str, Any],
) -> Any:
    """Build a core config from hyperparameters that may be arrays or JAX tracers.

    Python numbers and concrete arrays go through the core's validating config
    function (``ValueError``/``TypeError`` naming the argument). Under
    ``optax.inject_hyperparams`` inside ``jax.jit`` the hyperparameters arrive as
    tracers: they cannot be validated (they were, when ``init`` built the same
    transformation from concrete values), so the config is built with valid
    placeholders and the tracers are put back with ``_replace``. The core uses
    every numeric field only in array arithmetic, so traced fields work.

    A ``learning_rate`` schedule is checked at count 0 and, like a traced
    learning rate, clamped at 0 (see :func:`check_schedule`).
    """
    concrete: dict[str, Any] = {}
    traced: dict[str, Any] = {}
    for name, value in values.items():
        if _is_traced(value):
            if name not in placeholders:
                raise TypeError(f"{name} cannot be a traced value (pass it in static_args)")
            traced[name] = value
            concrete[name] = placeholders[name]
        else:
            concrete[name] = _concrete(name, value)
    if "learning_rate" in concrete:
        check_schedule("learning_rate", concrete["learning_rate"])
    cfg = make_config(**concrete)
    if traced:
        cfg = cfg._replace(**traced)
    if "learning_rate" in values:
        cfg = cfg._replace(learning_rate=clamp_schedule(cfg.learning_rate))
    return cfg


def all_finite(leaves: Sequence[jax.Array], sq_norm: jax.Array) -> jax.Array:
    """:func:`psd_core._array.tree_all_finite` of ``leaves``, read only when needed.

    ``sq_norm`` is their squared norm (:func:`psd_core._array.tree_sq_norm`). A NaN or
    inf entry makes it non-finite, so a finite ``sq_norm`` proves every entry finite;
    only a non-finite one (a non-finite entry, or a finite tree whose square
    overflows) runs the entrywise check, inside ``lax.cond``. The usual step thus
    saves a pass over the gradient and its parameter-sized boolean temporary. Same
    value as ``tree_all_finite(leaves)`` in every case (under ``vmap`` both branches
    run).
    """
    return jax.lax.cond(
        jnp.isfinite(sq_norm),
        lambda: jnp.ones((), bool),
        lambda: jnp.asarray(tree_all_finite(list(leaves)), bool),
    )


def _draw(
    key: jax.Array, template: Sequence[jax.Array], like: jax.Array, noise_fn: NoiseFn
) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
    """One perturbation's draws from ``key``: ``(normals, ||normals||^2, uniform, next_key)``
    (the key is split once; the statistics are cast to ``like``'s dtype)."""
    new_key, sub = jax.random.split(key)
    normals, uniform = noise_fn(sub, template)
    normals = list(normals)
    return normals, tree_sq_norm(normals).astype(like.dtype), uniform.astype(like.dtype), new_key


def draws_if(
    pred: jax.Array, key: jax.Array, leaves: list[jax.Array], like: jax.Array, noise_fn: NoiseFn
) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
    """Draw ``(normals, ||normals||^2, uniform)`` only where ``pred`` holds (``lax.cond``).

    On the other branch the "draws" are zeros (their coefficient is 0 there) and the
    key is not advanced; under ``vmap`` both branches run (``cond`` becomes a select).
    Only the draws cross the ``cond``: the update itself stays outside it, so XLA
    fuses it with ``optax.apply_updates``.
    """

    def draw(_: None) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
        return _draw(key, leaves, like, noise_fn)

    def skip(_: None) -> tuple[list[jax.Array], jax.Array, jax.Array, jax.Array]:
        one = jnp.ones_like(like)
        return [jnp.zeros_like(x) for x in leaves], one, one, key

    return jax.lax.cond(pred, draw, skip, None)


def noise_if(
    pred: jax.Array,
    key: jax.Array,
    params: list[jax.Array],
    template: list[jax.Array],
    like: jax.Array,
    noise_fn: NoiseFn,
    add_noise: Callable[[list[jax.Array], list[jax.Array], jax.Array, jax.Array], list[jax.Array]],
) -> tuple[list[jax.Array], jax.Array]:
    """``add_noise(params, normals, ||normals||^2, uniform)`` only where ``pred`` holds.

    The draws are ``noise_fn(subkey, template)`` (``template``: the gradient leaves,
    so that they are the same draws as :func:`draws_if` makes).

    The fused counterpart of :func:`draws_if`: a ``jax.lax.while_loop`` that runs
    its body once when ``pred`` is true and not at all otherwise. A while loop
    updates its carried buffers in place, so on the usual, non-perturbing step
    nothing parameter-sized is written; under ``vmap`` its predicate is batched and
    the body runs only on steps where at least one problem perturbs. The body is a
    ``jax.lax.cond`` on ``pred`` (true whenever the body runs; a select under
    ``vmap``): without it XLA hoists the draws' loop-invariant counters (two
    ``uint32`` arrays per distinct leaf shape) out of the loop body and computes them
    on every step, 2x the parameters written per step when the leaves' shapes
    differ. The key is advanced only when the draw runs, exactly as in
    :func:`draws_if`.
    """

    def draw(leaves: list[jax.Array], k: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        normals, nsq, uniform, new_key = _draw(k, template, like, noise_fn)
        return list(add_noise(leaves, normals, nsq, uniform)), new_key

    def skip(leaves: list[jax.Array], k: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        return leaves, k

    flag = jnp.asarray(pred, bool)

    def body(
        carry: tuple[jax.Array, list[jax.Array], jax.Array],
    ) -> tuple[jax.Array, list[jax.Array], jax.Array]:
        i, leaves, k = carry
        leaves, k = jax.lax.cond(flag, draw, skip, leaves, k)
        return i + 1, leaves, k

    trips = jnp.asarray(pred, jnp.int32)
    _, out, key = jax.lax.while_loop(
        lambda carry: carry[0] < trips, body, (jnp.zeros_like(trips), list(params), key)
    )
    return out, key
