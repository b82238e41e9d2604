"""Bad input: every constructor and solver names the argument and the value."""

from __future__ import annotations

import numpy as np
import pytest

import psd_core
from psd_core import functions as F
from psd_core import solvers as S
from psd_core.curvature import min_curvature, rayleigh_grad_diff
from psd_core.theory import probe_constants, psd_constants

BAD_CONSTRUCTORS = [
    (lambda: psd_core.psd(-0.1, 1e-3, 0.1), "learning_rate", "-0.1"),
    (lambda: psd_core.psd(0.1, -1e-3, 0.1), "epsilon", "-0.001"),
    (lambda: psd_core.psd(0.1, 1e-3, -0.1), "radius", "-0.1"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, -1), "episode_length", "-1"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, t_thres=-2), "t_thres", "-2"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, max_episodes=-1), "max_episodes", "-1"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, gate="norm2"), "gate", "norm2"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, noise="cauchy"), "noise", "cauchy"),
    (lambda: psd_core.psd(0.1, 1e-3, 0.1, ema_beta=1.5), "ema_beta", "1.5"),
    (lambda: psd_core.psd(float("nan"), 1e-3, 0.1), "learning_rate", "nan"),
    (lambda: psd_core.perturbed_adam(-1e-3), "learning_rate", "-0.001"),
    (lambda: psd_core.perturbed_adam(b1=1.0), "b1", "1.0"),
    (lambda: psd_core.perturbed_adam(b2=-0.1), "b2", "-0.1"),
    (lambda: psd_core.perturbed_adam(eps=0.0), "eps", "0.0"),
    (lambda: psd_core.perturbed_adam(radius=-1.0), "radius", "-1.0"),
    (lambda: psd_core.perturbed_adam(t_thres=-1), "t_thres", "-1"),
    (lambda: psd_core.sam_sps(rho=-0.1), "rho", "-0.1"),
    (lambda: psd_core.sam_sps(lambd=1.5), "lambd", "1.5"),
    (lambda: psd_core.sam_sps(lambd=-0.5), "lambd", "-0.5"),
    (lambda: psd_core.sam_sps(gamma_b=-1.0), "gamma_b", "-1.0"),
    (lambda: psd_core.sam_sps(gamma_b=0.0), "gamma_b", "0.0"),
    (lambda: psd_core.sam_sps(gamma_b=-float("inf")), "gamma_b", "-inf"),
    (lambda: psd_core.perturbed_adam(eps_mode="torch"), "eps_mode", "torch"),
    (lambda: psd_core.perturbed_adam(t_thres=2.5), "t_thres", "2.5"),
    (lambda: psd_core.sam_sps(weight_decay=-5e-4), "weight_decay", "-0.0005"),
    (lambda: psd_core.sam_sps(f_star=float("inf")), "f_star", "inf"),
    (lambda: psd_core.sam_sps(variant="sps++"), "variant", "sps++"),
    (lambda: psd_constants(-1.0, 1.0, 1.0, dim=3), "epsilon", "-1.0"),
    (lambda: psd_constants(0.1, 0.0, 1.0, dim=3), "ell", "0.0"),
    (lambda: psd_constants(0.1, 1.0, -2.0, dim=3), "rho", "-2.0"),
    (lambda: psd_constants(0.1, 1.0, 1.0, delta=1.0, dim=3), "delta", "1.0"),
    (lambda: psd_constants(0.1, 1.0, 1.0, delta=0.0, dim=3), "delta", "0.0"),
    (lambda: psd_constants(0.1, 1.0, 1.0, delta_f=-1.0, dim=3), "delta_f", "-1.0"),
    (lambda: psd_constants(0.1, 1.0, 1.0, dim=0), "dim", "0"),
    (lambda: probe_constants(0.1, 1.0, delta=2.0, dim=3), "delta", "2.0"),
    (lambda: min_curvature(lambda x, v: v, np.zeros(3), iters=0), "iters", "0"),
    (lambda: rayleigh_grad_diff(lambda x: x, np.zeros(3), np.ones(3), -1.0), "h", "-1.0"),
]


@pytest.mark.parametrize("make, name, value", BAD_CONSTRUCTORS)
def test_constructors_reject_bad_hyperparameters(make, name, value) -> None:
    # a value of the wrong kind (2.5 for an int) may be a TypeError, a bad value a ValueError
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert name in str(info.value) and value in str(info.value)


def test_type_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="episode_length"):
        psd_core.psd(0.1, 1e-3, 0.1, "ten")
    with pytest.raises(TypeError, match="lambd"):
        psd_core.sam_sps(lambd="one")


def test_empty_parameter_lists_and_mismatched_shapes() -> None:
    tx = psd_core.psd(0.1, 1e-3, 0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        tx.init([])
    state = tx.init([np.zeros(3)])
    with pytest.raises(
        ValueError,
        match=r"shape mismatch at index 0: normals\[0\].shape=\(4,\) but grads\[0\].shape=\(3,\)",
    ):
        tx.update(
            [np.zeros(3)], state, [np.zeros(3)], normals=[np.zeros(4)], uniform=np.asarray(0.5)
        )
    with pytest.raises(ValueError, match="grads has 2 arrays but params has 1"):
        tx.update(
            [np.zeros(3), np.zeros(1)], state, [np.zeros(3)], normals=[np.zeros(3), np.zeros(1)]
        )
    with pytest.raises(ValueError, match="empty parameter list"):
        psd_core.perturbed_adam().init([])
    with pytest.raises(ValueError, match="empty parameter list"):
        psd_core.sam_sps().init([])
    with pytest.raises(TypeError, match="params must be a list"):
        tx.init(np.zeros(3))


SOLVER_CALLS = [
    (lambda p, x: S.gd(p, x, lr=-1.0), "lr"),
    (lambda p, x: S.gd(p, x, lr=0.1, max_grad_evals=0), "max_grad_evals"),
    (lambda p, x: S.pgd(p, x, lr=0.1, g_thres=0.1, t_thres=5, radius=-0.1), "radius"),
    (lambda p, x: S.psd(p, x, epsilon=-0.1, ell=10, rho=24), "epsilon"),
    (lambda p, x: S.psd(p, x, epsilon=0.1, ell=10, rho=24, delta=1.2), "delta"),
    (lambda p, x: S.psd(p, x, epsilon=0.1, ell=10, rho=24, curvature="magic"), "curvature"),
    (lambda p, x: S.psd_probe(p, x, epsilon=0.1, ell=-10, rho=24), "ell"),
    (lambda p, x: S.psgd(p, x, epsilon=0.1, ell=10, rho=24, sigma=-1.0), "sigma"),
    (lambda p, x: S.momentum(p, x, lr=-0.1), "lr"),
    (lambda p, x: S.adam(p, x, lr=-0.1), "lr"),
    (lambda p, x: S.langevin(p, x, lr=0.1, sigma=-1.0), "sigma"),
    (lambda p, x: S.sam_sps(p, x, lambd=2.0, steps=1), "lambd"),
    (lambda p, x: S.sam_sps(p, x, rho=-1.0, steps=1), "rho"),
    (lambda p, x: S.sam(p, x, lr=-1.0, rho=0.1, steps=1), "lr"),
]


@pytest.mark.parametrize("call, name", SOLVER_CALLS)
def test_solvers_reject_bad_hyperparameters(call, name) -> None:
    p = F.separable_quartic(4)
    with pytest.raises(ValueError, match=name):
        call(p, p.saddle())


def test_solvers_reject_mismatched_start_points() -> None:
    p = F.separable_quartic(4)
    with pytest.raises(ValueError, match="mismatched shapes"):
        S.gd(p, np.zeros(5), lr=0.1)
    with pytest.raises(ValueError, match="1-D"):
        S.gd(p, np.zeros((2, 2)), lr=0.1)


def test_psd_updates_needs_one_part() -> None:
    from psd_core import perturbation as P

    coeffs = P.PSDCoefficients(
        grad=np.asarray(-0.1),
        noise=np.asarray(0.0),
        finite=np.asarray(True),
        perturb=np.asarray(False),
    )
    with pytest.raises(ValueError, match="grads and normals cannot both be None"):
        P.psd_updates(coeffs, None, None)
    # the two parts add up to the whole update (exactly here: b = 0)
    g, z = [np.arange(3.0)], [np.ones(3)]
    whole = P.psd_updates(coeffs, g, z)[0]
    parts = P.psd_updates(coeffs, g, None)[0] + P.psd_updates(coeffs, None, z)[0]
    np.testing.assert_array_equal(whole, parts)
    # and a non-finite step zeroes both parts
    bad = coeffs._replace(finite=np.asarray(False), noise=np.asarray(1.0))
    assert not P.psd_updates(bad, None, z)[0].any()
