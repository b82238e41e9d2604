"""Peer-exact compatibility classes: the constructor signatures, defaults and public
attributes of the published optimizers, on this package's classes (the math stays in
:mod:`psd_core`).

* :class:`SAM_SPS` -- ``sam_sps.SAM_SPS(params, weight_decay=5e-4, rho=0.1, lambd=1.0,
  f_star=0.0, gamma_b=1.0)`` with its attributes ``rho``, ``lambd``, ``f_star``,
  ``gamma_b``, ``grad_norm`` and the reference's arithmetic (``restore="subtract"``);
  loads ``sam_sps.SAM_SPS`` checkpoints.
* :class:`PerturbedAdam` -- psd-optimizer's ``PerturbedAdam(params, lr=1e-3, betas=(0.9,
  0.999), eps=1e-8, g_thres=1e-3, t_thres=10, r=1e-3)``; loads its checkpoints (the
  per-parameter ``step``, ``t``, ``t_noise`` become the global counters).
* :class:`PSDTorch` -- psd's ``PSDTorch(params, lr=1e-3, g_thres=1e-3, t_thres=10,
  r=1e-3, max_grad_norm=1.0)``: Gaussian noise, the gradient step also on the
  perturbing call, gradients clipped to ``max_grad_norm`` first.
* :class:`PSDOptimizer` -- psd-optimizer's closure-based ``PSDOptimizer(params, lr=1e-3,
  epsilon=1e-3, r=1e-3, T=10, max_grad_norm=1.0)``: ``step(closure)`` runs a whole escape
  episode (the perturbation, then ``T`` gradient steps, each re-evaluating the closure).

What is not the same as the peers: the noise comes from the optimizer's own seeded
generator (the peers draw from PyTorch's global generator), the gate is global over all
groups, and a non-finite gradient skips the step (the psd peers halve ``lr`` instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .perturbed_adam import PerturbedAdam as _PerturbedAdam
from .psd import PSD
from .sam_sps import SAM_SPS as _SAM_SPS

__all__ = ["PSDOptimizer", "PSDTorch", "PerturbedAdam", "SAM_SPS"]


class SAM_SPS(_SAM_SPS):
    """``sam_sps.SAM_SPS``'s exact signature, defaults (``weight_decay=5e-4``) and public
    attributes, with the reference's arithmetic (``restore="subtract"``)."""

    def __init__(
        self,
        params: Iterable[Any],
        weight_decay: float = 5e-4,
        rho: float = 0.1,
        lambd: float = 1.0,
        f_star: float = 0.0,
        gamma_b: float = 1.0,
    ) -> None:
        super().__init__(
            params,
            weight_decay=weight_decay,
            rho=rho,
            lambd=lambd,
            f_star=f_star,
            gamma_b=gamma_b,
            restore="subtract",
        )

    # The peer's attributes: read from the first group, where this class keeps them;
    # assigning one (as the peer's users do, e.g. to schedule rho) sets it in every group
    # (the peer's attribute is one value for all groups), validated like the constructor.
    def _set_everywhere(self, key: str, value: float) -> None:
        old = [g[key] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g[key] = value
                g.update(self._validate(g))
        except (TypeError, ValueError):
            for g, v in zip(self.param_groups, old):
                g[key] = v
            raise

    @property
    def rho(self) -> float:
        return self.param_groups[0]["rho"]

    @rho.setter
    def rho(self, value: float) -> None:
        self._set_everywhere("rho", value)

    @property
    def lambd(self) -> float:
        return self.param_groups[0]["lambd"]

    @lambd.setter
    def lambd(self, value: float) -> None:
        self._set_everywhere("lambd", value)

    @property
    def f_star(self) -> float:
        return self.param_groups[0]["f_star"]

    @f_star.setter
    def f_star(self, value: float) -> None:
        self._set_everywhere("f_star", value)

    @property
    def gamma_b(self) -> float:
        return self.param_groups[0]["gamma_b"]

    @gamma_b.setter
    def gamma_b(self, value: float) -> None:
        self._set_everywhere("gamma_b", value)

    @property
    def grad_norm(self) -> torch.Tensor:
        """:math:`\\max(\\|g\\|, 10^{-12})` of the last first pass (``tensor(0.)`` before)."""
        return self.state["sam_sps"].get("grad_norm", torch.tensor(0.0))


class PerturbedAdam(_PerturbedAdam):
    """psd-optimizer's ``PerturbedAdam`` signature and defaults (without the keyword-only
    extras); loads its checkpoints like :class:`psd_torch.PerturbedAdam` does."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        g_thres: float = 1e-3,
        t_thres: int = 10,
        r: float = 1e-3,
    ) -> None:
        super().__init__(params, lr, betas, eps, g_thres, t_thres, r)


def _clip(optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
    if max_grad_norm is None:
        return
    ps = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if ps:
        torch.nn.utils.clip_grad_norm_(ps, max_grad_norm)


class PSDTorch(PSD):
    """psd's ``PSDTorch(params, lr, g_thres, t_thres, r, max_grad_norm)`` on :class:`PSD`:
    Gaussian noise of standard deviation ``r``, the gradient step also on the perturbing
    call, a perturbation needs more than ``t_thres`` steps since the last one, gradients
    clipped to ``max_grad_norm`` (``None``: no clipping) before the gate."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        g_thres: float = 1e-3,
        t_thres: int = 10,
        r: float = 1e-3,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0 or None)")
        super().__init__(
            params,
            lr,
            g_thres,
            r,
            0,
            t_thres=t_thres,
            noise="gaussian",
            step_on_perturb=True,
        )
        self.defaults["max_grad_norm"] = max_grad_norm
        for group in self.param_groups:
            group.setdefault("max_grad_norm", max_grad_norm)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _clip(self, self.param_groups[0].get("max_grad_norm"))
        super().step()
        return loss


class PSDOptimizer(PSD):
    """psd-optimizer's closure-based ``PSDOptimizer(params, lr=1e-3, epsilon=1e-3, r=1e-3,
    T=10, max_grad_norm=1.0)``: each ``step(closure)`` evaluates the closure; below the
    gate it perturbs (Gaussian, standard deviation ``r``) and runs the ``T`` episode steps
    inside the same call, re-evaluating the closure before each. Returns the last loss."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        epsilon: float = 1e-3,
        r: float = 1e-3,
        T: int = 10,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"Invalid lr: {lr!r} (must be > 0)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0 or None)")
        super().__init__(params, lr, epsilon, r, T, noise="gaussian")
        self.defaults["max_grad_norm"] = max_grad_norm
        for group in self.param_groups:
            group.setdefault("max_grad_norm", max_grad_norm)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("PSDOptimizer requires a closure (optimizer.step(closure))")
        clip = self.param_groups[0].get("max_grad_norm")
        with torch.enable_grad():
            loss = closure()
        _clip(self, clip)
        super().step()  # the gate: a gradient step, or the perturbation
        state = self.psd_state
        if state is None or not bool(state.perturbed):
            return loss
        for _ in range(int(state.episode_left)):  # the episode, inside this call
            with torch.enable_grad():
                loss = closure()
            _clip(self, clip)
            super().step()
        return loss
