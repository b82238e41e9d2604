"""The Optax tests' pytree of mixed shapes holding a 5-vector (the coupled quartic's variable)."""

from __future__ import annotations

import jax.numpy as jnp


def to_tree(x):
    x = jnp.asarray(x)
    return {"a": x[:2], "b": x[2:].reshape(3, 1)}


def to_vec(tree):
    return jnp.concatenate([tree["a"].reshape(-1), tree["b"].reshape(-1)])
