r"""PSD perturbation: the gradient-norm gate, uniform-ball perturbations and escape episodes.

The logic is split in two layers so that every adapter can reuse it:

* **Scalar layer** — :func:`psd_gate` and :func:`psd_coefficients` (and
  :func:`perturbed_adam_coefficients`) take 0-d arrays (squared norms, draws, the
  state) and return 0-d coefficients plus the new state. All of it is
  ``xp.where`` arithmetic, so it traces under ``jax.jit``/``tf.function`` and never
  reads a value on the host. It is also shape-polymorphic: give it norms and
  states of shape ``(n,)`` and it runs ``n`` independent problems at once.
* **Vector layer** — :func:`psd` and :func:`perturbed_adam` are optax-shaped
  transformations over trees that compute the norms, call the scalar layer and
  apply the update as a linear combination of a few vectors
  (``updates = a * grads + b * normals``). Adapters may apply the same
  coefficients with in-place fused ops instead.

The PSD update for one call with gradient :math:`g` at :math:`x` is

.. math::
    x^+ = x + a\,g + b\,z,\qquad
    a = \begin{cases}0 & \text{perturb and not step\_on\_perturb}\\ -\eta & \text{otherwise}\end{cases},
    \qquad b = \begin{cases} r\,u^{1/d}/\|z\| & \text{perturb (ball)}\\ r & \text{perturb (gaussian)}\\ 0 & \text{otherwise}\end{cases}

where *perturb* holds when no escape episode is running, the gate statistic
(:math:`\|g\|` or the EMA :math:`\sqrt{v_t}`, :math:`v_t=(1-\beta)v_{t-1}+\beta\|g_t\|^2`)
is at most :math:`\epsilon`, more than ``t_thres`` steps passed since the last
perturbation, fewer than ``max_episodes`` episodes were used, and (if given) the
caller's curvature test says the point is a saddle. A perturbation starts an
episode of ``episode_length`` plain gradient steps during which the gate is not
consulted.

Non-finite policy: if :math:`\|g\|^2` is not finite (a NaN or inf gradient, or a
float overflow of the norm), the step is skipped: the updates are exactly zero,
the state is unchanged except ``skipped`` which counts such steps.

References:
    Alpay & Alakkad, *Perturbed Saddle-escape Descent*, 2025, arXiv:2508.16540.
    Jin et al., *How to Escape Saddle Points Efficiently*, ICML 2017 (PGD gate).
    psd-optimizer 0.1.2 (``PSDTorch``, ``PerturbedAdam``): the practical gates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._array import (
    Array,
    Tree,
    as_scalar,
    coefficient_for,
    namespace,
    tree_acc_dtype,
    tree_select,
    tree_size,
    tree_sq_norm,
)
from .random import ball_scale
from .theory import psd_constants
from .transform import Transformation
from .validation import (
    check_beta,
    check_choice,
    check_int,
    check_nonnegative,
    check_open_unit,
    check_positive,
    check_same_shapes,
    check_tree,
)

__all__ = [
    "AdamCoefficients",
    "PSDCoefficients",
    "PSDConfig",
    "PSDState",
    "PerturbedAdamConfig",
    "PerturbedAdamState",
    "adam_bias_corrections",
    "adam_direction",
    "adam_moments",
    "perturbed_adam",
    "perturbed_adam_coefficients",
    "perturbed_adam_config",
    "perturbed_adam_init",
    "psd",
    "psd_coefficients",
    "psd_config",
    "psd_from_theory",
    "psd_gate",
    "psd_init",
    "psd_updates",
]

_INT_MAX_EPISODES = 2**31 - 1
_GATES = ("grad_norm", "ema")
_NOISES = ("ball", "gaussian")


def _lr_checked(learning_rate: Any) -> Any:
    if callable(learning_rate):
        return learning_rate
    return check_nonnegative("learning_rate", learning_rate)


# --------------------------------------------------------------------------------------
# PSD
# --------------------------------------------------------------------------------------


class PSDConfig(NamedTuple):
    """Validated, static hyperparameters of the PSD state machine (see :func:`psd_config`)."""

    learning_rate: Any
    epsilon: float
    radius: float
    episode_length: int
    t_thres: int
    max_episodes: int
    gate: str
    ema_beta: float
    noise: str
    step_on_perturb: bool


def psd_config(
    learning_rate: Any,
    epsilon: float,
    radius: float,
    episode_length: int = 0,
    *,
    t_thres: int = 0,
    max_episodes: int | None = None,
    gate: str = "grad_norm",
    ema_beta: float = 0.1,
    noise: str = "ball",
    step_on_perturb: bool = False,
) -> PSDConfig:
    """Validate PSD hyperparameters once (every adapter calls this).

    Args:
        learning_rate: step size :math:`\\eta \\ge 0`, or a schedule ``count -> lr``.
        epsilon: gate threshold on the gradient norm (the paper's :math:`\\epsilon`,
            ``g_thres`` of PGD/``PSDTorch``), ``>= 0``.
        radius: perturbation radius :math:`r \\ge 0` (ball radius, or the standard
            deviation per coordinate for ``noise="gaussian"``).
        episode_length: plain gradient steps after a perturbation before the gate is
            consulted again (the paper's :math:`T`), ``>= 0``.
        t_thres: a perturbation needs more than ``t_thres`` steps since the last one
            (PGD / ``PSDTorch``), ``>= 0``.
        max_episodes: episode budget :math:`M` (``None`` = unlimited), ``>= 0``.
        gate: ``"grad_norm"`` (gate on :math:`\\|g_t\\|`) or ``"ema"`` (gate on
            :math:`\\sqrt{v_t}`, the PSGD companion note).
        ema_beta: :math:`\\beta \\in (0, 1)` of the EMA gate.
        noise: ``"ball"`` (uniform in :math:`B_d(0,r)`, the paper) or ``"gaussian"``
            (:math:`N(0, r^2 I)`, ``PSDTorch``).
        step_on_perturb: also take the gradient step on the call that perturbs
            (``PSDTorch``); the paper only perturbs on that call.
    """
    return PSDConfig(
        learning_rate=_lr_checked(learning_rate),
        epsilon=check_nonnegative("epsilon", epsilon),
        radius=check_nonnegative("radius", radius),
        episode_length=check_int("episode_length", episode_length, minimum=0),
        t_thres=check_int("t_thres", t_thres, minimum=0),
        max_episodes=(
            _INT_MAX_EPISODES
            if max_episodes is None
            else check_int("max_episodes", max_episodes, minimum=0)
        ),
        gate=check_choice("gate", gate, _GATES),
        ema_beta=check_open_unit("ema_beta", ema_beta),
        noise=check_choice("noise", noise, _NOISES),
        step_on_perturb=bool(step_on_perturb),
    )


class PSDState(NamedTuple):
    """State of the PSD state machine: 0-d arrays (or shape ``(n,)`` when batched)."""

    count: Array
    """Completed (finite) steps."""
    since_perturb: Array
    """Steps since the last perturbation, saturating at ``t_thres + 1``."""
    episode_left: Array
    """Plain steps left in the running escape episode (0 = gate active)."""
    episodes: Array
    """Perturbations (escape episodes) started so far."""
    grad_sq_ema: Array
    """EMA :math:`v_t` of :math:`\\|g_t\\|^2` (used by ``gate="ema"``)."""
    skipped: Array
    """Steps skipped by the non-finite policy."""
    perturbed: Array
    """Whether the last step perturbed (bool)."""


def psd_init(
    like: Array, config: PSDConfig, *, acc_dtype: Any = None, batch_shape: tuple[int, ...] = ()
) -> PSDState:
    """Initial :class:`PSDState` on ``like``'s device.

    Args:
        like: any array of the target namespace/device (e.g. the first parameter).
        config: from :func:`psd_config`.
        acc_dtype: float dtype of the EMA (defaults to ``like``'s accumulation dtype).
        batch_shape: ``(n,)`` to run ``n`` independent problems with batched scalars.
    """
    from ._array import scalar_device

    xp = namespace(like)
    dev = scalar_device(like)
    acc = acc_dtype if acc_dtype is not None else tree_acc_dtype([like])

    def full(v: Any, dt: Any) -> Array:
        return xp.full(batch_shape, v, dtype=dt, device=dev)

    return PSDState(
        count=full(0, xp.int32),
        since_perturb=full(config.t_thres + 1, xp.int32),
        episode_left=full(0, xp.int32),
        episodes=full(0, xp.int32),
        grad_sq_ema=full(0.0, acc),
        skipped=full(0, xp.int32),
        perturbed=full(False, xp.bool),
    )


class PSDGate(NamedTuple):
    finite: Array
    """The gradient norm is finite (else the step is skipped)."""
    open: Array
    """The gate would perturb if the point is a saddle."""
    grad_sq_ema: Array
    """The updated EMA of :math:`\\|g\\|^2` (unchanged on a skipped step)."""


def psd_gate(grad_sq_norm: Array, state: PSDState, config: PSDConfig) -> PSDGate:
    """Evaluate the PSD gate for a gradient of squared norm ``grad_sq_norm``.

    The gate is open when the step is finite, no episode runs, the gate statistic is
    at most ``epsilon``, the minimum gap ``t_thres`` has passed and the episode
    budget is not spent. Solvers call this to decide whether to run a curvature
    test; :func:`psd_coefficients` calls it to decide whether to perturb.
    """
    xp = namespace(grad_sq_norm)
    g2 = grad_sq_norm
    finite = xp.isfinite(g2)
    g2 = xp.where(finite, g2, xp.zeros_like(g2))
    ema_dt = state.grad_sq_ema.dtype
    g2e = xp.astype(g2, ema_dt) if g2.dtype != ema_dt else g2
    beta = config.ema_beta
    ema_new = xp.where(state.count == 0, g2e, (1.0 - beta) * state.grad_sq_ema + beta * g2e)
    ema_new = xp.where(finite, ema_new, state.grad_sq_ema)
    stat_sq = g2 if config.gate == "grad_norm" else xp.astype(ema_new, g2.dtype)
    small = xp.sqrt(stat_sq) <= as_scalar(config.epsilon, g2)
    open_ = (
        finite
        & (state.episode_left <= 0)
        & small
        & (state.since_perturb > config.t_thres)
        & (state.episodes < config.max_episodes)
    )
    return PSDGate(finite=finite, open=open_, grad_sq_ema=ema_new)


class PSDCoefficients(NamedTuple):
    """``updates = where(finite, grad * g + noise * z, 0)``."""

    grad: Array
    """Coefficient on the gradient (``-lr`` or 0)."""
    noise: Array
    """Coefficient on the standard normal draws ``z`` (0 unless perturbing)."""
    finite: Array
    """False on a skipped (non-finite) step: the update must be exactly zero."""
    perturb: Array
    """Whether this step perturbs."""


def psd_coefficients(
    grad_sq_norm: Array,
    state: PSDState,
    config: PSDConfig,
    *,
    dim: int,
    noise_sq_norm: Array | None = None,
    uniform: Array | None = None,
    saddle: Array | None = None,
    learning_rate: Any = None,
) -> tuple[PSDCoefficients, PSDState]:
    """One step of the PSD state machine on scalars.

    Args:
        grad_sq_norm: :math:`\\|g\\|^2` (0-d, or ``(n,)`` for batched problems).
        state: the current :class:`PSDState`.
        config: from :func:`psd_config`.
        dim: number of scalars :math:`d` of the parameter vector.
        noise_sq_norm: :math:`\\|z\\|^2` of the normal draws (needed for ``noise="ball"``).
        uniform: the :math:`U(0,1)` draw (needed for ``noise="ball"``).
        saddle: optional bool from a curvature test: perturb only where it is true.
        learning_rate: overrides ``config.learning_rate`` (e.g. a scheduled value).

    Returns:
        The :class:`PSDCoefficients` and the new state.
    """
    xp = namespace(grad_sq_norm)
    gate = psd_gate(grad_sq_norm, state, config)
    perturb = gate.open if saddle is None else (gate.open & saddle)
    lr = config.learning_rate if learning_rate is None else learning_rate
    if callable(lr):
        lr = lr(state.count)
    neg_lr = -as_scalar(lr, grad_sq_norm)
    zero = xp.zeros_like(grad_sq_norm)
    if config.step_on_perturb:
        grad_coef = xp.where(gate.finite, neg_lr, zero)
    else:
        grad_coef = xp.where(gate.finite & ~perturb, neg_lr, zero)
    if config.noise == "ball":
        if noise_sq_norm is None or uniform is None:
            raise ValueError("psd_coefficients: noise='ball' needs noise_sq_norm and uniform")
        scale = ball_scale(as_scalar(noise_sq_norm, grad_sq_norm), uniform, config.radius, dim)
    else:
        scale = as_scalar(config.radius, grad_sq_norm)
    noise_coef = xp.where(perturb, scale, zero)

    one = xp.ones_like(state.count)
    cap = xp.full_like(state.count, config.t_thres + 1)
    fin = gate.finite
    new_state = PSDState(
        count=xp.where(fin, state.count + one, state.count),
        since_perturb=xp.where(
            perturb,
            one,
            xp.where(fin, xp.minimum(state.since_perturb + one, cap), state.since_perturb),
        ),
        episode_left=xp.where(
            perturb,
            xp.full_like(state.episode_left, config.episode_length),
            xp.where(
                fin, xp.maximum(state.episode_left - one, xp.zeros_like(one)), state.episode_left
            ),
        ),
        episodes=xp.where(perturb, state.episodes + one, state.episodes),
        grad_sq_ema=gate.grad_sq_ema,
        skipped=xp.where(fin, state.skipped, state.skipped + one),
        perturbed=perturb,
    )
    return PSDCoefficients(grad=grad_coef, noise=noise_coef, finite=fin, perturb=perturb), new_state


def psd_updates(coeffs: PSDCoefficients, grads: Tree | None, normals: Tree | None) -> list[Array]:
    """Generic applier: ``where(finite, a * g + b * z, 0)`` leafwise.

    Either part may be left out: ``normals=None`` gives the gradient part
    ``where(finite, a * g, 0)`` and ``grads=None`` the noise part
    ``where(finite, b * z, 0)``. Their sum equals the whole update exactly whenever
    ``a == 0`` or ``b == 0`` (every step unless ``step_on_perturb=True``, where the
    two roundings may differ by an ulp). Adapters use the split to apply the noise
    only on perturbing steps (see ``psd_optax.update_and_apply``).
    """
    like = grads if grads is not None else normals
    if like is None:
        raise ValueError("psd_updates: grads and normals cannot both be None")
    xp = namespace(like)
    out = []
    for i, x in enumerate(like):
        u = coefficient_for(coeffs.grad, x) * x if grads is not None else None
        if normals is not None:
            z = coefficient_for(coeffs.noise, x) * normals[i]
            u = z if u is None else u + z
        out.append(u)
    zeros = [xp.zeros_like(x) for x in like]
    return tree_select(coeffs.finite, out, zeros)


def psd(
    learning_rate: Any,
    epsilon: float,
    radius: float,
    episode_length: int = 0,
    *,
    t_thres: int = 0,
    max_episodes: int | None = None,
    gate: str = "grad_norm",
    ema_beta: float = 0.1,
    noise: str = "ball",
    step_on_perturb: bool = False,
) -> Transformation:
    """PSD as a pure transformation.

    ``update(grads, state, params=None, *, normals, uniform=None, saddle=None)``
    returns ``(updates, new_state)``; apply with :func:`psd_core.apply_updates`.
    ``normals`` are standard normal draws shaped like ``grads`` (pass them on every
    call: the update is a pure function of its inputs), ``uniform`` a 0-d
    :math:`U(0,1)` draw (``noise="ball"``), ``saddle`` an optional bool from a
    curvature test. See :func:`psd_config` for the hyperparameters.

    Example:
        >>> import numpy as np, psd_core
        >>> tx = psd_core.psd(learning_rate=0.1, epsilon=1e-3, radius=0.1, episode_length=20)
        >>> x = [np.zeros(3)]
        >>> state = tx.init(x)
        >>> draws = psd_core.HostDraws(0)
        >>> g = [np.zeros(3)]  # at a saddle
        >>> upd, state = tx.update(g, state, x, normals=draws.normals_like(g), uniform=draws.uniform_like(g[0]))
        >>> bool(state.perturbed), bool(np.linalg.norm(upd[0]) <= 0.1)
        (True, True)
    """
    cfg = psd_config(
        learning_rate,
        epsilon,
        radius,
        episode_length,
        t_thres=t_thres,
        max_episodes=max_episodes,
        gate=gate,
        ema_beta=ema_beta,
        noise=noise,
        step_on_perturb=step_on_perturb,
    )

    def init(params: Tree) -> PSDState:
        check_tree("params", params)
        return psd_init(params[0], cfg, acc_dtype=tree_acc_dtype(params))

    def update(
        grads: Tree,
        state: PSDState,
        params: Tree | None = None,
        *,
        normals: Tree,
        uniform: Array | None = None,
        saddle: Array | None = None,
    ) -> tuple[list[Array], PSDState]:
        check_tree("grads", grads)
        check_same_shapes("normals", normals, "grads", grads)
        if params is not None:
            check_same_shapes("grads", grads, "params", params)
        g2 = tree_sq_norm(grads)
        coeffs, new_state = psd_coefficients(
            g2,
            state,
            cfg,
            dim=tree_size(grads),
            noise_sq_norm=tree_sq_norm(normals) if cfg.noise == "ball" else None,
            uniform=uniform,
            saddle=saddle,
        )
        return psd_updates(coeffs, grads, normals), new_state

    return Transformation(init, update)


def psd_from_theory(
    epsilon: float,
    ell: float,
    rho: float,
    delta: float = 0.1,
    delta_f: float = 1.0,
    *,
    dim: int,
    **kwargs: Any,
) -> Transformation:
    """:func:`psd` with every constant from :func:`psd_core.theory.psd_constants`:
    ``learning_rate = 1/(2 ell)``, ``radius = r``, ``episode_length = T``,
    ``max_episodes = M``, gate threshold ``epsilon``."""
    c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim)
    return psd(
        c.step_size,
        c.epsilon,
        c.radius,
        c.episode_length,
        max_episodes=c.max_episodes,
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# Perturbed Adam
# --------------------------------------------------------------------------------------


class PerturbedAdamConfig(NamedTuple):
    learning_rate: Any
    b1: float
    b2: float
    eps: float
    g_thres: float
    t_thres: int
    radius: float
    noise: str


def perturbed_adam_config(
    learning_rate: Any = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    g_thres: float = 1e-3,
    t_thres: int = 10,
    radius: float = 1e-3,
    noise: str = "gaussian",
) -> PerturbedAdamConfig:
    """Validate PerturbedAdam hyperparameters (every adapter calls this)."""
    return PerturbedAdamConfig(
        learning_rate=_lr_checked(learning_rate),
        b1=check_beta("b1", b1),
        b2=check_beta("b2", b2),
        eps=check_positive("eps", eps),
        g_thres=check_nonnegative("g_thres", g_thres),
        t_thres=check_int("t_thres", t_thres, minimum=0),
        radius=check_nonnegative("radius", radius),
        noise=check_choice("noise", noise, _NOISES),
    )


class PerturbedAdamState(NamedTuple):
    count: Array
    """Adam step count used for bias correction (not reset by a perturbation, as published)."""
    mu: list[Array]
    """First moment."""
    nu: list[Array]
    """Second moment."""
    small_steps: Array
    """Consecutive steps with a small Adam step since the last perturbation."""
    perturbations: Array
    skipped: Array
    perturbed: Array


def perturbed_adam_init(params: Tree, config: PerturbedAdamConfig) -> PerturbedAdamState:
    from ._array import scalar_device

    check_tree("params", params)
    xp = namespace(params)
    dev = scalar_device(params[0])

    def zero_int() -> Array:
        return xp.asarray(0, dtype=xp.int32, device=dev)

    return PerturbedAdamState(
        count=zero_int(),
        mu=[xp.zeros_like(p) for p in params],
        nu=[xp.zeros_like(p) for p in params],
        small_steps=zero_int(),
        perturbations=zero_int(),
        skipped=zero_int(),
        perturbed=xp.asarray(False, dtype=xp.bool, device=dev),
    )


def adam_moments(
    grads: Tree, mu: Tree, nu: Tree, b1: float, b2: float
) -> tuple[list[Array], list[Array]]:
    r"""Adam moments :math:`m^+ = \beta_1 m + (1-\beta_1) g`, :math:`v^+ = \beta_2 v + (1-\beta_2) g^2`."""
    mu_new = [b1 * m + (1.0 - b1) * g for m, g in zip(mu, grads)]
    nu_new = [b2 * v + (1.0 - b2) * (g * g) for v, g in zip(nu, grads)]
    return mu_new, nu_new


def adam_bias_corrections(count: Array, b1: float, b2: float, like: Array) -> tuple[Array, Array]:
    r"""Bias corrections :math:`(1-\beta_1^t,\ 1-\beta_2^t)` for step count :math:`t \ge 1` (0-d)."""
    xp = namespace(like)
    t = xp.astype(count, like.dtype)
    return 1.0 - as_scalar(b1, like) ** t, 1.0 - as_scalar(b2, like) ** t


def adam_direction(mu: Tree, nu: Tree, bc1: Array, bc2: Array, eps: float) -> list[Array]:
    r"""Bias-corrected Adam step :math:`\hat m/(\sqrt{\hat v}+\epsilon)`, :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)`."""
    xp = namespace(mu)
    out = []
    for m, v in zip(mu, nu):
        c1 = coefficient_for(bc1, m)
        c2 = coefficient_for(bc2, v)
        out.append((m / c1) / (xp.sqrt(v / c2) + eps))
    return out


class AdamCoefficients(NamedTuple):
    """``updates = where(finite, step * d + noise * z, 0)``; moments kept where ``keep``."""

    step: Array
    """Coefficient on the Adam direction ``d`` (``-lr``, or 0 on a perturbation)."""
    noise: Array
    """Coefficient on the normal draws (``r`` on a perturbation, else 0)."""
    finite: Array
    perturb: Array
    """On a perturbation both moments are reset to zero."""


def perturbed_adam_coefficients(
    step_sq_norm: Array,
    grad_sq_norm: Array,
    state: PerturbedAdamState,
    config: PerturbedAdamConfig,
    *,
    dim: int,
    noise_sq_norm: Array | None = None,
    uniform: Array | None = None,
    learning_rate: Any = None,
) -> tuple[AdamCoefficients, PerturbedAdamState]:
    r"""The PerturbedAdam gate on scalars.

    With :math:`s` the bias-corrected Adam step of this call and :math:`c` the count
    of consecutive small steps, :math:`c^+ = c + 1`; perturb when
    :math:`\|s\| \le g_{thres}` and :math:`c^+ \ge t_{thres}`; :math:`c` is reset to 0
    on a perturbation or on a large step. A perturbation replaces the Adam step by
    noise of radius :math:`r` and resets both moments.

    Difference from psd-optimizer 0.1.2: the published class gates each tensor on
    its own step norm (so different tensors perturb at different times); the
    paper's gate is on the global norm, which is what this function uses. On a
    model with one parameter tensor the two coincide (tested).

    The returned state's ``mu``/``nu`` are the *old* moments; the vector layer
    selects the new ones (see :func:`perturbed_adam`).
    """
    xp = namespace(step_sq_norm)
    finite = xp.isfinite(grad_sq_norm) & xp.isfinite(step_sq_norm)
    one = xp.ones_like(state.small_steps)
    c_new = state.small_steps + one
    small = xp.sqrt(xp.where(finite, step_sq_norm, xp.zeros_like(step_sq_norm))) <= as_scalar(
        config.g_thres, step_sq_norm
    )
    perturb = finite & small & (c_new >= config.t_thres)
    lr = config.learning_rate if learning_rate is None else learning_rate
    if callable(lr):
        lr = lr(state.count)
    zero = xp.zeros_like(step_sq_norm)
    step_coef = xp.where(finite & ~perturb, -as_scalar(lr, step_sq_norm), zero)
    if config.noise == "ball":
        if noise_sq_norm is None or uniform is None:
            raise ValueError(
                "perturbed_adam_coefficients: noise='ball' needs noise_sq_norm and uniform"
            )
        scale = ball_scale(as_scalar(noise_sq_norm, step_sq_norm), uniform, config.radius, dim)
    else:
        scale = as_scalar(config.radius, step_sq_norm)
    noise_coef = xp.where(perturb, scale, zero)
    new_state = PerturbedAdamState(
        count=xp.where(finite, state.count + one, state.count),
        mu=state.mu,
        nu=state.nu,
        small_steps=xp.where(
            finite, xp.where(perturb | ~small, xp.zeros_like(one), c_new), state.small_steps
        ),
        perturbations=xp.where(perturb, state.perturbations + one, state.perturbations),
        skipped=xp.where(finite, state.skipped, state.skipped + one),
        perturbed=perturb,
    )
    return AdamCoefficients(
        step=step_coef, noise=noise_coef, finite=finite, perturb=perturb
    ), new_state


def perturbed_adam(
    learning_rate: Any = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    g_thres: float = 1e-3,
    t_thres: int = 10,
    radius: float = 1e-3,
    *,
    noise: str = "gaussian",
) -> Transformation:
    """PerturbedAdam (psd-optimizer semantics, global gate) as a pure transformation.

    ``update(grads, state, params=None, *, normals, uniform=None)``. On a perturbing
    step the update is ``radius * normals`` (``noise="gaussian"``, as published) or a
    uniform-ball sample, and both moments are reset to zero; otherwise it is the
    Adam step ``-lr * m_hat / (sqrt(v_hat) + eps)``. Non-finite gradients: the step
    is skipped and the state (moments included) is left unchanged.
    """
    cfg = perturbed_adam_config(learning_rate, b1, b2, eps, g_thres, t_thres, radius, noise)

    def init(params: Tree) -> PerturbedAdamState:
        return perturbed_adam_init(params, cfg)

    def update(
        grads: Tree,
        state: PerturbedAdamState,
        params: Tree | None = None,
        *,
        normals: Tree,
        uniform: Array | None = None,
    ) -> tuple[list[Array], PerturbedAdamState]:
        check_tree("grads", grads)
        check_same_shapes("normals", normals, "grads", grads)
        xp = namespace(grads)
        g2 = tree_sq_norm(grads)
        mu1, nu1 = adam_moments(grads, state.mu, state.nu, cfg.b1, cfg.b2)
        bc1, bc2 = adam_bias_corrections(state.count + 1, cfg.b1, cfg.b2, g2)
        direction = adam_direction(mu1, nu1, bc1, bc2, cfg.eps)
        coeffs, new_state = perturbed_adam_coefficients(
            tree_sq_norm(direction),
            g2,
            state,
            cfg,
            dim=tree_size(grads),
            noise_sq_norm=tree_sq_norm(normals) if cfg.noise == "ball" else None,
            uniform=uniform,
        )
        updates = [
            coefficient_for(coeffs.step, d) * d + coefficient_for(coeffs.noise, d) * z
            for d, z in zip(direction, normals)
        ]
        zeros = [xp.zeros_like(g) for g in grads]
        updates = tree_select(coeffs.finite, updates, zeros)
        keep_new = coeffs.finite & ~coeffs.perturb
        mu = tree_select(keep_new, mu1, tree_select(coeffs.perturb, zeros, state.mu))
        nu = tree_select(keep_new, nu1, tree_select(coeffs.perturb, zeros, state.nu))
        return updates, new_state._replace(mu=mu, nu=nu)

    return Transformation(init, update)
