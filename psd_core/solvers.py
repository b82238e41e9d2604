r"""Whole-loop reference solvers built from the core's pure functions.

Every solver has the shape ``solver(problem, x0, *, <hyperparameters>, seed=0,
max_grad_evals=...)`` and returns a :class:`SolverResult`. A *problem* is any
object with ``value(x)``, ``grad(x)`` and, where needed, ``hvp(x, v)`` /
``hess(x)`` (see :mod:`psd_core.functions`). ``x0`` is a 1-D array of any
array-API library; the solver computes in that library.

Solvers are *drivers*: unlike the pure updates they are Python loops that read a
few scalars on the host (to count gradient evaluations and to stop). Every
formula they use comes from the core (:mod:`~psd_core.perturbation`,
:mod:`~psd_core.curvature`, :mod:`~psd_core.polyak`, :mod:`~psd_core.baselines`).
Random draws come from :class:`psd_core.HostDraws` (NumPy on the host, converted),
so with the same seed a NumPy, PyTorch or JAX ``x0`` gives the same run.

Counting: ``grad_evals`` counts gradient evaluations (stochastic solvers count
``B`` per mini-batch of size ``B``); a finite-difference Hessian-vector product
costs 2, and is counted there; exact Hessians and exact HVPs (``curvature="exact"``
in :func:`psd`) are counted in ``hvps`` only, as in the paper's reference code.

SOSP oracle: pass ``sosp=(epsilon, gamma)`` to stop any solver at the first
iterate with :math:`\|\nabla f\| \le \epsilon` and :math:`\lambda_{\min}(\nabla^2 f) \ge -\gamma`
(checked with a dense ``eigvalsh``, whose cost is not counted). This gives every
method the same stopping rule in the escape table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from . import baselines as B
from . import sam_baselines as SB
from ._array import Array, as_scalar, namespace, tree_size, tree_sq_norm
from .curvature import (
    hvp_from_grad,
    is_strict_saddle,
    min_curvature,
    negative_curvature_step,
    random_probe_test,
    rayleigh_grad_diff,
)
from .perturbation import (
    adam_bias_corrections,
    adam_direction,
    adam_moments,
    psd_coefficients,
    psd_config,
    psd_gate,
    psd_init,
    psd_updates,
)
from .polyak import sam_perturbation_scale
from .polyak import sam_sps as sam_sps_transform
from .random import HostDraws
from .theory import probe_constants, psd_constants, psgd_batch_size, psgd_gate_threshold
from .validation import (
    check_beta,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
)

__all__ = [
    "SolverResult",
    "adam",
    "adasam",
    "andriushchenko_flammarion_deterministic_schedule",
    "andriushchenko_flammarion_schedule",
    "bfgs",
    "condition_scaled_gd",
    "gd",
    "jin_pgd_constants",
    "khanh_schedule",
    "langevin",
    "lightsam",
    "momentum",
    "newton",
    "oikonomou_schedule",
    "oikonomou_stochastic_schedule",
    "pgd",
    "pgd_jin",
    "psd",
    "psd_probe",
    "psgd",
    "sa_sam",
    "sam",
    "sam_sps",
]


class SolverResult(NamedTuple):
    x: Array
    """Final iterate (same library and dtype as ``x0``)."""
    grad_evals: int
    episodes: int
    """Perturbations / escape episodes / negative-curvature steps taken."""
    converged: bool
    """The solver's own stopping rule (or the SOSP oracle) was met."""
    history: dict[str, list[float]]
    """Per-iteration records: ``grad_evals``, ``value``, ``grad_norm`` (+ solver-specific)."""
    hvps: int = 0
    """Exact Hessian-vector products / dense Hessians used (not in ``grad_evals``)."""


class _Run:
    """Bookkeeping shared by the solvers: gradient counter, history, SOSP oracle."""

    def __init__(
        self,
        problem: Any,
        x0: Array,
        max_grad_evals: int,
        sosp: tuple[float, float] | None,
        record_every: int,
    ) -> None:
        if x0 is None or getattr(x0, "ndim", None) != 1:
            raise ValueError(
                f"x0 must be a 1-D array, got {type(x0).__name__} with ndim={getattr(x0, 'ndim', None)}"
            )
        dim = getattr(problem, "dim", None)
        if dim is not None and int(x0.shape[0]) != int(dim):
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)} but problem.dim is {dim} (mismatched shapes)"
            )
        self.problem = problem
        self.max = check_int("max_grad_evals", max_grad_evals, minimum=1)
        self.evals = 0
        self.hvps = 0
        self.sosp = sosp
        self.every = check_int("record_every", record_every, minimum=1)
        self.history: dict[str, list[float]] = {"grad_evals": [], "value": [], "grad_norm": []}
        self.iteration = 0
        self.xp = namespace(x0)

    def grad(self, x: Array, cost: int = 1) -> Array:
        self.evals += cost
        return self.problem.grad(x)

    def budget_left(self) -> bool:
        return self.evals < self.max

    def record(self, x: Array, g2: Array, **extra: float) -> None:
        if self.iteration % self.every == 0:
            self.history["grad_evals"].append(float(self.evals))
            self.history["value"].append(float(self.problem.value(x)))
            self.history["grad_norm"].append(math.sqrt(max(float(g2), 0.0)))
            for k, v in extra.items():
                self.history.setdefault(k, []).append(float(v))
        self.iteration += 1

    def lambda_min(self, x: Array) -> float:
        self.hvps += 1
        return _eigvalsh_min(self.xp, self.problem.hess(x))

    def at_sosp(self, x: Array, g2: Array) -> bool:
        """The oracle: evaluated only when ``sosp`` is given and the gradient is small."""
        if self.sosp is None:
            return False
        eps, gamma = self.sosp
        if math.sqrt(max(float(g2), 0.0)) > eps:
            return False
        return _eigvalsh_min(self.xp, self.problem.hess(x)) >= -gamma

    def result(self, x: Array, episodes: int, converged: bool) -> SolverResult:
        return SolverResult(
            x=x,
            grad_evals=self.evals,
            episodes=episodes,
            converged=converged,
            history=self.history,
            hvps=self.hvps,
        )


def _sq(g: Array) -> Array:
    return tree_sq_norm([g])


def _eigvalsh_min(xp: Any, H: Array) -> float:
    """Smallest eigenvalue of the dense symmetric ``H``, computed in its accumulation dtype
    (float32 for a float16/bfloat16 Hessian: no backend has a 16-bit ``eigvalsh``)."""
    acc = B._work_dtype(xp, H.dtype)
    if H.dtype != acc:
        H = xp.astype(H, acc)
    return float(xp.linalg.eigvalsh(H)[0])


# --------------------------------------------------------------------------------------
# First-order baselines
# --------------------------------------------------------------------------------------


def _first_order_loop(
    problem: Any,
    x0: Array,
    max_grad_evals: int,
    sosp: tuple[float, float] | None,
    record_every: int,
    init: Callable[[Array, _Run], Any],
    step: Callable[[Array, Array, Any, _Run], tuple[Array, Any]],
) -> SolverResult:
    """The loop shared by the one-gradient-per-step baselines: evaluate, record, stop at an
    SOSP if asked, then ``x, aux = step(x, g, aux, run)``."""
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    x, aux = x0, init(x0, run)
    while run.budget_left():
        g = run.grad(x)
        g2 = _sq(g)
        run.record(x, g2)
        if run.at_sosp(x, g2):
            return run.result(x, 0, True)
        x, aux = step(x, g, aux, run)
    return run.result(x, 0, False)


_Sosp = tuple[float, float] | None


def gd(
    problem: Any,
    x0: Array,
    *,
    lr: float,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Gradient descent :math:`x^+ = x - \eta\nabla f(x)` (:func:`psd_core.baselines.gd_step`)."""
    lr = check_nonnegative("lr", lr)
    return _first_order_loop(
        problem,
        x0,
        max_grad_evals,
        sosp,
        record_every,
        lambda x, run: None,
        lambda x, g, aux, run: (B.gd_step(x, g, lr), None),
    )


def momentum(
    problem: Any,
    x0: Array,
    *,
    lr: float,
    beta: float = 0.9,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Heavy-ball momentum (:func:`psd_core.baselines.momentum_step`)."""
    lr = check_nonnegative("lr", lr)
    return _first_order_loop(
        problem,
        x0,
        max_grad_evals,
        sosp,
        record_every,
        lambda x, run: run.xp.zeros_like(x),
        lambda x, g, v, run: B.momentum_step(x, v, g, lr, beta),
    )


def langevin(
    problem: Any,
    x0: Array,
    *,
    lr: float,
    sigma: float,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Langevin-noise GD :math:`x - \eta(\nabla f + \sigma\xi)` (:func:`psd_core.baselines.langevin_step`)."""
    lr = check_nonnegative("lr", lr)
    sigma = check_nonnegative("sigma", sigma)
    draws = HostDraws(seed)

    def step(x: Array, g: Array, aux: Any, run: _Run) -> tuple[Array, Any]:
        return B.langevin_step(x, g, draws.normals_like([x])[0], lr, sigma), None

    return _first_order_loop(
        problem, x0, max_grad_evals, sosp, record_every, lambda x, run: None, step
    )


def adam(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Adam with bias correction (the core's :func:`~psd_core.perturbation.adam_moments` and
    :func:`~psd_core.perturbation.adam_direction`).

    For float16/bfloat16 ``x0`` the moments live in the accumulation dtype (float32) and
    the step is taken there and rounded to ``x``'s dtype once: a 16-bit second moment
    underflows to 0 where :math:`(1-\beta_2)g^2 < 6\cdot10^{-8}` (float16), which turns
    :math:`\hat m/(\sqrt{\hat v}+\epsilon)` into :math:`\hat m/\epsilon`, a huge step.
    """
    lr = check_nonnegative("lr", lr)

    def init(x: Array, run: _Run) -> Any:
        z = run.xp.zeros(x.shape, dtype=B._work_dtype(run.xp, x.dtype), device=_dev(x))
        return [z], [z], 0

    def step(x: Array, g: Array, aux: Any, run: _Run) -> tuple[Array, Any]:
        mu, nu, t = aux
        mu, nu = adam_moments([g], mu, nu, b1, b2)
        bc1, bc2 = adam_bias_corrections(run.xp.asarray(t + 1), b1, b2, _sq(g))
        d = adam_direction(mu, nu, bc1, bc2, eps)[0]
        x_new = B.gd_step(run.xp.astype(x, d.dtype), d, lr)
        return run.xp.astype(x_new, x.dtype), (mu, nu, t + 1)

    return _first_order_loop(problem, x0, max_grad_evals, sosp, record_every, init, step)


def newton(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1.0,
    damping: float = 0.0,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    """Damped Newton (:func:`psd_core.baselines.newton_step`); each step also uses one dense Hessian."""
    lr = check_nonnegative("lr", lr)

    def step(x: Array, g: Array, aux: Any, run: _Run) -> tuple[Array, Any]:
        run.hvps += 1
        return B.newton_step(x, g, problem.hess(x), lr, damping), None

    return _first_order_loop(
        problem, x0, max_grad_evals, sosp, record_every, lambda x, run: None, step
    )


def condition_scaled_gd(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1.0,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: _Sosp = None,
    record_every: int = 1,
) -> SolverResult:
    """GD with the step scaled by the local curvature (:func:`psd_core.baselines.condition_scaled_step`)."""
    lr = check_nonnegative("lr", lr)

    def step(x: Array, g: Array, aux: Any, run: _Run) -> tuple[Array, Any]:
        run.hvps += 1
        return B.condition_scaled_step(x, g, problem.hess(x), lr), None

    return _first_order_loop(
        problem, x0, max_grad_evals, sosp, record_every, lambda x, run: None, step
    )


def bfgs(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1.0,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    """BFGS with a fixed step along the quasi-Newton direction (:mod:`psd_core.baselines`).

    The inverse-Hessian estimate lives in the accumulation dtype (float32 for 16-bit
    ``x0``); each step is rounded to ``x``'s dtype."""
    lr = check_nonnegative("lr", lr)
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    xp = run.xp
    d = int(x0.shape[0])
    Hinv = xp.eye(d, dtype=B._work_dtype(xp, x0.dtype), device=_dev(x0))
    x = x0
    g = run.grad(x)
    while True:
        g2 = _sq(g)
        run.record(x, g2)
        if run.at_sosp(x, g2):
            return run.result(x, 0, True)
        if not run.budget_left():
            return run.result(x, 0, False)
        x_new = xp.astype(xp.astype(x, Hinv.dtype) + lr * B.bfgs_direction(Hinv, g), x.dtype)
        g_new = run.grad(x_new)
        Hinv = B.bfgs_inverse_update(Hinv, x_new - x, g_new - g)
        x, g = x_new, g_new


# --------------------------------------------------------------------------------------
# The PSD family
# --------------------------------------------------------------------------------------


def _psd_loop(
    run: _Run,
    x: Array,
    cfg: Any,
    draws: HostDraws,
    curvature_test: Callable[[Array, Array], bool | None] | None,
    grad_fn: Callable[[Array], Array],
) -> SolverResult:
    """Drive the core PSD state machine. ``curvature_test(x, g)`` returns True (saddle:
    perturb), False (second-order stationary: stop) or None (no test).

    Stops, as SPEC's loop and the reference ``psd/algorithms.py`` do, when the gate would
    open (small gradient, no episode running, ``t_thres`` passed) but all
    ``max_episodes`` episodes are used: after the curvature test (if any) says the point
    is still a saddle, it returns ``x`` with ``converged=False`` (budget spent, no
    second-order certificate).
    """
    xp = run.xp
    state = psd_init(x, cfg)
    dim = tree_size([x])
    one = xp.ones((), dtype=state.grad_sq_ema.dtype, device=_dev(x))
    while run.budget_left():
        g = grad_fn(x)
        g2 = _sq(g)
        run.record(x, g2, episodes=float(state.episodes))
        if run.at_sosp(x, g2):
            return run.result(x, int(state.episodes), True)
        gate = psd_gate(g2, state, cfg)
        episodes = int(state.episodes)
        if not bool(gate.open) and episodes >= cfg.max_episodes:
            # Would the gate open but for the spent budget? (the same gate, budget lifted)
            lifted = psd_gate(g2, state, cfg._replace(max_episodes=episodes + 1))
            if bool(lifted.open):
                if curvature_test is not None and curvature_test(x, g) is False:
                    return run.result(x, episodes, True)
                return run.result(x, episodes, False)
        saddle = None
        z = None
        zsq, u = one, one
        if bool(gate.open):
            if curvature_test is not None:
                verdict = curvature_test(x, g)
                if verdict is False:
                    return run.result(x, int(state.episodes), True)
                saddle = xp.asarray(True)
            z = draws.normals_like([x])
            u = draws.uniform_like(x)
            zsq = tree_sq_norm(z)
        coeffs, state = psd_coefficients(
            g2, state, cfg, dim=dim, noise_sq_norm=zsq, uniform=u, saddle=saddle
        )
        x = x + psd_updates(coeffs, [g], z)[0]
    return run.result(x, int(state.episodes), False)


def pgd(
    problem: Any,
    x0: Array,
    *,
    lr: float,
    g_thres: float,
    t_thres: int,
    radius: float,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Perturbed gradient descent (Jin et al., 2017): when :math:`\|g\| \le g_{thres}` and more
    than ``t_thres`` steps passed since the last perturbation, add :math:`\xi\sim U(B(0,r))`.

    Built on the core PSD state machine with ``episode_length=0``. This is PGD's
    perturbation rule only (it never stops before the budget or the ``sosp`` oracle);
    :func:`pgd_jin` adds Jin et al.'s :math:`f_{thres}` termination.
    """
    cfg = psd_config(lr, g_thres, radius, 0, t_thres=t_thres)
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    return _psd_loop(run, x0, cfg, HostDraws(seed), None, run.grad)


class JinConstants(NamedTuple):
    """Hyperparameters of PGD from Jin et al. (2017), Algorithm 2 (see :func:`jin_pgd_constants`)."""

    chi: float
    lr: float
    radius: float
    g_thres: float
    f_thres: float
    t_thres: int


def jin_pgd_constants(
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    *,
    dim: int,
    c: float = 1.0,
) -> JinConstants:
    r"""The constants of Jin et al. (2017), "How to escape saddle points efficiently", Algorithm 2:
    :math:`\chi = 3\max\{\log(d\ell\Delta_f/(c\epsilon^2\delta)), 4\}`, :math:`\eta = c/\ell`,
    :math:`r = \sqrt c\,\epsilon/(\chi^2\ell)`, :math:`g_{thres} = \sqrt c\,\epsilon/\chi^2`,
    :math:`f_{thres} = (c/\chi^3)\sqrt{\epsilon^3/\rho}`,
    :math:`t_{thres} = \lceil(\chi/c^2)\,\ell/\sqrt{\rho\epsilon}\rceil`.

    ``c`` is the paper's absolute constant (its analysis needs :math:`c \le c_{\max}`, unspecified).
    """
    epsilon = check_positive("epsilon", epsilon)
    ell = check_positive("ell", ell)
    rho = check_positive("rho", rho)
    delta_f = check_positive("delta_f", delta_f)
    c = check_positive("c", c)
    dim = check_int("dim", dim, minimum=1)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    chi = 3.0 * max(math.log(dim * ell * delta_f / (c * epsilon**2 * delta)), 4.0)
    return JinConstants(
        chi=chi,
        lr=c / ell,
        radius=math.sqrt(c) * epsilon / (chi**2 * ell),
        g_thres=math.sqrt(c) * epsilon / chi**2,
        f_thres=(c / chi**3) * math.sqrt(epsilon**3 / rho),
        t_thres=int(math.ceil((chi / c**2) * ell / math.sqrt(rho * epsilon))),
    )


def pgd_jin(
    problem: Any,
    x0: Array,
    *,
    lr: float,
    g_thres: float,
    t_thres: int,
    f_thres: float,
    radius: float,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    r"""PGD exactly as Jin et al. (2017), Algorithm 2, including its termination rule.

    Gradient descent :math:`x_{t+1} = x_t - \eta\nabla f(x_t)`. When
    :math:`\|\nabla f(x_t)\| \le g_{thres}` and :math:`t - t_{noise} > t_{thres}`:
    remember :math:`\tilde x = x_t`, set :math:`t_{noise} = t` and add
    :math:`\xi\sim U(B(0, r))`. When :math:`t - t_{noise} = t_{thres}` and
    :math:`f(x_t) - f(\tilde x) > -f_{thres}` (the last perturbation did not decrease
    :math:`f` by :math:`f_{thres}`), return :math:`\tilde x` (``converged=True``).

    Unlike :func:`psd` there is no curvature test: PGD certifies a second-order point
    by a perturbation that fails to decrease :math:`f`, so it always pays one more
    perturbation and :math:`t_{thres}` steps at the point it returns. The gate and the
    uniform-ball draw are the core PSD state machine's (``episode_length=0``). Each
    iteration costs one gradient evaluation; the function values used by the termination
    test (one at each perturbation and one :math:`t_{thres}` steps later) are not counted.
    See :func:`jin_pgd_constants` for the paper's constants.
    """
    f_thres = check_nonnegative("f_thres", f_thres)
    cfg = psd_config(lr, g_thres, radius, 0, t_thres=t_thres)
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    xp = run.xp
    draws = HostDraws(seed)
    state = psd_init(x0, cfg)
    dim = tree_size([x0])
    one = xp.ones((), dtype=state.grad_sq_ema.dtype, device=_dev(x0))
    x = x0
    x_tilde, f_tilde, since = None, 0.0, -1
    while run.budget_left():
        g = run.grad(x)
        g2 = _sq(g)
        run.record(x, g2, episodes=float(state.episodes))
        if run.at_sosp(x, g2):
            return run.result(x, int(state.episodes), True)
        if x_tilde is not None and since == cfg.t_thres:
            if float(problem.value(x)) - f_tilde > -f_thres:
                return run.result(x_tilde, int(state.episodes), True)
        gate = psd_gate(g2, state, cfg)
        z, zsq, u = None, one, one
        if bool(gate.open):
            x_tilde, f_tilde, since = x, float(problem.value(x)), 0
            z = draws.normals_like([x])
            u = draws.uniform_like(x)
            zsq = tree_sq_norm(z)
        coeffs, state = psd_coefficients(g2, state, cfg, dim=dim, noise_sq_norm=zsq, uniform=u)
        x = x + psd_updates(coeffs, [g], z)[0]
        if since >= 0:
            since += 1
    return run.result(x, int(state.episodes), False)


def psd(
    problem: Any,
    x0: Array,
    *,
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    curvature: str = "exact",
    lanczos_iters: int | None = None,
    step_size_rule: str = "half",
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    r"""PSD (Algorithm 1 of the paper) with the explicit constants of :func:`psd_core.psd_constants`.

    Descent while :math:`\|g\| > \epsilon`; at a small gradient, the curvature test
    :math:`\lambda_{\min} \ge -\gamma` either returns :math:`x` or triggers a uniform-ball
    perturbation followed by :math:`T` gradient steps (at most :math:`M` episodes).

    Args:
        curvature: ``"exact"`` (dense Hessian ``eigvalsh``, counted in ``hvps``; small d),
            ``"lanczos"`` (:func:`~psd_core.curvature.min_curvature` on ``problem.hvp``,
            exact HVPs counted in ``hvps``) or ``"lanczos-fd"`` (Lanczos on gradient
            differences with :math:`h = 10^{-4}`... each HVP counted as 2 gradient evaluations).
        lanczos_iters: Lanczos steps (default ``min(d, 30)``).
    """
    check_choice("curvature", curvature, ("exact", "lanczos", "lanczos-fd"))
    dim = int(x0.shape[0])
    c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim, step_size_rule=step_size_rule)
    cfg = psd_config(c.step_size, epsilon, c.radius, c.episode_length, max_episodes=c.max_episodes)
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    iters = (
        min(dim, 30)
        if lanczos_iters is None
        else check_int("lanczos_iters", lanczos_iters, minimum=1)
    )
    seeds = HostDraws(None if seed is None else seed + 7919)

    def test(x: Array, g: Array) -> bool:
        if curvature == "exact":
            lam = run.lambda_min(x)
            return lam < -c.gamma
        if curvature == "lanczos":
            res = min_curvature(problem.hvp, x, iters=iters, seed=int(seeds.rng.integers(2**31)))
            run.hvps += res.hvps
        else:
            hvp = hvp_from_grad(lambda y: run.grad(y, cost=1), 1e-4)
            res = min_curvature(hvp, x, iters=iters, seed=int(seeds.rng.integers(2**31)))
        return bool(is_strict_saddle(res.value, c.gamma))

    return _psd_loop(run, x0, cfg, HostDraws(seed), test, run.grad)


def psd_probe(
    problem: Any,
    x0: Array,
    *,
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    probe: str = "random",
    central: bool = True,
    lanczos_iters: int | None = None,
    seed: int = 0,
    max_grad_evals: int = 50_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    r"""PSD-Probe: at a small gradient, look for negative curvature and step along it.

    ``probe="random"`` is the paper's test, computed for real: :math:`m` random unit
    probes, :math:`q(v)` by gradient differences with :math:`h = \sqrt{\epsilon/\rho}`
    (central: 2 gradients per probe; forward: 1). ``probe="hvp"`` finds the
    minimum-curvature direction with Lanczos on gradient-difference HVPs
    (``lanczos_iters`` HVPs of 2 gradients each). If the curvature found is
    :math:`\le -\gamma`, step :math:`x \leftarrow x + \alpha s v` with :math:`\alpha = r`
    and :math:`\langle g, s v\rangle \le 0`; otherwise return :math:`x`.
    """
    check_choice("probe", probe, ("random", "hvp"))
    dim = int(x0.shape[0])
    c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim)
    pc = probe_constants(epsilon, rho, delta, dim=dim)
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    draws = HostDraws(seed)
    iters = (
        min(dim, 30)
        if lanczos_iters is None
        else check_int("lanczos_iters", lanczos_iters, minimum=1)
    )
    cfg = psd_config(c.step_size, epsilon, 0.0, 0)
    state = psd_init(x0, cfg)
    x = x0
    steps = 0
    while run.budget_left():
        g = run.grad(x)
        g2 = _sq(g)
        run.record(x, g2, episodes=float(steps))
        if run.at_sosp(x, g2):
            return run.result(x, steps, True)
        gate = psd_gate(g2, state, cfg)
        if bool(gate.open):
            if probe == "random":
                probes = [draws.unit_vector_like([x])[0] for _ in range(pc.num_probes)]

                def q(v: Array, x: Array = x, g: Array = g) -> Array:
                    return rayleigh_grad_diff(
                        lambda y: run.grad(y), x, v, pc.fd_step, central=central, grad_x=g
                    )

                found = random_probe_test(q, probes)
                lam, v = found.min_curvature, found.direction
            else:
                hvp = hvp_from_grad(lambda y: run.grad(y), pc.fd_step)
                res = min_curvature(hvp, x, iters=iters, seed=int(draws.rng.integers(2**31)))
                lam, v = res.value, res.direction
            if not bool(lam <= -pc.gamma):
                return run.result(x, steps, True)
            x = x + negative_curvature_step(g, v, pc.step)
            steps += 1
            continue
        coeffs, state = psd_coefficients(g2, state, cfg, dim=dim, noise_sq_norm=g2, uniform=g2)
        x = x + psd_updates(coeffs, [g], None)[0]
    return run.result(x, steps, False)


def psgd(
    problem: Any,
    x0: Array,
    *,
    epsilon: float,
    ell: float,
    rho: float,
    sigma: float,
    delta_fp: float = 0.1,
    delta: float = 0.1,
    delta_f: float = 1.0,
    gate: str = "threshold",
    ema_beta: float = 0.1,
    seed: int = 0,
    max_grad_evals: int = 200_000,
    sosp: tuple[float, float] | None = None,
    record_every: int = 1,
) -> SolverResult:
    r"""Perturbed stochastic gradient descent.

    Stochastic gradients are simulated as :math:`\nabla f(x) + \zeta`,
    :math:`\zeta\sim N(0, \sigma^2/(B d)\, I)` (total variance :math:`\sigma^2/B`, the
    quantity the gate threshold is calibrated for) with the batch size
    :math:`B = \max(1, \lceil (2\sigma^2/\epsilon^2)\log(2/\delta_{fp})\rceil)`, each
    costing ``B`` gradient evaluations. The gate is :math:`\|g\| \le
    \epsilon\sqrt{1 + 2\sigma^2/(B\epsilon^2)}` (``gate="threshold"``) or the EMA gate
    :math:`\sqrt{v_t} \le` the same threshold (``gate="ema"``); then perturb and run
    :math:`T` noisy steps; at most :math:`M` episodes.
    """
    check_choice("gate", gate, ("threshold", "ema"))
    sigma = check_nonnegative("sigma", sigma)
    dim = int(x0.shape[0])
    c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim)
    bsz = psgd_batch_size(sigma**2, epsilon, delta_fp)
    thr = psgd_gate_threshold(epsilon, sigma**2, bsz)
    cfg = psd_config(
        c.step_size,
        thr,
        c.radius,
        c.episode_length,
        max_episodes=c.max_episodes,
        gate="grad_norm" if gate == "threshold" else "ema",
        ema_beta=ema_beta,
    )
    run = _Run(problem, x0, max_grad_evals, sosp, record_every)
    draws = HostDraws(seed)
    noise_draws = HostDraws(None if seed is None else seed + 104729)
    scale = sigma / math.sqrt(bsz * dim)

    def stochastic_grad(x: Array) -> Array:
        g = run.grad(x, cost=bsz)
        return g + scale * noise_draws.normals_like([x])[0]

    return _psd_loop(run, x0, cfg, draws, None, stochastic_grad)


# --------------------------------------------------------------------------------------
# SAM family
# --------------------------------------------------------------------------------------


def _batch_oracles(problem: Any, batch_size: int | None, rng: Any, xp: Any, x0: Array):
    """Value/gradient callables for the full batch or a fresh mini-batch per step."""
    if batch_size is None:
        return lambda: (problem.value, problem.grad), 1
    n = int(problem.n)
    bsz = check_int("batch_size", batch_size, minimum=1)

    def pick():
        idx = rng.choice(n, size=bsz, replace=False)
        return (lambda x: problem.value_batch(x, idx)), (lambda x: problem.grad_batch(x, idx))

    return pick, bsz / n


def sam_sps(
    problem: Any,
    x0: Array,
    *,
    rho: float = 0.1,
    lambd: float = 1.0,
    f_star: float = 0.0,
    gamma_b: float = 1.0,
    weight_decay: float = 0.0,
    variant: str = "sps+",
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
) -> SolverResult:
    """SAM-SPS / USAM-SPS (:func:`psd_core.sam_sps`) for ``steps`` iterations.

    Full batch when ``batch_size`` is None, else a fresh mini-batch (without
    replacement within the batch) per step via ``problem.value_batch``/``grad_batch``.
    ``history['step_size']`` records the Polyak step. Each step costs two gradient
    evaluations (counted as ``2 * batch_size / n`` full-gradient equivalents... as 2 per
    step in ``grad_evals``).
    """
    steps = check_int("steps", steps, minimum=0)
    tx = sam_sps_transform(rho, lambd, f_star, gamma_b, weight_decay, variant=variant)
    run = _Run(problem, x0, max(2 * steps, 1), None, record_every)
    import numpy as np

    rng = np.random.default_rng(seed)
    pick, _ = _batch_oracles(problem, batch_size, rng, run.xp, x0)
    x = x0
    state = tx.init([x])
    for _ in range(steps):
        value_fn, grad_fn = pick()
        g = grad_fn(x)
        run.evals += 1
        loss = value_fn(x)

        def vg(e: list[Array], value_fn=value_fn, grad_fn=grad_fn) -> tuple[Array, list[Array]]:
            run.evals += 1
            return value_fn(e[0]), [grad_fn(e[0])]

        run.record(x, _sq(g), step_size=float(state.step_size))
        upd, state = tx.update([g], state, [x], value_and_grad_fn=vg, value=loss)
        x = x + upd[0]
    run.record(x, _sq(problem.grad(x)), step_size=float(state.step_size))
    return run.result(x, 0, True)


def andriushchenko_flammarion_schedule(
    mu: float, L_max: float
) -> Callable[[int], tuple[float, float]]:
    r"""Decreasing USAM schedule of Andriushchenko & Flammarion (2022):
    :math:`\gamma_t = \min\{(8t+4)/(3\mu(t+1)^2),\ 1/(2L_{\max})\}`, :math:`\rho_t = \sqrt{\gamma_t/L_{\max}}`."""
    mu = check_positive("mu", mu)
    L_max = check_positive("L_max", L_max)

    def schedule(t: int) -> tuple[float, float]:
        gamma = min((8 * t + 4) / (3 * mu * (t + 1) ** 2), 1.0 / (2 * L_max))
        return gamma, math.sqrt(gamma / L_max)

    return schedule


def sam(
    problem: Any,
    x0: Array,
    *,
    lr: float | None = None,
    rho: float | None = None,
    lambd: float = 0.0,
    schedule: Callable[[int], tuple[float, float]] | None = None,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
) -> SolverResult:
    r"""SAM / USAM with a constant (``lr``, ``rho``) or scheduled (``schedule(t) -> (lr, rho)``) step:
    :math:`x^+ = x - \gamma_t \nabla f(x + c_t g)` with :math:`c_t` from
    :func:`psd_core.polyak.sam_perturbation_scale`."""
    if schedule is None:
        if lr is None or rho is None:
            raise ValueError("sam: give lr and rho, or a schedule")
        lr_c = check_nonnegative("lr", lr)
        rho_c = check_nonnegative("rho", rho)

        def schedule(t: int) -> tuple[float, float]:
            return lr_c, rho_c

    steps = check_int("steps", steps, minimum=0)
    run = _Run(problem, x0, max(2 * steps, 1), None, record_every)
    import numpy as np

    rng = np.random.default_rng(seed)
    pick, _ = _batch_oracles(problem, batch_size, rng, run.xp, x0)
    x = x0
    for t in range(steps):
        lr_t, rho_t = schedule(t)
        _, grad_fn = pick()
        g = grad_fn(x)
        g2 = _sq(g)
        run.record(x, g2, step_size=lr_t)
        c = sam_perturbation_scale(g2, rho_t, lambd)
        ge = grad_fn(B.gd_step(x, g, -c))
        run.evals += 2
        x = B.gd_step(x, ge, lr_t)
    run.record(x, _sq(problem.grad(x)), step_size=float("nan"))
    return run.result(x, 0, True)


# --------------------------------------------------------------------------------------
# Section 4.1 of the SAM-SPS paper: the theory step sizes and the adaptive baselines
# --------------------------------------------------------------------------------------


def andriushchenko_flammarion_deterministic_schedule(
    L: float,
) -> Callable[[int], tuple[float, float]]:
    r"""Constant USAM step of Andriushchenko & Flammarion (2022) for the deterministic
    (full-batch) case: :math:`\gamma = \rho = 1/(2L)`.

    The step and radius the SAM-SPS authors use for this baseline in their deterministic
    ridge experiment (``numpy_exps/exps.ipynb``). Use with :func:`sam` (``lambd=0``).

    References:
        Andriushchenko & Flammarion, *Towards Understanding Sharpness-Aware
        Minimization*, ICML 2022.
    """
    L = check_positive("L", L)
    step = 1.0 / (2.0 * L)
    return lambda t: (step, step)


def khanh_schedule(L: float, rho: float | None = None) -> Callable[[int], tuple[float, float]]:
    r"""Constant USAM step of Khanh et al. (2024): :math:`\gamma = 2/(9L)`, :math:`\rho = 1/(2L)`
    (``rho`` overrides the radius; the step does not depend on it).

    As the SAM-SPS authors instantiate this baseline in their deterministic ridge
    experiment. Use with :func:`sam` (``lambd=0``).

    References:
        Khanh, Luong, Mordukhovich & Tran, *Fundamental Convergence Analysis of
        Sharpness-Aware Minimization*, NeurIPS 2024.
    """
    L = check_positive("L", L)
    rho_ = 1.0 / (2.0 * L) if rho is None else check_nonnegative("rho", rho)
    step = 2.0 / (9.0 * L)
    return lambda t: (step, rho_)


def oikonomou_schedule(L: float, rho: float | None = None) -> Callable[[int], tuple[float, float]]:
    r"""Constant USAM step of Oikonomou & Loizou (2025), deterministic case:
    :math:`\rho = 1/(6L)` (default) and
    :math:`\gamma = (1 - 3L\rho) / \big(2L(2L^2\rho^2 + 1)\big)`, which requires
    :math:`\rho < 1/(3L)`.

    References:
        Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and Improved
        Rates*, ICLR 2025 (as instantiated in the SAM-SPS authors' ridge experiment).
    """
    L = check_positive("L", L)
    rho_ = 1.0 / (6.0 * L) if rho is None else check_nonnegative("rho", rho)
    if not rho_ < 1.0 / (3.0 * L):
        raise ValueError(f"Invalid rho: {rho!r} (must be < 1/(3L) = {1.0 / (3.0 * L)!r})")
    step = (1.0 - 3.0 * L * rho_) / (2.0 * L * (2.0 * L**2 * rho_**2 + 1.0))
    return lambda t: (step, rho_)


def oikonomou_stochastic_schedule(
    mu: float, L_max: float, rho: float | None = None
) -> Callable[[int], tuple[float, float]]:
    r"""Constant USAM step of Oikonomou & Loizou (2025), stochastic case:
    :math:`\rho = \mu / \big(2L_{\max}(\mu + 2L_{\max})\big)` (default) and
    :math:`\gamma = \big(\mu - L_{\max}\rho(\mu + 2L_{\max})\big) /
    \big(2L_{\max}^2(2L_{\max}^2\rho^2 + 1)\big)`, which requires
    :math:`\rho < \mu/(L_{\max}(\mu + 2L_{\max}))`.

    References:
        Oikonomou & Loizou, *Sharpness-Aware Minimization: General Analysis and Improved
        Rates*, ICLR 2025 (as instantiated in the SAM-SPS authors' ridge experiment).
    """
    mu = check_positive("mu", mu)
    L_max = check_positive("L_max", L_max)
    rho_ = mu / (2.0 * L_max * (mu + 2.0 * L_max)) if rho is None else check_nonnegative("rho", rho)
    bound = mu / (L_max * (mu + 2.0 * L_max))
    if not rho_ < bound:
        raise ValueError(f"Invalid rho: {rho!r} (must be < mu/(L_max (mu + 2 L_max)) = {bound!r})")
    step = (mu - L_max * rho_ * (mu + 2.0 * L_max)) / (
        2.0 * L_max**2 * (2.0 * L_max**2 * rho_**2 + 1.0)
    )
    return lambda t: (step, rho_)


def _two_pass_loop(
    problem: Any,
    x0: Array,
    steps: int,
    batch_size: int | None,
    seed: int,
    record_every: int,
    init: Callable[[Array], Any],
    step: Callable[..., tuple[Array, Any, float]],
) -> SolverResult:
    """Shared driver of the adaptive SAM baselines: a fresh mini-batch per step (the same
    draws as :func:`sam_sps` and :func:`sam` for the same seed), then
    ``x, state, lr = step(t, x, g, grad, state)`` where ``grad(y)`` is the counted
    gradient on this step's batch. ``history['step_size']`` records ``lr``."""
    steps = check_int("steps", steps, minimum=0)
    run = _Run(problem, x0, max(3 * steps, 1), None, record_every)
    rng = HostDraws(seed).rng
    pick, _ = _batch_oracles(problem, batch_size, rng, run.xp, x0)
    x, state = x0, init(x0)
    for t in range(steps):
        _, grad_fn = pick()

        def grad(y: Array, grad_fn: Callable[[Array], Array] = grad_fn) -> Array:
            run.evals += 1
            return grad_fn(y)

        g = grad(x)
        x_new, state, lr_t = step(t, x, g, grad, state)
        run.record(x, _sq(g), step_size=float(lr_t))
        x = x_new
    run.record(x, _sq(problem.grad(x)), step_size=float("nan"))
    return run.result(x, 0, True)


def adasam(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1e-2,
    rho: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
) -> SolverResult:
    r"""AdaSAM (Sun et al., 2024) for ``steps`` iterations, two gradients per step.

    :math:`e_t = x_t + \rho s_t/\|s_t\|`, :math:`g_t = \nabla f_{S_t}(e_t)`,
    :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)g_t`, :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)g_t^2`,
    :math:`\hat v_t = \max(\hat v_{t-1}, v_t)`,
    :math:`x_{t+1} = x_t - \gamma\, m_t/\sqrt{\hat v_t}` (:math:`\gamma` = ``lr``;
    :math:`v_0 = \hat v_0 = \epsilon^2`). See :mod:`psd_core.sam_baselines`.
    Mini-batches as in :func:`sam_sps`. ``history['step_size']`` records ``lr``.
    """
    lr = check_positive("lr", lr)
    rho = check_nonnegative("rho", rho)
    b1, b2 = check_beta("b1", b1), check_beta("b2", b2)
    eps = check_positive("eps", eps)

    def step(t: int, x: Array, s: Array, grad: Any, st: Any) -> tuple[Array, Any, float]:
        g = grad(x + SB.normalized_offset(s, rho))
        upd, st = SB.adasam_update(g, st, lr, b1, b2)
        return x + upd, st, lr

    return _two_pass_loop(
        problem,
        x0,
        steps,
        batch_size,
        seed,
        record_every,
        lambda x: SB.adasam_init(x, eps),
        step,
    )


def lightsam(
    problem: Any,
    x0: Array,
    *,
    lr: float = 1.0,
    rho: float = 0.1,
    variant: str = "I",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
) -> SolverResult:
    r"""LightSAM for ``steps`` iterations, two gradients per step: ``variant="I"``
    (AdaGrad-Norm), ``"II"`` (AdaGrad) or ``"III"`` (Adam).

    I: :math:`u_t = u_{t-1} + \|s_t\|^2`, :math:`w_t = x_t + \rho s_t/\sqrt{u_t}`,
    :math:`v_t = v_{t-1} + \|g_t\|^2`, :math:`x_{t+1} = x_t - \eta g_t/\sqrt{v_t}`;
    II: the same coordinatewise; III: :math:`w_t = x_t + \rho r_t/\sqrt{u_t}`,
    :math:`x_{t+1} = x_t - \eta m_t/\sqrt{v_t}` with Adam moments (no bias correction)
    of :math:`s_t` (:math:`r, u`) and :math:`g_t = \nabla f_{S_t}(w_t)` (:math:`m, v`).
    :math:`\eta` = ``lr``. See :mod:`psd_core.sam_baselines`.
    """
    variant = check_choice("variant", variant, SB.LIGHTSAM_VARIANTS)
    lr = check_positive("lr", lr)
    rho = check_nonnegative("rho", rho)
    b1, b2 = check_beta("b1", b1), check_beta("b2", b2)
    eps = check_positive("eps", eps)

    def step(t: int, x: Array, s: Array, grad: Any, st: Any) -> tuple[Array, Any, float]:
        offset, st = SB.lightsam_perturbation(s, st, rho, variant, b1, b2)
        g = grad(x + offset)
        upd, st = SB.lightsam_update(g, st, lr, variant, b1, b2)
        return x + upd, st, lr

    return _two_pass_loop(
        problem,
        x0,
        steps,
        batch_size,
        seed,
        record_every,
        lambda x: SB.lightsam_init(x, variant, eps),
        step,
    )


def sa_sam(
    problem: Any,
    x0: Array,
    *,
    lr0: float = 0.1,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    record_every: int = 1,
) -> SolverResult:
    r"""SA-SAM (smoothness-adaptive SAM) for ``steps`` iterations.

    :math:`\eta_t = \min\{\|x_t - x_{t-1}\| / (2\|\nabla f_{S_t}(x_t) - \nabla f_{S_t}(x_{t-1})\|),\
    \sqrt{1+\theta_{t-1}}\eta_{t-1}\}`, :math:`\theta_t = \eta_t/\eta_{t-1}`,
    :math:`\rho_t = \sqrt{\eta_t}`,
    :math:`x_{t+1} = x_t - \eta_t \nabla f_{S_t}(x_t + \rho_t s_t/\|s_t\|)`, from
    :math:`\eta_0` = ``lr0`` and :math:`\theta_0 = +\infty`
    (:func:`psd_core.sam_baselines.sa_sam_step_size`).

    Cost: the first step 2 gradients; later steps 3 with mini-batches (the previous
    iterate's gradient on the new batch), 2 in full batch (that gradient is the
    previous step's ``s``, reused). ``history['step_size']`` records :math:`\eta_t`.
    """
    lr0 = check_positive("lr0", lr0)
    full_batch = batch_size is None

    def init(x: Array) -> dict[str, Any]:
        return {"x_prev": None, "s_prev": None, "eta": lr0, "theta": math.inf}

    def step(t: int, x: Array, s: Array, grad: Any, st: dict) -> tuple[Array, Any, float]:
        if st["x_prev"] is None:
            eta, theta = as_scalar(lr0, s), math.inf
        else:
            g_prev = st["s_prev"] if full_batch else grad(st["x_prev"])
            eta, theta = SB.sa_sam_step_size(x, st["x_prev"], s, g_prev, st["eta"], st["theta"])
        rho = SB.sa_sam_radius(eta, s)
        g = grad(x + SB.normalized_offset(s, rho))
        x_new = B.gd_step(x, g, eta)
        return x_new, {"x_prev": x, "s_prev": s, "eta": eta, "theta": theta}, float(eta)

    return _two_pass_loop(problem, x0, steps, batch_size, seed, record_every, init, step)


def _dev(a: Array) -> Any:
    from array_api_compat import device

    return device(a)
