"""FSDP-style sharding over four CPU devices gives the single-device run.

Every parameter is split along one of its axes by a ``NamedSharding`` (each device
holds a quarter of each leaf, as in fully sharded data parallelism, not replicated
parameters), the batch is split along the data axis, and the step is ``jax.jit``-ed
with explicit ``in_shardings``/``out_shardings`` and donated buffers. The reference is
the same number of steps on one device (float64, to 1e-10): ``psd``,
``perturbed_adam``, ``sam_sps`` and the fused ``update_and_apply``. The PRNG key in the
state stays replicated and identical on every device, and the noise drawn on a
perturbing step is the unsharded noise, so sharding changes no trajectory.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX is
imported and this pytest process has imported JAX already, so the check runs in a
child process (as ``test_optax_sharding.py`` does for two devices).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    r"""
    import inspect
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import psd_optax

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 8))
    Y = np.tanh(X @ rng.standard_normal((8, 4))) + 0.1 * rng.standard_normal((64, 4))
    params0 = {
        "w1": 0.3 * rng.standard_normal((8, 16)),
        "b1": np.zeros((16,)),
        "w2": 0.3 * rng.standard_normal((16, 4)),
        "b2": np.zeros((4,)),
    }

    def loss(params, xb, yb):
        h = jnp.tanh(xb @ params["w1"] + params["b1"])
        r = h @ params["w2"] + params["b2"] - yb
        return jnp.mean(r * r) + 0.1 * jnp.sum(params["w1"] ** 4) - 0.05 * jnp.sum(params["w1"] ** 2)

    def perturbed_adam(**kw):
        if "radius" in inspect.signature(psd_optax.perturbed_adam).parameters:
            kw["radius"] = kw.pop("r")
        return psd_optax.perturbed_adam(**kw)

    makers = {
        "psd": (lambda: psd_optax.psd(0.02, epsilon=1e3, radius=0.2, episode_length=2, t_thres=3, seed=5), "plain"),
        "psd gaussian": (lambda: psd_optax.psd(0.02, epsilon=1e3, radius=0.2, episode_length=2, noise="gaussian", seed=6), "plain"),
        "perturbed_adam": (lambda: perturbed_adam(learning_rate=0.02, g_thres=1e3, t_thres=3, r=0.1, seed=7), "plain"),
        "sam_sps": (lambda: psd_optax.sam_sps(rho=0.05, gamma_b=0.5), "sam"),
        "sam_sps usam wd": (lambda: psd_optax.sam_sps(rho=0.05, lambd=0.0, gamma_b=0.5, weight_decay=1e-3), "sam"),
    }
    makers["psd fused"] = (makers["psd"][0], "fused")
    makers["perturbed_adam fused"] = (makers["perturbed_adam"][0], "fused")

    def make_step(tx, kind):
        vg = jax.value_and_grad(loss)

        def step(p, s, xb, yb):
            v, g = vg(p, xb, yb)
            if kind == "sam":
                u, s = tx.update(g, s, p, value=v, value_and_grad_fn=lambda q: vg(q, xb, yb))
            elif kind == "fused":
                return psd_optax.update_and_apply(tx, g, s, p)
            else:
                u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    STEPS = 6

    def run_single(name):
        make, kind = makers[name]
        tx = make()
        dev0 = jax.devices()[0]
        p = jax.device_put(params0, dev0)
        s = tx.init(p)
        step = jax.jit(make_step(tx, kind))
        xb, yb = jax.device_put(X, dev0), jax.device_put(Y, dev0)
        for _ in range(STEPS):
            p, s = step(p, s, xb, yb)
        return p, s

    devices = np.array(jax.devices())
    layouts = {
        # one axis: parameters and batch both split four ways (ZeRO-3 / FSDP)
        "fsdp4": (Mesh(devices, ("fsdp",)), "fsdp", "fsdp"),
        # two axes: batch over "data", parameters over "fsdp" (hybrid sharding)
        "data2xfsdp2": (Mesh(devices.reshape(2, 2), ("data", "fsdp")), "fsdp", "data"),
    }

    def param_specs(ax):
        # each leaf split along one of its axes (w2 along its first, the others as listed)
        return {"w1": P(None, ax), "b1": P(ax), "w2": P(ax, None), "b2": P(ax)}

    def run_sharded(name, layout):
        mesh, pax, dax = layouts[layout]
        make, kind = makers[name]
        tx = make()
        pshard = {k: NamedSharding(mesh, spec) for k, spec in param_specs(pax).items()}
        bshard = NamedSharding(mesh, P(dax, None))
        p = jax.device_put(params0, pshard)
        s = tx.init(p)
        # FSDP: parameter-shaped state (Adam's moments) sharded like its parameter,
        # scalars and the PRNG key replicated (the leaves' shapes are distinct)
        by_shape = {params0[k].shape: pshard[k] for k in params0}
        rep = NamedSharding(mesh, P())
        sshard = jax.tree_util.tree_map(lambda a: by_shape.get(a.shape, rep), s)
        s = jax.device_put(s, sshard)
        step = jax.jit(
            make_step(tx, kind),
            in_shardings=(pshard, sshard, bshard, bshard),
            out_shardings=(pshard, sshard),
            donate_argnums=(0, 1),
        )
        xb, yb = jax.device_put(X, bshard), jax.device_put(Y, bshard)
        for _ in range(STEPS):
            p, s = step(p, s, xb, yb)
        return p, s, pshard, mesh

    by_shape_all = {a.shape for a in params0.values()}
    singles = {name: run_single(name) for name in makers}
    # every configuration on the 4-way FSDP mesh, the main three on the hybrid one
    cases = [("fsdp4", name) for name in makers] + [
        ("data2xfsdp2", name) for name in ("psd", "perturbed_adam fused", "sam_sps")
    ]
    for layout, name in cases:
        p1, s1 = singles[name]
        p2, s2, pshard, mesh = run_sharded(name, layout)
        tag = f"{layout} {name}"
        for k, a in p2.items():
            assert a.sharding.is_equivalent_to(pshard[k], a.ndim), (tag, k, a.sharding)
            # really sharded: no device holds the whole leaf
            nd = mesh.shape["fsdp"]
            for shard in a.addressable_shards:
                assert shard.data.size * nd == a.size, (tag, k, shard.data.shape, a.shape)
        for a in jax.tree_util.tree_leaves(s2):
            if a.shape in by_shape_all:  # moments stay sharded like their parameter
                assert not a.sharding.is_fully_replicated, (tag, a.shape, a.sharding)
        for a, b in zip(jax.tree_util.tree_leaves((p1, s1)), jax.tree_util.tree_leaves((p2, s2))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12, err_msg=tag)
        key = getattr(s2, "key", None)
        if key is not None:
            # the PRNG key: replicated, the same bits on every device, equal to the unsharded one
            kd = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            assert kd.sharding.is_fully_replicated, (tag, kd.sharding)
            bits = [np.asarray(sh.data) for sh in kd.addressable_shards]
            assert all(np.array_equal(bits[0], b) for b in bits[1:]), tag
            k1 = s1.key
            k1 = jax.random.key_data(k1) if jnp.issubdtype(k1.dtype, jax.dtypes.prng_key) else k1
            assert np.array_equal(np.asarray(k1), bits[0]), tag
        if name.startswith("psd"):
            assert int(s2.episodes) >= 1, (tag, int(s2.episodes))
        if name.startswith("perturbed_adam"):
            assert int(s2.perturbations) >= 1, (tag, int(s2.perturbations))
        if name.startswith("sam_sps"):
            assert int(s2.count) == STEPS and int(s2.skipped) == 0, tag
        print("ok", tag, flush=True)

    # the noise itself: drawn on a sharded perturbing step equals the unsharded draw
    mesh, pax, _ = layouts["fsdp4"]
    pshard = {k: NamedSharding(mesh, spec) for k, spec in param_specs(pax).items()}
    tx = psd_optax.psd(1.0, epsilon=1e3, radius=0.5, episode_length=3, seed=11)
    zeros = jax.tree_util.tree_map(np.zeros_like, params0)
    ones = jax.tree_util.tree_map(lambda a: np.full_like(a, 1e-3), params0)
    u1, _ = jax.jit(tx.update)(ones, tx.init(zeros), zeros)
    pz = jax.device_put(zeros, pshard)
    s0 = jax.device_put(tx.init(pz), NamedSharding(mesh, P()))
    u2, _ = jax.jit(tx.update)(jax.device_put(ones, pshard), s0, pz)
    assert any(float(jnp.max(jnp.abs(v - 1e-3))) > 1e-6 for v in jax.tree_util.tree_leaves(u1)), "no noise"
    for k in u1:
        np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]), err_msg=k)
    print("FSDP-OK", jax.config.jax_threefry_partitionable)
    """
)


@pytest.mark.slow
def test_fsdp_sharded_params_match_single_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FSDP-OK" in out.stdout
