"""psd_optax inherits the core's issue-11 precision fixes, in float16/bfloat16/float32.

Each case is compared with an independent reference: Optax's own ``sgd``/``adam``
(with the PSD extras off) or the float64 transcription of SPEC in
``tests/reference.py``. The cases:

* a huge finite gradient (1e20 in float32/bfloat16, 3e4 in float16) is applied, not
  skipped as non-finite (its squared norm overflows; contract C2);
* PerturbedAdam on float16 with zero gradient entries moves (the Adam direction is
  computed in float32, contract C3, where eps = 1e-8 does not round to 0);
* SAM-SPS with :math:`\\|g\\| < \\rho/65504` stays finite on float16 (the offset
  :math:`\\rho g/\\|g\\|` is formed in float32);
* ``from_theory`` with :math:`M > 2^{31}` escapes the separable quartic's saddle at 0
  (int64 counters, contract C1);
* complex parameters (Optax's convention: the conjugated ``jax.grad``) equal the same
  problem on real pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import (
    fused_adam_reference,
    perturbed_adam_reference,
    psd_reference,
    sam_sps_reference,
)

import psd_core
import psd_optax

jax.config.update("jax_enable_x64", True)

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
IDS = ["float16", "bfloat16", "float32"]
HUGE = {jnp.float16: 3e4, jnp.bfloat16: 1e20, jnp.float32: 1e20}
RTOL = {jnp.float16: 2e-2, jnp.bfloat16: 2e-2, jnp.float32: 1e-5}


def _np(x):
    return np.asarray(jnp.asarray(x, jnp.float64))


def _tree(a, dtype):
    a = np.asarray(a, np.float64)
    return {"w": jnp.asarray(a[:2], dtype), "b": jnp.asarray(a[2:], dtype)}


def _vec(tree):
    return np.concatenate([_np(tree["b"]), _np(tree["w"])])  # tree order: b, w


def _vec_of(a):
    a = np.asarray(a, np.float64)
    return np.concatenate([a[2:], a[:2]])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_huge_finite_gradient_is_applied_like_sgd_and_adam(dtype):
    h = HUGE[dtype]
    x0 = np.array([1.0, -2.0, 3.0, 0.5])
    g0 = np.array([h, -h, 0.5 * h, 1.0])
    p, g = _tree(x0, dtype), _tree(g0, dtype)
    assert not np.isfinite(float(np.sum(np.square(np.float32(_vec(g)))))) or dtype == jnp.float16
    lr = 1e-3 if dtype == jnp.float16 else 1e-20
    # PSD (gate closed: ||g|| is huge) takes SGD's step
    tx = psd_optax.psd(lr, epsilon=1e-3, radius=0.1, episode_length=2)
    for update in (tx.update, jax.jit(tx.update)):
        u, s = update(g, tx.init(p), p)
        assert int(s.skipped) == 0 and not bool(s.perturbed)
        want, _ = optax.sgd(lr).update(g, optax.sgd(lr).init(p), p)
        for k in u:
            assert u[k].dtype == dtype
            np.testing.assert_allclose(_np(u[k]), _np(want[k]), rtol=RTOL[dtype])
    fused, s = psd_optax.update_and_apply(tx, g, tx.init(p), p)
    assert int(s.skipped) == 0
    for k in p:
        np.testing.assert_array_equal(_np(fused[k]), _np(optax.apply_updates(p, u)[k]))
    # PerturbedAdam with the gate off equals optax.adam (same dtype), 3 steps, not skipped
    ta = psd_optax.perturbed_adam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0)
    ref = optax.adam(0.01)
    sa, sr, pa, pr = ta.init(p), ref.init(p), p, p
    for _ in range(3):
        ua, sa = jax.jit(ta.update)(g, sa, pa)
        ur, sr = ref.update(g, sr, pr)
        pa, pr = optax.apply_updates(pa, ua), optax.apply_updates(pr, ur)
    assert int(sa.skipped) == 0 and int(sa.count) == 3
    for k in p:
        assert ua[k].dtype == dtype and np.all(np.isfinite(_np(pa[k])))
    # the moderate entry (b[1]) equals optax.adam; on the huge ones optax.adam's g**2
    # overflows (a zero step) where ours forms ((1 - b2) g) g, as torch.optim.Adam, and
    # steps like the transcription of fused Adam (float64 math, moments and parameters
    # rounded to the dtype for storage: about -lr sign(g) per step; in float16 the
    # stored v = 9e5 overflows to inf after the first step, as in torch's fused Adam)
    np.testing.assert_allclose(_np(pa["b"])[1], _np(pr["b"])[1], rtol=RTOL[dtype])
    want = fused_adam_reference(
        _vec(g), _vec(p), 3, 0.01, lambda a: _np(jnp.asarray(a, dtype)), b1=0.9, b2=0.999
    )
    np.testing.assert_allclose(_vec(pa), want, rtol=RTOL[dtype], atol=1e-6)
    # SAM-SPS on a linear loss with a huge slope (loss in float32) equals the transcription
    slope, offset = g0, 10.0 * h

    def vg(q):
        lin = sum(jnp.sum(g[k].astype(jnp.float32) * q[k].astype(jnp.float32)) for k in q)
        return lin + offset, jax.tree_util.tree_map(lambda a: a, g)

    def vg_np(t):
        return float(np.sum(_vec_of(slope) * t[0])) + offset, [_vec(g)]

    ts = psd_optax.sam_sps(rho=0.1, gamma_b=math.inf)
    loss, gg = vg(p)
    us, ss = jax.jit(lambda gg, s, p: ts.update(gg, s, p, value=loss, value_and_grad_fn=vg))(
        gg, ts.init(p), p
    )
    assert int(ss.skipped) == 0 and int(ss.count) == 1
    want = sam_sps_reference(vg_np, [_vec(p)], steps=1, rho=0.1, gamma_b=math.inf)
    np.testing.assert_allclose(
        _vec(optax.apply_updates(p, us)), want[0]["params"][0], rtol=RTOL[dtype], atol=1e-2
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_perturbed_adam_moves_with_zero_gradient_entries(dtype):
    """eps = 1e-8 rounds to 0 in float16; a zero entry gave 0/0 and every step was skipped."""
    x0 = np.array([0.5, -0.25, 1.0, 2.0])
    grads = [np.array([0.5, 0.0, -0.25, 0.0]) * (k + 1) for k in range(5)]
    tx = psd_optax.perturbed_adam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0)
    p = _tree(x0, dtype)
    s = tx.init(p)
    step = jax.jit(tx.update)
    want = perturbed_adam_reference(
        [[_vec_of(g)] for g in grads],
        [_vec_of(x0)],
        lr=0.01,
        g_thres=0.0,
        t_thres=10**6,
        radius=0.0,
        normals=[[np.zeros(4)]] * 5,
    )
    for k, g in enumerate(grads):
        u, s = step(_tree(g, dtype), s, p)
        p = optax.apply_updates(p, u)
        got = _vec(p)
        assert np.all(np.isfinite(got)), (k, got)
        np.testing.assert_allclose(got, want[k]["params"][0], rtol=RTOL[dtype], atol=1e-3)
    assert int(s.skipped) == 0 and int(s.count) == 5
    moved = np.abs(_vec(p) - _vec_of(x0))
    assert moved[2] > 0.03 and moved[0] > 0.03  # the nonzero entries (b[0], w[0]) moved
    np.testing.assert_array_equal(moved[[1, 3]], 0.0)  # zero entries: zero direction


@pytest.mark.parametrize("fused", [False, True], ids=["update", "update_and_apply"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_perturbed_adam_16bit_tiny_gradient_entries_step_like_fused_adam(dtype, fused):
    """Issue 11 bug 3, tiny entries: in float16 (1 - b2) g^2 underflows to 0 for |g| below
    about 8e-3 and the direction came from the stored (rounded) moments, so such an entry
    stepped by lr |g| / eps. Now from the step's float32 moments, as fused Adam (the
    transcription in tests/reference.py)."""
    g = np.array([1e-4, -2e-3, 5e-3, 0.5, -1.0, 0.0])
    tx = psd_optax.perturbed_adam(0.01, g_thres=0.0, t_thres=10**6, radius=0.0)
    p = {"w": jnp.ones(6, dtype)}
    s = tx.init(p)
    gt = {"w": jnp.asarray(g, dtype)}
    for _ in range(20):
        if fused:
            p, s = jax.jit(lambda g, s, p: psd_optax.update_and_apply(tx, g, s, p))(gt, s, p)
        else:
            u, s = jax.jit(tx.update)(gt, s, p)
            p = optax.apply_updates(p, u)
    assert int(s.skipped) == 0 and p["w"].dtype == dtype
    want = fused_adam_reference(
        _np(gt["w"]), np.ones(6), 20, 0.01, lambda a: _np(jnp.asarray(a, dtype))
    )
    ulp = 2.0**-10 if dtype == jnp.float16 else 2.0**-7
    np.testing.assert_allclose(_np(p["w"]), want, atol=20 * ulp)
    assert np.all(np.abs(_np(p["w"]) - 1.0) <= 1.0)  # the bug: 10 to 2000 lr per step


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sam_sps_tiny_gradient_stays_finite(dtype):
    """||g|| < rho/65504: rho/||g|| overflows float16; the offset is formed in float32."""
    rho = 0.1
    d = np.array([8.0, -8.0, 4.0, 6.0]) * 2.0**-24  # exact in float16 (subnormal)
    assert np.linalg.norm(d) < rho / 65504

    def loss32(q):  # f(x) = 1/2 ||x + d||^2 + 1, in float32
        return sum(
            0.5 * jnp.sum((q[k].astype(jnp.float32) + _tree(d, jnp.float32)[k]) ** 2) for k in q
        ) + jnp.float32(1.0)

    def vg(q):
        loss, gr = jax.value_and_grad(loss32)(q)
        return loss, gr

    def vg_np(t):
        r = t[0] + _vec_of(d)
        return 0.5 * float(r @ r) + 1.0, [r]

    p = _tree(np.zeros(4), dtype)
    tx = psd_optax.sam_sps(rho=rho, gamma_b=1.0)
    s = tx.init(p)
    want = sam_sps_reference(vg_np, [np.zeros(4)], steps=3, rho=rho, gamma_b=1.0)

    @jax.jit
    def step(p, s):
        loss, g = vg(p)
        u, s = tx.update(g, s, p, value=loss, value_and_grad_fn=vg)
        return optax.apply_updates(p, u), s

    for k in range(3):
        p, s = step(p, s)
        got = _vec(p)
        assert np.all(np.isfinite(got)), (k, got)
        np.testing.assert_allclose(got, want[k]["params"][0], rtol=RTOL[dtype], atol=2e-3)
        np.testing.assert_allclose(float(s.step_size), want[k]["step_size"], rtol=RTOL[dtype])
    assert int(s.skipped) == 0 and int(s.count) == 3
    assert np.linalg.norm(_vec(p)) > 0.05  # it moved (first step: about rho)


def _quartic_grad(x):
    return 4.0 * x**3 - 2.0 * x  # f(x) = sum(x^4 - x^2), saddle at 0


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_from_theory_with_budget_beyond_int32_escapes_the_quartic_saddle(dtype):
    theory = dict(epsilon=1e-4, ell=5.0, rho=24.0, delta=0.1, delta_f=1.0)
    c = psd_core.psd_constants(**theory, dim=4)
    assert c.max_episodes > 2**31
    z = np.array([0.3, -1.0, 0.7, 0.5])  # the (fixed) noise draws, tree order (b, w)

    def noise_fn(key, leaves):
        del key
        normals = [jnp.asarray(z[:2], leaves[0].dtype), jnp.asarray(z[2:], leaves[1].dtype)]
        return normals, jnp.asarray(0.5, jnp.float32)

    tx = psd_optax.from_theory(**theory, noise_fn=noise_fn)
    p = _tree(np.zeros(4), dtype)
    s = tx.init(p)
    assert s.count.dtype == jnp.int64

    @jax.jit
    def step(p, s):
        g = jax.tree_util.tree_map(
            lambda x: _quartic_grad(x.astype(jnp.float32)).astype(x.dtype), p
        )
        return psd_optax.update_and_apply(tx, g, s, p)

    steps = 120
    for _ in range(steps):
        p, s = step(p, s)
    want = psd_reference(
        lambda t: [_quartic_grad(t[0])],
        [np.zeros(4)],
        steps=steps,
        lr=c.step_size,
        epsilon=c.epsilon,
        radius=c.radius,
        episode_length=c.episode_length,
        max_episodes=c.max_episodes,
        normals=[[z]] * steps,
        uniforms=[0.5] * steps,
    )
    assert int(s.episodes) == want[-1]["episodes"] == 1 and int(s.skipped) == 0
    got = _vec(p)
    # escaped: every coordinate at a minimum +-1/sqrt(2), as the transcription
    np.testing.assert_allclose(np.abs(got), 1 / math.sqrt(2), rtol=RTOL[dtype], atol=1e-3)
    np.testing.assert_allclose(got, want[-1]["params"][0], rtol=RTOL[dtype], atol=1e-3)


AMAT = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]])


def _complex_loss(w):
    re, im = jnp.real(w), jnp.imag(w)
    r2 = re * re + im * im
    a = jnp.asarray(AMAT, re.dtype)
    return 0.5 * (re @ a @ re + im @ a @ im) + 0.25 * jnp.sum(r2 * r2) - 0.2 * jnp.sum(re)


def _pair_loss(u):
    return _complex_loss(u[:, 0] + 1j * u[:, 1])


@pytest.mark.parametrize("name", ["psd", "perturbed_adam", "sam_sps"])
def test_complex_parameters_equal_the_real_pairs(name):
    """Optax's convention for complex parameters: the optimizer receives the *conjugate*
    of ``jax.grad`` (as Optax's own tests pass it; JAX's gradient of a real function of
    ``w`` is the conjugate of torch's). The same problem on the real pairs
    ``[re, im]`` is the reference."""
    w0 = np.array([0.5 + 0.2j, -0.3 + 0.7j, 0.1 - 0.4j])
    u0 = np.stack([w0.real, w0.imag], axis=1)
    z = np.random.default_rng(0).standard_normal((3, 2))

    def noise_fn(key, leaves):
        del key
        (leaf,) = leaves
        if jnp.iscomplexobj(leaf):
            return [jnp.asarray(z[:, 0] + 1j * z[:, 1], leaf.dtype)], jnp.asarray(0.5)
        return [jnp.asarray(z, leaf.dtype)], jnp.asarray(0.5)

    makers = {
        "psd": lambda: psd_optax.psd(0.1, 0.5, 0.2, 3, noise_fn=noise_fn),
        "perturbed_adam": lambda: psd_optax.perturbed_adam(
            0.05, g_thres=10.0, t_thres=2, radius=0.1, noise_fn=noise_fn
        ),
        "sam_sps": lambda: psd_optax.sam_sps(rho=0.1, weight_decay=1e-2),
    }

    def run(loss, x0, conj):
        tx = makers[name]()
        vg = jax.value_and_grad(loss)

        def vgc(q):
            v, g = vg(q)
            return v, jnp.conj(g) if conj else g

        @jax.jit
        def step(x, s):
            v, g = vgc(x)
            if name == "sam_sps":
                u, s = tx.update(g, s, x, value=v, value_and_grad_fn=vgc)
            else:
                u, s = tx.update(g, s, x)
            return optax.apply_updates(x, u), s

        x, s = jnp.asarray(x0), tx.init(jnp.asarray(x0))
        out = []
        for _ in range(8):
            x, s = step(x, s)
            out.append(np.asarray(x))
        return out, s

    got, sc = run(_complex_loss, w0, conj=True)
    want, sr = run(_pair_loss, u0, conj=False)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.stack([a.real, a.imag], 1), b, rtol=1e-10, atol=1e-12)
    if name == "psd":
        assert int(sc.episodes) == int(sr.episodes) >= 1
    if name == "perturbed_adam":
        assert int(sc.perturbations) == int(sr.perturbations) >= 1
