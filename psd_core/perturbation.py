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

Non-finite policy: if the gradient is not finite (a NaN or inf entry), the step is
skipped: the updates are exactly zero and the state is unchanged except
``skipped``, which counts such steps, and ``count``, which counts every call
(``perturbed`` keeps its value). A finite gradient whose squared norm overflows
(1e20 in float32) is not skipped when the caller passes ``finite=`` (the vector
layer does, from :func:`psd_core._array.tree_all_finite`).

References:
    Alpay & Alakkad, *Escaping Saddle Points via Curvature-Calibrated Perturbations: A
    Complete Analysis with Explicit Constants and Empirical Validation*, 2025,
    arXiv:2508.16540.
    Jin et al., *How to Escape Saddle Points Efficiently*, ICML 2017 (PGD gate).
    psd-optimizer 0.1.2 (``PSDTorch``, ``PerturbedAdam``): the practical gates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._array import (
    Array,
    Tree,
    _int_range,
    accumulation_dtype,
    as_scalar,
    cast,
    coefficient_for,
    count_dtype,
    int_constant,
    is_complex,
    namespace,
    number_like,
    saturating_increment,
    scalar_device,
    tree_acc_dtype,
    tree_all_finite,
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
    "adam_eps",
    "adam_moments",
    "adam_store",
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

_INT_MAX_EPISODES = 2**63 - 1
"""``max_episodes=None``: unlimited (clamped to the counter dtype's maximum)."""
_GATES = ("grad_norm", "ema")
_NOISES = ("ball", "gaussian")


def _count(name: str, value: Any) -> int:
    """An integer hyperparameter ``>= 0``; values beyond int64 are clamped to
    :math:`2^{63}-1` ("effectively unlimited", e.g. the paper's :math:`M` for a tiny
    :math:`\\epsilon`)."""
    return min(check_int(name, value, minimum=0, maximum=10**100), _INT_MAX_EPISODES)


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
            Integer hyperparameters accept values up to :math:`2^{63}-1` (e.g. the
            paper's :math:`M` for a small :math:`\\epsilon`); counters are int64, or
            int32 on JAX without x64, where larger values are clamped to
            :math:`2^{31}-1` ("effectively unlimited") and counters saturate there.
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
        episode_length=_count("episode_length", episode_length),
        t_thres=_count("t_thres", t_thres),
        max_episodes=(
            _INT_MAX_EPISODES if max_episodes is None else _count("max_episodes", max_episodes)
        ),
        gate=check_choice("gate", gate, _GATES),
        ema_beta=check_open_unit("ema_beta", ema_beta),
        noise=check_choice("noise", noise, _NOISES),
        step_on_perturb=bool(step_on_perturb),
    )


class PSDState(NamedTuple):
    """State of the PSD state machine: 0-d arrays (or shape ``(n,)`` when batched)."""

    count: Array
    """Calls so far, skipped ones included (so a schedule ``count -> lr`` sees every
    step, as Optax's schedules do)."""
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

    idt = count_dtype(xp)

    def full(v: Any, dt: Any) -> Array:
        return xp.full(batch_shape, v, dtype=dt, device=dev)

    return PSDState(
        count=full(0, idt),
        # "the last perturbation was more than t_thres steps ago" (saturating)
        since_perturb=saturating_increment(int_constant(config.t_thres, full(0, idt)))
        + full(0, idt),
        episode_left=full(0, idt),
        episodes=full(0, idt),
        grad_sq_ema=full(0.0, acc),
        skipped=full(0, idt),
        perturbed=full(False, xp.bool),
    )


def _counter_const(xp: Any, value: Any, like: Array, *, below_max: bool = False) -> Any:
    """A counter hyperparameter next to the counter ``like``, clamped to its dtype's range.

    A static Python int stays a Python int (clamped here, once), so that comparisons and
    sums with the counter need no 0-d array of their own: on eager torch or NumPy each
    such array costs a dispatch. An array (a traced budget, e.g. under
    ``optax.inject_hyperparams``) goes through :func:`int_constant` and stays traceable.
    ``below_max``: at most ``max - 1`` (so that ``since > t`` can hold, see ``t_thres``).
    """
    lo, hi = _int_range(xp, like.dtype)
    if below_max:
        hi -= 1
    if not hasattr(value, "dtype") or isinstance(value, (bool, int)):
        return max(min(int(value), hi), lo)
    c = int_constant(value, like)
    return xp.minimum(c, int_constant(hi, like)) if below_max else c


class PSDGate(NamedTuple):
    finite: Array
    """The gradient norm is finite (else the step is skipped)."""
    open: Array
    """The gate would perturb if the point is a saddle."""
    grad_sq_ema: Array
    """The updated EMA of :math:`\\|g\\|^2` (unchanged on a skipped step)."""


def psd_gate(
    grad_sq_norm: Array, state: PSDState, config: PSDConfig, *, finite: Array | None = None
) -> PSDGate:
    """Evaluate the PSD gate for a gradient of squared norm ``grad_sq_norm``.

    The gate is open when the step is finite, no episode runs, the gate statistic is
    at most ``epsilon``, the minimum gap ``t_thres`` has passed and the episode
    budget is not spent. Solvers call this to decide whether to run a curvature
    test; :func:`psd_coefficients` calls it to decide whether to perturb.

    ``finite`` (keyword, optional): whether the gradient is finite, e.g.
    :func:`psd_core._array.tree_all_finite` of it. Without it the step counts as
    finite when ``grad_sq_norm`` is, so a finite gradient whose squared norm
    overflows would be skipped; with it such a step is taken (its gate is closed).
    """
    xp = namespace(grad_sq_norm)
    dev = scalar_device(grad_sq_norm)
    t_thr = _counter_const(xp, config.t_thres, state.since_perturb, below_max=True)
    return _gate(xp, dev, grad_sq_norm, state, config, finite, t_thr)


def _gate(
    xp: Any,
    dev: Any,
    g2: Array,
    state: PSDState,
    config: PSDConfig,
    finite: Array | None,
    t_thr: Any,
) -> PSDGate:
    """:func:`psd_gate` with its namespace, scalar device and ``t_thres`` constant
    given (:func:`psd_coefficients` shares them with the state update)."""
    if finite is None:
        finite = xp.isfinite(g2)
    g2 = xp.where(finite, g2, xp.zeros_like(g2))
    ema_dt = state.grad_sq_ema.dtype
    g2e = xp.astype(g2, ema_dt) if g2.dtype != ema_dt else g2
    # an overflowed square (finite gradient) enters the EMA as the largest finite value
    g2e = xp.minimum(g2e, number_like(xp, xp.finfo(ema_dt).max, g2e, dev))
    beta = config.ema_beta
    # the first finite step initializes the EMA (count counts every call, see PSDState)
    ema_new = xp.where(
        state.count == state.skipped, g2e, (1.0 - beta) * state.grad_sq_ema + beta * g2e
    )
    ema_new = xp.where(finite, ema_new, state.grad_sq_ema)
    stat_sq = g2 if config.gate == "grad_norm" else xp.astype(ema_new, g2.dtype)
    small = xp.sqrt(stat_sq) <= number_like(xp, config.epsilon, g2, dev)
    budget = _counter_const(xp, config.max_episodes, state.episodes)
    open_ = (
        finite
        & (state.episode_left <= 0)
        & small
        & (state.since_perturb > t_thr)
        & (state.episodes < budget)
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
    finite: Array | None = None,
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
        finite: whether the gradient is finite (see :func:`psd_gate`); pass
            ``tree_all_finite(grads)`` so that only a truly non-finite gradient skips.

    Returns:
        The :class:`PSDCoefficients` and the new state.
    """
    xp = namespace(grad_sq_norm)
    dev = scalar_device(grad_sq_norm)
    since = state.since_perturb
    t_thr = _counter_const(xp, config.t_thres, since, below_max=True)
    gate = _gate(xp, dev, grad_sq_norm, state, config, finite, t_thr)
    perturb = gate.open if saddle is None else (gate.open & saddle)
    lr = config.learning_rate if learning_rate is None else learning_rate
    if callable(lr):
        lr = lr(state.count)
    neg_lr = -number_like(xp, lr, grad_sq_norm, dev)
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
        scale = number_like(xp, config.radius, grad_sq_norm, dev)
    noise_coef = xp.where(perturb, scale, zero)

    fin = gate.finite
    left = state.episode_left
    new_state = PSDState(
        count=saturating_increment(state.count),
        # counts up to t_thres + 1 ("more than t_thres steps ago") and stays there; the
        # test comes before the sum, so a t_thres clamped to max - 1 cannot wrap
        since_perturb=xp.where(
            perturb, xp.ones_like(since), xp.where(fin & (since <= t_thr), since + 1, since)
        ),
        episode_left=xp.where(
            perturb,
            int_constant(config.episode_length, left),
            xp.where(fin, xp.maximum(left - 1, xp.zeros_like(left)), left),
        ),
        episodes=xp.where(perturb, saturating_increment(state.episodes), state.episodes),
        grad_sq_ema=gate.grad_sq_ema,
        skipped=xp.where(fin, state.skipped, saturating_increment(state.skipped)),
        perturbed=xp.where(fin, perturb, state.perturbed),
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
            finite=tree_all_finite(grads),
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
    eps_mode: str = "hat"


_EPS_MODES = ("hat", "keras")


def perturbed_adam_config(
    learning_rate: Any = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    g_thres: float = 1e-3,
    t_thres: int = 10,
    radius: float = 1e-3,
    noise: str = "gaussian",
    *,
    eps_mode: str = "hat",
) -> PerturbedAdamConfig:
    """Validate PerturbedAdam hyperparameters (every adapter calls this).

    ``eps_mode``: where :math:`\\epsilon` enters the Adam direction (see
    :func:`adam_direction`): ``"hat"`` (torch, Optax, psd-optimizer) or ``"keras"``
    (Keras's ``Adam``).
    """
    return PerturbedAdamConfig(
        learning_rate=_lr_checked(learning_rate),
        b1=check_beta("b1", b1),
        b2=check_beta("b2", b2),
        eps=check_positive("eps", eps),
        g_thres=check_nonnegative("g_thres", g_thres),
        t_thres=_count("t_thres", t_thres),
        radius=check_nonnegative("radius", radius),
        noise=check_choice("noise", noise, _NOISES),
        eps_mode=check_choice("eps_mode", eps_mode, _EPS_MODES),
    )


class PerturbedAdamState(NamedTuple):
    count: Array
    """Adam step count used for bias correction: applied (finite) steps only, like
    ``optax.apply_if_finite(optax.adam)``; not reset by a perturbation, as published."""
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
        return xp.asarray(0, dtype=count_dtype(xp), device=dev)

    return PerturbedAdamState(
        count=zero_int(),
        mu=[xp.zeros_like(p) for p in params],
        nu=[xp.zeros_like(p) for p in params],
        small_steps=zero_int(),
        perturbations=zero_int(),
        skipped=zero_int(),
        perturbed=xp.asarray(False, dtype=xp.bool, device=dev),
    )


_to = cast  # ``x`` as ``dtype`` (psd_core._array.cast)


def adam_moments(
    grads: Tree, mu: Tree, nu: Tree, b1: float, b2: float, *, accumulate: bool = False
) -> tuple[list[Array], list[Array]]:
    r"""Adam moments :math:`m^+ = \beta_1 m + (1-\beta_1) g`, :math:`v^+ = \beta_2 v + (1-\beta_2) g^2`.

    Computed in the accumulation dtype (float32 for 16-bit moments) and returned in
    the moments' own dtype (for storage), or, with ``accumulate=True``, in the
    accumulation dtype: the direction must be computed from those, before they are
    rounded for storage. In float16 :math:`(1-\beta_2) g^2` underflows to 0 for
    :math:`|g| \lesssim 8\cdot 10^{-3}`; a direction from the stored :math:`v^+ = 0`
    would be :math:`\hat m/\epsilon` (a step of :math:`10^{6}` lr and more), where
    fused Adam kernels, which round only for storage, step by about lr.

    :math:`(1-\beta_2) g^2` is evaluated as :math:`((1-\beta_2) g)\, g`, as
    ``torch.optim.Adam``'s ``addcmul`` does: a finite :math:`g = 10^{20}` in float32
    then gives :math:`v^+ = 10^{37}` instead of an overflow.
    """
    xp = namespace(grads)
    mu_new, nu_new = [], []
    for g, m, v in zip(grads, mu, nu):
        if is_complex(xp, m):
            # torch's convention: Adam on the real and imaginary parts (view_as_real)
            mu_new.append(b1 * m + (1.0 - b1) * _to(xp, g, m.dtype))
            re, im = xp.real(g), xp.imag(g)
            nu_new.append(
                b2 * v + _complex(xp, ((1.0 - b2) * re) * re, ((1.0 - b2) * im) * im, v.dtype)
            )
            continue
        acc = accumulation_dtype(xp, m.dtype)
        ga = _to(xp, g, acc)
        m1 = b1 * _to(xp, m, acc) + (1.0 - b1) * ga
        v1 = b2 * _to(xp, v, acc) + ((1.0 - b2) * ga) * ga
        mu_new.append(m1 if accumulate else _to(xp, m1, m.dtype))
        nu_new.append(v1 if accumulate else _to(xp, v1, v.dtype))
    return mu_new, nu_new


def adam_store(moments: Tree, like: Tree) -> list[Array]:
    """Moments from :func:`adam_moments` with ``accumulate=True``, rounded once to the
    dtypes of ``like`` (the stored moments) for storage."""
    xp = namespace(like)
    return [_to(xp, a, m.dtype) for a, m in zip(moments, like)]


def _complex(xp: Any, re: Array, im: Array, dtype: Any) -> Array:
    """``re + i im`` as ``dtype`` (complex)."""
    return xp.astype(re, dtype) + xp.astype(im, dtype) * xp.asarray(1j, dtype=dtype)


def adam_bias_corrections(count: Array, b1: float, b2: float, like: Array) -> tuple[Array, Array]:
    r"""Bias corrections :math:`(1-\beta_1^t,\ 1-\beta_2^t)` for step count :math:`t \ge 1` (0-d).

    Computed in ``like``'s dtype, or float32 if that is a 16-bit float.
    """
    xp = namespace(like)
    acc = accumulation_dtype(xp, like.dtype)
    t = xp.astype(count, acc)
    return 1.0 - as_scalar(b1, like, acc) ** t, 1.0 - as_scalar(b2, like, acc) ** t


def adam_eps(eps: float, bc2: Array, like: Array, *, eps_mode: str = "hat") -> Array:
    r"""The constant :math:`e` of :func:`adam_direction`'s
    :math:`d = (m / (1-\beta_1^t)) / (\sqrt{v} / \sqrt{1-\beta_2^t} + e)` (0-d).

    :math:`e = \epsilon` for ``eps_mode="hat"`` and :math:`\epsilon/\sqrt{1-\beta_2^t}`
    for ``"keras"``; in ``like``'s accumulation dtype (``bc2`` is the second bias
    correction). Adapters that apply the direction with their own kernels take it
    from here.
    """
    check_choice("eps_mode", eps_mode, _EPS_MODES)
    xp = namespace(like)
    acc = accumulation_dtype(xp, like.dtype)
    e = as_scalar(eps, like, acc)
    if eps_mode == "keras":
        e = e / xp.sqrt(as_scalar(bc2, like, acc))
    return e


def adam_direction(
    mu: Tree, nu: Tree, bc1: Array, bc2: Array, eps: float, *, eps_mode: str = "hat"
) -> list[Array]:
    r"""Bias-corrected Adam step :math:`\hat m/(\sqrt{\hat v}+\epsilon)`, :math:`\hat m = m/(1-\beta_1^t)`, :math:`\hat v = v/(1-\beta_2^t)`.

    Computed and returned in the accumulation dtype (float32 for float16/bfloat16
    moments, where :math:`\epsilon = 10^{-8}` would round to 0 and a zero moment
    would give 0/0): a finite moment always gives a finite direction. Cast it to the
    parameter dtype once, when the step is applied.

    ``eps_mode="keras"`` gives Keras's ``Adam``,
    :math:`\hat m/(\sqrt{\hat v} + \epsilon/\sqrt{1-\beta_2^t})`
    (Keras adds :math:`\epsilon` to :math:`\sqrt{v}` before the bias correction).
    """
    check_choice("eps_mode", eps_mode, _EPS_MODES)
    xp = namespace(mu)
    out = []
    for m, v in zip(mu, nu):
        acc = accumulation_dtype(xp, m.dtype)
        parts = (
            [(xp.real(m), xp.real(v)), (xp.imag(m), xp.imag(v))] if is_complex(xp, m) else [(m, v)]
        )
        dirs = []
        for mp, vp in parts:
            ma, va = _to(xp, mp, acc), _to(xp, vp, acc)
            c1 = coefficient_for(as_scalar(bc1, ma, acc), ma)
            c2 = coefficient_for(as_scalar(bc2, va, acc), va)
            e = adam_eps(eps, bc2, va, eps_mode=eps_mode)
            # sqrt(v) / sqrt(bc2), not sqrt(v / bc2): v / bc2 overflows for v near the
            # top of the range (v = 1e37 from g = 1e20 in float32), as torch.optim.Adam
            dirs.append((ma / c1) / (xp.sqrt(va) / xp.sqrt(c2) + e))
        out.append(dirs[0] if len(dirs) == 1 else _complex(xp, dirs[0], dirs[1], m.dtype))
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
    finite: Array | None = None,
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

    Non-finite policy: the step is skipped (parameters and moments untouched) when
    the gradient is not finite. Pass ``finite=tree_all_finite(grads)``
    (:func:`psd_core._array.tree_all_finite`): the decision then rests on the
    gradient alone, so a finite gradient whose squared norm overflows (1e20 in
    float32) is not skipped. Without ``finite`` the older rule
    ``isfinite(grad_sq_norm) & isfinite(step_sq_norm)`` applies.

    The returned state's ``mu``/``nu`` are the *old* moments; the vector layer
    selects the new ones (see :func:`perturbed_adam`).
    """
    xp = namespace(step_sq_norm)
    if finite is None:
        finite = xp.isfinite(grad_sq_norm) & xp.isfinite(step_sq_norm)
    one = xp.ones_like(state.small_steps)
    c_new = saturating_increment(state.small_steps)
    small = xp.sqrt(xp.where(finite, step_sq_norm, xp.zeros_like(step_sq_norm))) <= as_scalar(
        config.g_thres, step_sq_norm
    )
    perturb = finite & small & (c_new >= int_constant(config.t_thres, c_new))
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
        count=xp.where(finite, saturating_increment(state.count), state.count),
        mu=state.mu,
        nu=state.nu,
        small_steps=xp.where(
            finite, xp.where(perturb | ~small, xp.zeros_like(one), c_new), state.small_steps
        ),
        perturbations=xp.where(
            perturb, saturating_increment(state.perturbations), state.perturbations
        ),
        skipped=xp.where(finite, state.skipped, saturating_increment(state.skipped)),
        perturbed=xp.where(finite, perturb, state.perturbed),
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
    eps_mode: str = "hat",
) -> Transformation:
    """PerturbedAdam (psd-optimizer semantics, global gate) as a pure transformation.

    ``update(grads, state, params=None, *, normals, uniform=None)``. On a perturbing
    step the update is ``radius * normals`` (``noise="gaussian"``, as published) or a
    uniform-ball sample, and both moments are reset to zero; otherwise it is the
    Adam step ``-lr * m_hat / (sqrt(v_hat) + eps)``, computed in the accumulation
    dtype (float32 for 16-bit parameters) and cast once. Non-finite gradients: the
    step is skipped and the state (moments included) is left unchanged; the skip
    is decided by the gradient's finiteness alone (a finite gradient gives a finite
    direction), so moments and parameters can be written in one pass.
    """
    cfg = perturbed_adam_config(
        learning_rate, b1, b2, eps, g_thres, t_thres, radius, noise, eps_mode=eps_mode
    )

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
        # the direction from the new moments in the accumulation dtype, rounded only
        # for storage (as fused Adam kernels do)
        mu1a, nu1a = adam_moments(grads, state.mu, state.nu, cfg.b1, cfg.b2, accumulate=True)
        mu1, nu1 = adam_store(mu1a, state.mu), adam_store(nu1a, state.nu)
        bc1, bc2 = adam_bias_corrections(state.count + 1, cfg.b1, cfg.b2, g2)
        direction = adam_direction(mu1a, nu1a, bc1, bc2, cfg.eps, eps_mode=cfg.eps_mode)
        coeffs, new_state = perturbed_adam_coefficients(
            tree_sq_norm(direction),
            g2,
            state,
            cfg,
            dim=tree_size(grads),
            noise_sq_norm=tree_sq_norm(normals) if cfg.noise == "ball" else None,
            uniform=uniform,
            finite=tree_all_finite(grads),
        )
        # the step in the accumulation dtype, cast once to the parameter dtype
        updates = [
            _to(
                xp,
                coefficient_for(coeffs.step, d) * d
                + coefficient_for(coeffs.noise, d) * _to(xp, z, d.dtype),
                g.dtype,
            )
            for d, z, g in zip(direction, normals, grads)
        ]
        zeros = [xp.zeros_like(g) for g in grads]
        updates = tree_select(coeffs.finite, updates, zeros)
        keep_new = coeffs.finite & ~coeffs.perturb
        mu = tree_select(keep_new, mu1, tree_select(coeffs.perturb, zeros, state.mu))
        nu = tree_select(keep_new, nu1, tree_select(coeffs.perturb, zeros, state.nu))
        return updates, new_state._replace(mu=mu, nu=nu)

    return Transformation(init, update)
