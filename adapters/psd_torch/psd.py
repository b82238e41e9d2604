"""``psd_torch.PSD``: Perturbed Saddle-escape Descent as a ``torch.optim.Optimizer``.

Every scalar decision and coefficient comes from :mod:`psd_core.perturbation`
(:func:`~psd_core.perturbation.psd_gate` and
:func:`~psd_core.perturbation.psd_coefficients`); this module only computes the
global squared gradient norm with ``torch._foreach_norm`` (float32 or better),
draws the noise with the optimizer's own ``torch.Generator`` and applies
``p += a * g + b * z`` in place with ``torch._foreach_add_``.

Host reads (synchronization): the step reads one small tensor on the host per
call (the finite/perturb flags and the coefficients, stacked into one transfer),
plus one more on a perturbing step with ``noise="ball"`` (the ball scale depends on
the norm of the fresh draws). On CPU these reads are free. On CUDA each is one
synchronization; the optimizer needs the perturb flag on the host anyway to draw
the noise only when it perturbs (drawing 10M normals every step would cost more
than the sync). A fully sync-free CUDA step is not implemented.

Non-finite policy (the core's): if the global gradient norm is not finite the step
is skipped -- the parameters are not touched, the state is unchanged except the
``skipped`` counter.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from psd_core import curvature as _curv
from psd_core import validation
from psd_core._array import tree_acc_dtype
from psd_core.perturbation import (
    PSDConfig,
    PSDState,
    psd_coefficients,
    psd_config,
    psd_gate,
    psd_init,
)
from psd_core.theory import psd_constants

from ._common import (
    GeneratorStateMixin,
    NoiseFn,
    check_lr,
    check_params,
    check_same_across_groups,
    foreach_add_,
    global_sq_norm,
    group_by_device_dtype,
    host_floats,
    host_view_of,
    lr_scalar,
    on_host,
    real_view,
    resolve_foreach,
    safe_norm_and_finite,
    scalars_on_host,
    scalars_to_torch_cached,
    torch_dtype_of,
    total_numel,
)
from ._dtensor import dcp_compatible  # [dtensor hook]

__all__ = ["PSD"]

_CURVATURE = (None, "grad_diff", "hvp")
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_NONE = type(None)
_GLOBAL = (
    "epsilon",
    "radius",
    "episode_length",
    "t_thres",
    "max_episodes",
    "gate",
    "ema_beta",
    "noise",
    "foreach",
    "curvature",
    "curvature_gamma",
    "curvature_iters",
    "curvature_h",
)
_CONFIG_KEYS = (
    "epsilon",
    "radius",
    "episode_length",
    "t_thres",
    "max_episodes",
    "gate",
    "ema_beta",
    "noise",
    "step_on_perturb",
)
_WHY_GLOBAL = "acts on the global gradient norm / the global noise draw"
_LEGACY_DEFAULTS = {"maximize": False, "foreach": None}


def _config_of(group: dict[str, Any], lr: Any) -> PSDConfig:
    """The core :class:`~psd_core.perturbation.PSDConfig` of one parameter group."""
    return psd_config(
        lr,
        group["epsilon"],
        group["radius"],
        group["episode_length"],
        t_thres=group["t_thres"],
        max_episodes=group["max_episodes"],
        gate=group["gate"],
        ema_beta=group["ema_beta"],
        noise=group["noise"],
        step_on_perturb=group["step_on_perturb"],
    )


# [dtensor hook] state_dict() loadable by torch.distributed.checkpoint
@dcp_compatible
class PSD(GeneratorStateMixin, torch.optim.Optimizer):
    r"""Perturbed Saddle-escape Descent (Alpay & Alakkad 2025) on the :mod:`psd_core` state machine.

    A standard per-step optimizer: ``loss.backward(); opt.step()``. Each step
    computes the global gradient norm :math:`\|g\|` over all parameters; while no
    escape episode runs, if :math:`\|g\| \le \epsilon` (and more than ``t_thres``
    steps passed since the last perturbation, and the episode budget is not used
    up, and -- if a curvature check is configured -- the point is a strict saddle)
    the step perturbs: it adds a draw uniform in the ball of radius ``radius``
    (``noise="ball"``) or :math:`N(0, r^2 I)` (``noise="gaussian"``) and starts an
    episode of ``episode_length`` plain gradient steps. Otherwise it takes the
    gradient step :math:`p \leftarrow p - \eta g`.

    Args:
        params: parameters or parameter-group dicts (groups may override ``lr``).
        lr: step size :math:`\eta \ge 0`.
        epsilon: gate threshold on the global gradient norm, ``>= 0``.
        radius: perturbation radius ``>= 0``.
        episode_length: plain steps after a perturbation before the gate is consulted again.
        t_thres: minimum gap: a perturbation needs more than ``t_thres`` steps since the last one.
        max_episodes: episode budget (``None``: unlimited).
        gate: ``"grad_norm"`` or ``"ema"`` (gate on an EMA of :math:`\|g\|^2`).
        ema_beta: EMA coefficient for ``gate="ema"``.
        noise: ``"ball"`` (the paper) or ``"gaussian"`` (``PSDTorch``).
        step_on_perturb: also take the gradient step on a perturbing call (``PSDTorch``).
        seed: seed of the optimizer's ``torch.Generator`` (on the first parameter's
            device). ``None`` draws a seed from PyTorch's global generator. Under DDP
            pass the same seed on every rank.
        foreach: use ``torch._foreach_*`` ops (default) or a per-tensor loop.
        curvature: ``None``, ``"grad_diff"`` (Hessian-vector products from gradient
            differences, works with any closure) or ``"hvp"`` (exact HVPs by double
            backward: the closure must return the loss with its graph alive, i.e.
            call ``loss.backward(retain_graph=True)``; the optimizer differentiates
            the returned loss twice). Needs ``step(closure)``.
            When the gate is open the optimizer estimates
            :math:`\lambda_{\min}` with the core's Lanczos probe
            (:func:`psd_core.curvature.min_curvature`) and perturbs only if
            :func:`psd_core.curvature.is_strict_saddle` (:math:`\lambda_{\min} < -\gamma`).
        curvature_gamma: the curvature threshold :math:`\gamma > 0` (``from_theory``
            fills :math:`\sqrt{\rho\epsilon}`).
        curvature_iters: Lanczos iterations (HVPs) per check.
        curvature_h: finite-difference step for ``"grad_diff"``.
        noise_fn: optional ``params -> (normals, uniform)`` replacing the generator
            (used by tests to feed the optimizer and the core identical draws).

    The optimizer's global state (``count``, ``since_perturb``, ``episode_left``,
    ``episodes``, ``grad_sq_ema``, ``skipped``, ``perturbed``: the core's
    :class:`~psd_core.perturbation.PSDState`) lives in ``self.state["psd"]`` and, with
    the generator state, in :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
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
        seed: int | None = None,
        foreach: bool | None = None,
        maximize: bool = False,
        curvature: str | None = None,
        curvature_gamma: float | None = None,
        curvature_iters: int = 10,
        curvature_h: float = 1e-3,
        noise_fn: NoiseFn | None = None,
    ) -> None:
        params = check_params(params)
        defaults = dict(
            lr=lr,
            epsilon=epsilon,
            radius=radius,
            episode_length=episode_length,
            t_thres=t_thres,
            max_episodes=max_episodes,
            gate=gate,
            ema_beta=ema_beta,
            noise=noise,
            step_on_perturb=step_on_perturb,
            maximize=maximize,
            foreach=foreach,
            curvature=curvature,
            curvature_gamma=curvature_gamma,
            curvature_iters=curvature_iters,
            curvature_h=curvature_h,
        )
        self._validate(defaults)
        defaults["noise_fn"] = noise_fn  # kept in ``defaults`` only (see add_param_group)
        super().__init__(params, defaults)
        self._init_generator(seed)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        """Validate one group's hyperparameters (the core's :func:`psd_config` plus the
        adapter's options); raises ``ValueError``/``TypeError`` naming the argument."""
        check_lr(group["lr"])
        _config_of(group, 0.0)
        if group["curvature"] not in _CURVATURE:
            raise ValueError(
                f"Invalid curvature: {group['curvature']!r} (must be one of None, 'grad_diff', 'hvp')"
            )
        validation.check_int("curvature_iters", group["curvature_iters"], minimum=1)
        validation.check_positive("curvature_h", group["curvature_h"])
        if group["curvature"] is not None:
            if group["curvature_gamma"] is None:
                raise ValueError(
                    "curvature_gamma is required when curvature is set (e.g. sqrt(rho*epsilon))"
                )
            validation.check_positive("curvature_gamma", group["curvature_gamma"])
            if group["maximize"]:
                raise ValueError("maximize: True is not supported with a curvature check")
        if not isinstance(group["maximize"], bool):
            raise TypeError(f"maximize must be a bool, got {group['maximize']!r}")
        if group["foreach"] is not None and not isinstance(group["foreach"], bool):
            raise TypeError(f"foreach must be a bool or None, got {group['foreach']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may override ``lr``, ``maximize`` and ``step_on_perturb``. The
        other hyperparameters act on the global gradient norm or the global noise draw
        and must equal the first group's (``ValueError`` otherwise)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.pop("noise_fn", None)
        self._validate(group)
        check_same_across_groups(self, _GLOBAL, _WHY_GLOBAL)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints made before 0.2 hold ``lr`` only
            for k, v in self.defaults.items():
                if k not in ("noise_fn", "differentiable"):  # torch's __setstate__ adds the latter
                    group.setdefault(k, v)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_theory(
        cls,
        params: Any,
        epsilon: float,
        ell: float,
        rho: float,
        delta: float = 0.1,
        delta_f: float = 1.0,
        **kwargs: Any,
    ) -> PSD:
        r"""PSD with the paper's constants (:func:`psd_core.theory.psd_constants`, ``dim`` =
        total number of parameter scalars): ``lr = 1/(2 ell)``, ``radius = r``,
        ``episode_length = T``, ``max_episodes = M``, gate ``epsilon``; with a curvature
        check, ``curvature_gamma`` defaults to :math:`\gamma = \sqrt{\rho\epsilon}`."""
        params = check_params(params)
        dim = 0
        items = []
        for item in params:
            if isinstance(item, dict):  # materialise a generator of params once
                ps = item["params"]
                ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
                item = {**item, "params": ps}
            else:
                ps = [item]
            items.append(item)
            for p in ps:  # a tensor, or a (name, tensor) pair of named_parameters()
                t = p[1] if isinstance(p, tuple) else p
                dim += int(t.numel())
        params = items
        c = psd_constants(epsilon, ell, rho, delta, delta_f, dim=dim)
        if kwargs.get("curvature") is not None:
            kwargs.setdefault("curvature_gamma", c.gamma)
        return cls(
            params,
            c.step_size,
            c.epsilon,
            c.radius,
            c.episode_length,
            max_episodes=c.max_episodes,
            **kwargs,
        )

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> PSDConfig:
        """The core :class:`~psd_core.perturbation.PSDConfig` of the first parameter group
        (built from ``param_groups[0]``; the groups share every value but ``lr``,
        ``maximize`` and ``step_on_perturb``)."""
        group = self.param_groups[0]
        return _config_of(group, group["lr"])

    def _group_config(self, group: dict[str, Any]) -> PSDConfig:
        """The group's config, cached on the hyperparameter values (rebuilt when a
        scheduler or the user changes one; the cache is not part of the optimizer's state)."""
        key = tuple(group[k] for k in _CONFIG_KEYS)
        cache = self.__dict__.setdefault("_config_cache", {})
        cfg = cache.get(key)
        if cfg is None:
            if len(cache) > 64:
                cache.clear()
            cfg = cache[key] = _config_of(group, 0.0)
        return cfg

    @property
    def psd_state(self) -> PSDState | None:
        """The core :class:`~psd_core.perturbation.PSDState` (``None`` before the first step)."""
        st = self.state.get("psd")
        if not st:
            return None
        return PSDState(**{k: st[k] for k in PSDState._fields})

    def _set_psd_state(self, state: PSDState) -> None:
        self.state["psd"] = dict(state._asdict())

    # ------------------------------------------------------------------ step

    def _collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], int]:
        """``(params, grads, group index of each, dim)`` of the parameters with a gradient.

        Eager, the per-tensor checks are C-level ``map`` calls (about 0.1 us per tensor
        each, against 0.3 to 0.5 us for a Python loop); under ``torch.compile`` the
        plain loop, which Dynamo traces (it cannot trace ``operator.attrgetter``).
        """
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        group_index: list[int] = []
        compiling = torch.compiler.is_compiling()
        for gi, group in enumerate(self.param_groups):
            ps = group["params"]
            if compiling:
                for p in ps:
                    g = p.grad  # (a property: read once)
                    if g is None:
                        continue
                    if g.is_sparse:
                        raise RuntimeError("PSD does not support sparse gradients")
                    params.append(real_view(p))  # complex: the real (..., 2) view (C9)
                    grads.append(real_view(g))
                    group_index.append(gi)
                continue
            gs = list(map(_GRAD, ps))
            if _NONE in map(type, gs):  # (compares types, not tensors)
                ps = [p for p, g in zip(ps, gs) if g is not None]
                gs = [g for g in gs if g is not None]
            if not gs:
                continue
            if any(map(_IS_SPARSE, gs)):
                raise RuntimeError("PSD does not support sparse gradients")
            if any(map(torch.is_complex, ps)) or any(map(torch.is_complex, gs)):
                ps, gs = list(map(real_view, ps)), list(map(real_view, gs))  # (C9)
            params.extend(ps)
            grads.extend(gs)
            group_index.extend([gi] * len(gs))
        return params, grads, group_index, total_numel(params)

    def _saddle_test(
        self, closure: Callable[[], Any], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> torch.Tensor:
        """``is_strict_saddle(lambda_min, gamma)`` at the current point (0-d bool).

        Parameters and gradients are restored afterwards (this runs only when the
        gate is open, so the copies are rare).
        """
        saved_p = [p.detach().clone() for p in params]
        saved_g = [g.detach().clone() for g in grads]

        def grad_at(x: list[torch.Tensor]) -> list[torch.Tensor]:
            for p, xi in zip(params, x):
                p.copy_(xi)
            with torch.enable_grad():
                closure()
            return [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in params
            ]

        group = self.param_groups[0]
        if group["curvature"] == "grad_diff":
            hvp = _curv.hvp_from_grad(grad_at, group["curvature_h"])
        else:

            def hvp(x: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
                for p, xi in zip(params, x):
                    p.copy_(xi)
                with torch.enable_grad():
                    loss = closure()
                    gs = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    pairs = [(g, vi) for g, vi in zip(gs, v) if g is not None]
                    dot = sum((g * vi).sum() for g, vi in pairs)
                    hv = torch.autograd.grad(dot, params, allow_unused=True)
                return [
                    h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)
                ]

        v0 = self._draw_normals(params)
        res = _curv.min_curvature(hvp, saved_p, iters=group["curvature_iters"], v0=v0)
        for p, x, g in zip(params, saved_p, saved_g):
            p.copy_(x)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        return _curv.is_strict_saddle(res.value, group["curvature_gamma"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One PSD step. ``closure`` (optional) re-evaluates the loss and its gradients;
        it is required for the curvature check."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # dim: 2 per complex scalar (``params`` holds the real views of complex ones)
        params, grads, group_index, dim = self._collect()
        if not params:
            return loss
        group0 = self.param_groups[0]
        cfg = self._group_config(group0)
        fe = resolve_foreach(group0["foreach"])
        state = self.psd_state
        if state is None:
            state = psd_init(params[0], cfg, acc_dtype=tree_acc_dtype(grads))
        dev = state.count.device
        g2 = global_sq_norm(grads, foreach=fe, device=dev)
        # The scalar layer (gate, coefficients, new state) on NumPy views where the step
        # runs eagerly on CPU: the same core code, ~1 us per 0-d op instead of ~10. The
        # views of the state written by the previous step are kept (``_host_state``).
        host = on_host(g2, *state)
        if host:
            g2 = scalars_on_host(g2)
            state = host_view_of(state, self.__dict__.get("_host_state"))
        lift = scalars_on_host if host else (lambda v: v)
        # The exact finiteness of the gradient (``tree_all_finite``), computed only when
        # the one-pass squared norm is not finite (a NaN/inf entry, or a finite gradient
        # whose square overflows, e.g. 1e20 in float32): one extra pass and host read on
        # that rare step only.
        fin_t: torch.Tensor | None = None

        saddle = None
        if group0["curvature"] is not None:
            if closure is None:
                raise RuntimeError("PSD(curvature=...) needs step(closure) to probe the curvature")
            gate = psd_gate(g2, state, cfg)
            fin, opn = host_floats(gate.finite, gate.open)
            if not fin:
                _, fin_t = safe_norm_and_finite(grads, device=dev, dtype=torch_dtype_of(g2))
                fin_t = lift(fin_t)
                gate = psd_gate(g2, state, cfg, finite=fin_t)
                fin, opn = host_floats(gate.finite, gate.open)
            if fin and opn:
                saddle = lift(self._saddle_test(closure, params, grads))
            else:
                saddle = lift(torch.zeros((), dtype=torch.bool, device=dev))

        if host:
            one = np.ones((), dtype=g2.dtype)
        else:
            one = torch.ones((), dtype=g2.dtype, device=dev)
        groups_used = sorted(set(group_index))

        def coefficients(finite: torch.Tensor | None) -> tuple[Any, list[float]]:
            coeffs, new_state = {}, None
            for gi in groups_used:
                group = self.param_groups[gi]
                c, s = psd_coefficients(
                    g2,
                    state,
                    self._group_config(group),
                    dim=dim,
                    noise_sq_norm=one,  # placeholder: only the noise coefficient depends on the draws
                    uniform=one,
                    saddle=saddle,
                    learning_rate=lr_scalar(group["lr"]),
                    finite=finite,
                )
                coeffs[gi] = c
                if new_state is None:
                    new_state = s
            c0 = coeffs[groups_used[0]]
            vals = host_floats(
                c0.finite, c0.perturb, c0.noise, *[coeffs[gi].grad for gi in groups_used]
            )
            return new_state, vals

        new_state, vals = coefficients(fin_t)
        if not vals[0] and fin_t is None:  # rare: overflow or a non-finite gradient
            _, fin_t = safe_norm_and_finite(grads, device=dev, dtype=torch_dtype_of(g2))
            fin_t = lift(fin_t)
            new_state, vals = coefficients(fin_t)
        assert new_state is not None
        finite, perturb, noise_coef = bool(vals[0]), bool(vals[1]), vals[2]
        grad_coef = dict(zip(groups_used, vals[3:]))
        if host:
            tensors, arrays = scalars_to_torch_cached(new_state)
            self._set_psd_state(tensors)
            self.__dict__["_host_state"] = (tensors, arrays)
        else:
            self._set_psd_state(new_state)
        if not finite:
            return loss  # skipped: parameters untouched, the core counted it

        normals = None
        if perturb:
            normals, uniform = self._draw(params, cfg.noise == "ball")
            if cfg.noise == "ball":
                nsq = lift(global_sq_norm(normals, foreach=fe, device=dev))
                c_real, _ = psd_coefficients(
                    g2,
                    state,
                    cfg,
                    dim=dim,
                    noise_sq_norm=nsq,
                    uniform=lift(uniform),
                    saddle=saddle,
                    learning_rate=lr_scalar(self.param_groups[groups_used[0]]["lr"]),
                    finite=fin_t,
                )
                noise_coef = host_floats(c_real.noise)[0]

        single = len(groups_used) == 1
        for gi in groups_used:
            if single:
                ps, gs, zs = params, grads, normals if normals is not None else params
            else:
                idx = [i for i, g in enumerate(group_index) if g == gi]
                ps = [params[i] for i in idx]
                gs = [grads[i] for i in idx]
                zs = [normals[i] for i in idx] if normals is not None else ps
            # maximize: ascend along g (the gate and the noise do not depend on the sign).
            a = -grad_coef[gi] if self.param_groups[gi]["maximize"] else grad_coef[gi]
            for bp, bg, bz in group_by_device_dtype(ps, gs, zs):
                # Noise first, then the gradient step (PSDTorch's order for step_on_perturb).
                if normals is not None and noise_coef != 0.0:
                    foreach_add_(bp, bz, noise_coef, foreach=fe)
                if a != 0.0:
                    foreach_add_(bp, bg, a, foreach=fe)
        return loss
