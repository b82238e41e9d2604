"""Sharded parameters and batch over two CPU devices give the single-device result.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before JAX is
imported and this pytest process has imported JAX already, so the check runs in a
child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    r"""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import psd_optax

    assert jax.device_count() == 2, jax.devices()
    from jax.sharding import AxisType, Mesh
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 8))
    Y = X @ rng.standard_normal((8, 4)) + 0.1 * rng.standard_normal((64, 4))
    params0 = {"w": np.zeros((8, 4)), "b": np.zeros((4,))}

    def loss(params, xb, yb):
        r = xb @ params["w"] + params["b"] - yb
        return jnp.mean(r * r) + 0.25 * jnp.sum(params["w"] ** 4) - 0.5 * jnp.sum(params["w"] ** 2)

    def run(tx, kind, params, xb, yb, steps=10):
        vg = jax.value_and_grad(loss)

        @jax.jit
        def step(p, s):
            v, g = vg(p, xb, yb)
            if kind == "sam":
                u, s = tx.update(g, s, p, value=v, value_and_grad_fn=lambda q: vg(q, xb, yb))
            elif kind == "fused":
                return psd_optax.update_and_apply(tx, g, s, p)
            else:
                u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        s = tx.init(params)
        for _ in range(steps):
            params, s = step(params, s)
        return params, s

    makers = {
        "psd": (lambda: psd_optax.psd(0.02, epsilon=1e3, radius=0.2, episode_length=2, t_thres=4), "plain"),
        "perturbed_adam": (lambda: psd_optax.perturbed_adam(0.02, g_thres=1e3, t_thres=4, radius=0.1), "plain"),
        "sam_sps": (lambda: psd_optax.sam_sps(rho=0.05, gamma_b=0.5), "sam"),
    }
    makers["psd fused"] = (makers["psd"][0], "fused")
    makers["perturbed_adam fused"] = (makers["perturbed_adam"][0], "fused")
    dev0 = jax.devices()[0]
    meshes = {
        "explicit": jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,)),
        "auto": Mesh(np.array(jax.devices()), ("x",), axis_types=(AxisType.Auto,)),
    }
    cases = [(m, n) for m in meshes for n in makers]
    for mesh_name, name in cases:
        mesh = meshes[mesh_name]
        make, kind = makers[name]
        row = NamedSharding(mesh, P("x"))
        w_shard = NamedSharding(mesh, P("x", None))
        rep = NamedSharding(mesh, P())
        one = jax.device_put(params0, dev0)
        p1, s1 = run(make(), kind, one, jax.device_put(X, dev0), jax.device_put(Y, dev0))
        sharded = {"w": jax.device_put(params0["w"], w_shard), "b": jax.device_put(params0["b"], rep)}
        p2, s2 = run(make(), kind, sharded, jax.device_put(X, row), jax.device_put(Y, row))
        assert p2["w"].sharding.is_equivalent_to(w_shard, 2), (name, p2["w"].sharding)
        for a, b in zip(jax.tree_util.tree_leaves((p1, s1)), jax.tree_util.tree_leaves((p2, s2))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=f"{mesh_name} {name}")
        if name.startswith("psd"):
            assert int(s2.episodes) >= 1, int(s2.episodes)
        if name.startswith("perturbed_adam"):
            assert int(s2.perturbations) >= 1, int(s2.perturbations)
    print("SHARDING-OK")
    """
)


def test_sharded_params_and_batch_match_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SHARDING-OK" in out.stdout
