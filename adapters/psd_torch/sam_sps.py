r"""SAM / USAM with the stochastic Polyak step size as a ``torch.optim.Optimizer``.

The arguments, closure protocol and ``group['lr']`` reporting of ``sam_sps.SAM_SPS``
(``weight_decay`` defaults to ``0.0`` here; :class:`psd_torch.peers.SAM_SPS` keeps the
peer's exact signature, defaults and attributes), with the math from
:mod:`psd_core.polyak`:

* the offset scale :math:`c` with :math:`e - x = c\,g` is
  :func:`psd_core.polyak.sam_perturbation_scale`;
* the Polyak step size, the descent coefficients and the finiteness decision are
  :func:`psd_core.polyak.sam_sps_coefficients`;
* this module only computes the global reductions (``torch._foreach_norm`` and dot
  products, float32 or better), moves parameters to :math:`e` and back, and applies
  the core's coefficients in place with ``torch._foreach_*`` ops grouped by
  ``(device, dtype)`` (``foreach=False``: a per-tensor loop).

Nothing in :meth:`SAM_SPS.step`, :meth:`~SAM_SPS.first_step` or
:meth:`~SAM_SPS.second_step` reads a tensor on the host: the step size is a 0-d
tensor stored in every group's ``lr``, the skip decision is a ``torch.where``.

Extra state: one buffer per parameter (reused every step), i.e. 1x the parameter
bytes; it is not written to ``state_dict()``. What it holds is the ``restore`` option:

* ``"copy"`` (default): :math:`x` itself. Moving back is a copy, so :math:`x` is
  recovered bit-exactly (skipped steps leave the parameters untouched bit for bit,
  and DDP ranks with different per-rank offsets cannot drift apart). The inner
  product uses the offset actually applied, :math:`\mathrm{fl}(e) - x` (one
  temporary per tensor while reducing).
* ``"subtract"`` (the reference's arithmetic): the offset :math:`c\,g`; the inner
  product uses it exactly as the core and ``sam_sps.SAM_SPS`` do, and moving back
  subtracts it, which recovers :math:`x` up to one rounding. It follows the reference's
  operations, but is not bit-identical to it (the global reductions are summed in a
  different order); not allowed with ``first_pass="per_rank"``.

Per-group hyperparameters. The perturbation uses the *global* first-pass gradient
norm; a group's ``rho`` and ``lambd`` give that group's offset scale
:math:`c_k = \rho_k(1-\lambda_k+\lambda_k/\|g\|)`. The Polyak numerator and
denominator are global (loss at :math:`e`,
:math:`\sum_k\langle\nabla f(e)_k, e_k - x_k\rangle`,
:math:`\|\nabla f(e)\|^2`); a group's ``f_star``, ``gamma_b``, ``variant`` and
``weight_decay`` give that group's step size :math:`\gamma_k` and decay (so
``gamma_b`` acts as a per-group cap). With one group (the usual case) this is
exactly the published algorithm.

Passes: the moves to :math:`e` and back and the descent step run chunk by chunk
(:func:`._common.chunked`), and :math:`\|\nabla f(e)\|^2` and the inner product are
reduced in one chunked pass, so each chunk is still in cache for its next operation. On
CPU the move back and the descent step are one ``torch.addcmul(x, g, c, out=p)`` per
tensor, and the inner product writes :math:`e - x` into one reused scratch buffer (the
size of the largest chunk, kept on the optimizer and not in ``state_dict()``): 15 element
accesses per parameter and step (SGD: 3), see the PyTorch guide's Benchmark section.

Non-finite policy (the core's): when the loss at :math:`x` (if given) or at
:math:`e`, either gradient norm, or a ``GradScaler`` inf check is not finite, the
step is skipped: no perturbation is applied when the first pass is bad, the
parameters are copied back to :math:`x`, the update is exactly zero, and
:attr:`SAM_SPS.skipped` counts it. No NaN is written to parameters or state (the
non-finite gradients of a skipped step are zeroed in place).

Host reads: none on CUDA/other devices. On CPU, where a host read is free, the
finiteness flag is read to skip a masking pass (see ``_sam_helpers.sanitize_``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

from psd_core.polyak import (
    SAMSPSCoefficients,
    SAMSPSConfig,
    sam_perturbation_scale,
    sam_sps_coefficients,
    sam_sps_config,
)
from psd_core.validation import check_choice, check_int

from . import _sam_helpers as H
from ._common import (
    acc_dtype,
    check_same_across_groups,
    chunked,
    first_param,
    global_sq_norm,
    group_by_device_dtype,
    on_host,
    real_view,
    safe_norm_and_finite,
    scalars_on_host,
    scalars_to_torch,
)
from ._dtensor import dcp_compatible  # [dtensor hook]

__all__ = ["SAM_SPS"]

_HYPER = ("rho", "lambd", "f_star", "gamma_b", "weight_decay", "variant")
_GLOBAL = ("interval", "restore", "first_pass", "distributed", "foreach", "maximize")
_FIRST_PASS = ("global", "per_rank")
_KEY = "sam_sps"
"""Reserved ``optimizer.state`` key: ``{"calls": int, "count": int64, "skipped": int64}``."""
_SCRATCH = ("x", "offset", "e^t-x^t")  # per-parameter scratch (the last: sam_sps's)
_PENDING = "sam_sps_pending"
"""Reserved ``optimizer.state`` key holding the first pass's record until ``second_step``."""


def _on_host_if_cpu(fn: Callable[..., Any], *scalars: Any) -> Any:
    """``fn(*scalars)``: the core's scalar layer, on zero-copy NumPy views of the 0-d
    tensors when the step runs eagerly on CPU with plain tensors (as ``PSD`` and
    ``PerturbedAdam`` do: a 0-d NumPy op costs about a microsecond, a 0-d torch op
    several), the results turned back into CPU tensors; on torch otherwise (accelerators,
    ``torch.compile``, DTensor), where the step reads nothing on the host."""
    if on_host(*scalars):
        return scalars_to_torch(fn(*scalars_on_host(list(scalars))))
    return fn(*scalars)


# [dtensor hook] state_dict() loadable by torch.distributed.checkpoint
@dcp_compatible(marker=False)
class SAM_SPS(torch.optim.Optimizer):
    r"""SAM / USAM with the stochastic Polyak step size (Oikonomou & Loizou, 2025).

    .. math::
        e = x + \rho(1-\lambda+\lambda/\|g\|)\,g,\quad
        \gamma = \min\{[f(e)-\ell^*-\langle\nabla f(e), e-x\rangle]_+/\|\nabla f(e)\|^2,\ \gamma_b\},\quad
        x^+ = x - \gamma(\nabla f(e) + w\,x)

    Args:
        params: parameters or parameter-group dicts (groups may override ``rho``,
            ``lambd``, ``f_star``, ``gamma_b``, ``weight_decay`` and ``variant``; the
            other options shape the whole step and must be equal in every group, else
            ``ValueError``).
        weight_decay: L2 coefficient :math:`w \ge 0` in the descent step (the step size
            is computed from the unregularized loss, as published). Default ``0.0``
            (``sam_sps.SAM_SPS`` defaults to ``5e-4``: use
            :class:`psd_torch.peers.SAM_SPS` for its exact defaults).
        rho: perturbation radius :math:`\rho \ge 0`; ``0`` gives SPS_max.
        lambd: :math:`\lambda\in[0,1]`; ``0`` USAM, ``1`` SAM.
        f_star: lower bound :math:`\ell^*` of the mini-batch loss.
        gamma_b: upper bound :math:`\gamma_b \ge 0` of the step size.
        variant: ``"sps+"`` (the paper, numerator clipped at 0) or ``"sps"``.
        interval: perturb every ``interval``-th step; the other steps are plain
            SPS_max steps with one gradient evaluation (``1``: every step).
        restore: ``"copy"`` or ``"subtract"`` (see the module docstring).
        first_pass: with DDP, ``"global"`` (default) perturbs along the all-reduced
            first-pass gradient; ``"per_rank"`` along each rank's own gradient, the
            first pass then running under ``model.no_sync()`` (see
            :meth:`first_pass`).
        distributed: all-reduce the scalars of the step size (loss at :math:`e`, the
            inner product, the first-pass finiteness flag) over ``process_group`` so
            that every rank takes the same step. ``None`` (default): when
            ``torch.distributed`` is initialized with more than one process.
        process_group: the group for that reduction (default: the world).
        foreach: ``None``/``True`` use ``torch._foreach_*`` ops; ``False`` a loop.
        maximize: only ``False`` (accepted for ``torch.optim`` compatibility; the Polyak
            step needs a lower bound of the loss, so maximize :math:`f` by minimizing
            :math:`-f`).

    Every option is in ``defaults`` / ``param_groups`` and the counters are in
    ``optimizer.state["sam_sps"]``, so ``copy.deepcopy``, ``pickle``, ``torch.save(opt)``
    and ``load_state_dict`` carry the whole optimizer (``process_group`` excepted: it
    falls back to the default group after unpickling).
    """

    def __init__(
        self,
        params: Iterable[Any],
        weight_decay: float = 0.0,
        rho: float = 0.1,
        lambd: float = 1.0,
        f_star: float = 0.0,
        gamma_b: float = 1.0,
        *,
        variant: str = "sps+",
        interval: int = 1,
        restore: str = "copy",
        first_pass: str = "global",
        distributed: bool | None = None,
        process_group: Any = None,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params must be an iterable of Tensors or dicts, got a single "
                f"{torch.typename(params)}"
            )
        params = list(params)
        if not params:
            raise ValueError("params: SAM_SPS got an empty parameter list")
        defaults = dict(
            rho=rho,
            lambd=lambd,
            f_star=f_star,
            gamma_b=gamma_b,
            weight_decay=weight_decay,
            variant=variant,
            interval=interval,
            restore=restore,
            first_pass=first_pass,
            distributed=distributed,
            foreach=foreach,
            maximize=maximize,
        )
        defaults.update(self._validate(defaults))
        defaults["lr"] = defaults["gamma_b"]
        # Not picklable in general (a ProcessGroup): an attribute; after deepcopy/unpickling
        # the reduction falls back to the default (world) group.
        self._process_group = process_group
        super().__init__(params, defaults)
        anchor = first_param(self)
        dev = anchor.device if anchor is not None else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        # Global counters live in ``optimizer.state`` (deepcopy, pickle and state_dict see
        # them); created eagerly so that a compiled step finds them on its first call.
        self.state[_KEY] = {"calls": 0, "count": zero, "skipped": zero.clone()}

    @staticmethod
    def _validate(group: dict[str, Any]) -> dict[str, Any]:
        cfg = sam_sps_config(*(group[k] for k in _HYPER))
        out = dict(cfg._asdict())
        out["interval"] = check_int("interval", group["interval"], 1)
        out["first_pass"] = check_choice("first_pass", group["first_pass"], _FIRST_PASS)
        out["restore"] = check_choice("restore", group["restore"], ("copy", "subtract"))
        if out["restore"] == "subtract" and out["first_pass"] == "per_rank":
            raise ValueError(
                "restore: 'subtract' recovers x only up to a rounding, so ranks with "
                "per-rank offsets would drift apart; use restore='copy' with "
                "first_pass='per_rank'"
            )
        d = group["distributed"]
        if d is not None and not isinstance(d, bool):
            raise TypeError(f"distributed must be a bool or None, got {d!r}")
        f = group["foreach"]
        if f is not None and not isinstance(f, bool):
            raise TypeError(f"foreach must be a bool or None, got {f!r}")
        if group["maximize"] is not False:
            raise ValueError(
                f"Invalid maximize: {group['maximize']!r} (SAM_SPS minimizes: the Polyak step "
                "needs a lower bound f_star of the loss; to maximize f, minimize -f)"
            )
        return out

    # ------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it may override ``rho``, ``lambd``, ``f_star``, ``gamma_b``,
        ``weight_decay`` and ``variant``. ``interval``, ``restore``, ``first_pass``,
        ``distributed``, ``foreach`` and ``maximize`` shape the whole two-pass step and
        must equal the first group's (``ValueError`` otherwise)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.update(self._validate(group))
        check_same_across_groups(self, _GLOBAL, "shapes the whole two-pass step")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # sam_sps / pre-0.2 checkpoints: lr, weight_decay
            for k, v in self.defaults.items():
                if k != "differentiable":  # added by torch's __setstate__
                    group.setdefault(k, v)
        if _KEY not in self.state:
            anchor = first_param(self)
            dev = anchor.device if anchor is not None else torch.device("cpu")
            zero = torch.zeros((), dtype=torch.int64, device=dev)
            self.state[_KEY] = {"calls": 0, "count": zero, "skipped": zero.clone()}

    @staticmethod
    def _config(group: dict[str, Any]) -> SAMSPSConfig:
        return SAMSPSConfig(*(group[k] for k in _HYPER))

    # Global options, read from the first group (equal in every group).
    @property
    def interval(self) -> int:
        return self.param_groups[0]["interval"]

    @property
    def restore(self) -> str:
        return self.param_groups[0]["restore"]

    @property
    def first_pass_mode(self) -> str:
        return self.param_groups[0]["first_pass"]

    @property
    def distributed(self) -> bool | None:
        return self.param_groups[0]["distributed"]

    @property
    def foreach(self) -> bool:
        f = self.param_groups[0]["foreach"]
        return True if f is None else bool(f)

    @property
    def process_group(self) -> Any:
        return self.__dict__.get("_process_group")

    def _anchor(self) -> torch.Tensor:
        p = first_param(self)
        assert p is not None
        return p

    def _acc_dtype(self) -> torch.dtype:
        # Memoized per dtype (``acc_dtype``): this runs twice per step.
        dts = {acc_dtype(p.dtype) for g in self.param_groups for p in g["params"]}
        return torch.float64 if torch.float64 in dts else torch.float32

    @property
    def _counters(self) -> dict[str, Any]:
        return self.state[_KEY]

    def _world(self) -> int:
        if self.distributed is False:
            return 1
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.distributed:
                raise RuntimeError(
                    "SAM_SPS(distributed=True) but torch.distributed is not initialized"
                )
            return 1
        return dist.get_world_size(self.process_group)

    # ------------------------------------------------------------ step hooks
    def _fire_pre_hooks(self) -> None:
        """The step pre-hooks, for the two-pass API (``step()`` fires them itself)."""
        if self.__dict__.get("_in_step"):
            return
        for hook in chain(_global_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})

    def _fire_post_hooks(self) -> None:
        if self.__dict__.get("_in_step"):
            return
        for hook in chain(self._optimizer_step_post_hooks.values(), _global_post_hooks.values()):
            hook(self, (), {})

    # ------------------------------------------------------------ public read-outs
    @property
    def step_size(self) -> Any:
        """The last Polyak step size of the first group (a 0-d tensor after the first
        step; reading it with ``float()``/``.item()`` is the caller's sync)."""
        return self.param_groups[0]["lr"]

    @property
    def steps(self) -> torch.Tensor:
        """Number of steps taken (not skipped), a 0-d int64 tensor."""
        return self._counters["count"]

    @property
    def skipped(self) -> torch.Tensor:
        """Number of skipped (non-finite) steps, a 0-d int64 tensor."""
        return self._counters["skipped"]

    @property
    def perturbs_next(self) -> bool:
        """Whether the next step perturbs (host-side: follows ``interval``)."""
        return self._counters["calls"] % self.interval == 0

    # ------------------------------------------------------------ pass helpers
    def first_pass(self, model: nn.Module | None = None) -> Any:
        """Context for the first forward/backward: ``model.no_sync()`` when
        ``first_pass="per_rank"``, ``model`` has ``no_sync`` (DDP) and this step
        perturbs; otherwise a no-op."""
        if (
            model is not None
            and self.first_pass_mode == "per_rank"
            and self.perturbs_next
            and hasattr(model, "no_sync")
        ):
            return model.no_sync()
        return nullcontext()

    def second_pass(self, model: nn.Module | None = None) -> Any:
        """Context for the second forward/backward: the running statistics of every
        BatchNorm module of ``model`` are saved on entry and restored on exit, so
        only the first pass updates them. ``model=None``: a no-op (the reference
        behaviour, where both passes update them)."""
        return H.frozen_running_stats(model)

    # ------------------------------------------------------------ closure API
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        model: nn.Module | None = None,
        scaler: Any = None,
    ) -> Any:
        """One SAM-SPS step; ``closure`` computes the loss and calls ``backward()``
        (gradients are zeroed by the optimizer before each pass). Returns the loss at
        the perturbed point (at ``x`` on a non-perturbing ``interval`` step).

        ``model``: enables :meth:`first_pass` (DDP ``no_sync``) and :meth:`second_pass`
        (BatchNorm protection). ``scaler``: a ``torch.amp.GradScaler``; the closure
        must then call ``scaler.scale(loss).backward()`` and return the *unscaled*
        loss; call ``scaler.update()`` after the step.
        """
        if closure is None:
            raise ValueError(
                "closure: SAM_SPS.step() needs a closure (or use first_step()/second_step())"
            )
        closure = torch.enable_grad()(closure)
        self.__dict__["_in_step"] = True  # step() fires the step hooks itself
        try:
            self.zero_grad(set_to_none=True)
            with self.first_pass(model):
                loss = closure()
            if not self.first_step(loss, scaler=scaler):
                return loss
            with self.second_pass(model):
                loss_e = closure()
            self.second_step(loss_e, scaler=scaler)
        finally:
            self.__dict__["_in_step"] = False
        return loss_e

    # ------------------------------------------------------------ two-pass API
    def _grad_lists(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        out = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("SAM_SPS does not support sparse gradients")
            out.append((group, ps, [real_view(p.grad) for p in ps]))
        return out

    @staticmethod
    def _norm_and_finite(
        grads: list[torch.Tensor], g2: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(||g|| or None, finite)`` for the core: when the one-pass squared norm is not
        finite on CPU (where reading it is free), the overflow-safe norm and the exact
        finiteness (:func:`._common.safe_norm_and_finite`), so that a finite gradient of
        1e20 in float32 is not skipped. On other devices and under ``torch.compile`` the
        step stays free of host reads and the one-pass check decides (a squared norm that
        overflows skips)."""
        ok = torch.isfinite(g2)
        cpu_eager = g2.device.type == "cpu" and not torch.compiler.is_compiling()
        if cpu_eager and not bool(ok):
            return safe_norm_and_finite(grads, device=g2.device, dtype=g2.dtype)
        return None, ok

    @property
    def _key(self) -> str:
        return "x" if self.restore == "copy" else "offset"

    def _buffers(self, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        bufs = []
        key = self._key
        for p in ps:
            st = self.state[p]
            if key not in st:
                st[key] = torch.empty_like(p, memory_format=torch.preserve_format)
            bufs.append(st[key])
        return bufs

    def _loss_scalar(self, loss: Any, like: torch.Tensor) -> torch.Tensor:
        if loss is None:
            raise ValueError(
                "loss: SAM_SPS needs the loss value (the Polyak step size is computed from "
                "it), but the closure returned None"
            )
        if isinstance(loss, torch.Tensor):
            return loss.detach().reshape(()).to(device=like.device, dtype=like.dtype)
        return torch.as_tensor(float(loss), dtype=like.dtype, device=like.device)

    def _all_reduce_mean(self, values: list[torch.Tensor], world: int) -> list[torch.Tensor]:
        """Mean over ranks of a few 0-d tensors, in one collective."""
        import torch.distributed as dist

        packed = torch.stack(values)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
        packed = packed / world
        return list(packed.unbind(0))

    @torch.no_grad()
    def first_step(self, loss: Any = None, *, scaler: Any = None) -> bool:
        """After the first backward (gradients at :math:`x`).

        On a perturbing step: saves :math:`x`, moves the parameters to
        :math:`e = x + c\\,g` (``c`` from
        :func:`psd_core.polyak.sam_perturbation_scale`), sets every gradient to ``None`` and returns ``True``: run the
        second forward/backward, then :meth:`second_step`. On a non-perturbing
        ``interval`` step: takes the SPS_max step from ``loss`` (required then) and
        returns ``False``.

        ``loss``: the (unscaled, accumulated) loss at :math:`x`; optional on
        perturbing steps, where it only feeds the non-finite check.
        ``scaler``: a ``torch.amp.GradScaler`` whose scaled loss was backpropagated;
        the gradients are unscaled here (unless ``scaler.unscale_(opt)`` was already
        called, e.g. for clipping).
        """
        if _PENDING in self.state:
            raise RuntimeError("first_step() called twice without second_step()")
        lists = self._grad_lists()
        grads = [g for _, _, gs in lists for g in gs]
        if not grads:  # no parameter has a gradient: a no-op, like torch.optim's step()
            self._fire_pre_hooks()
            self._fire_post_hooks()
            return False
        self._fire_pre_hooks()
        anchor = self._anchor()
        acc = self._acc_dtype()
        like = torch.zeros((), dtype=acc, device=anchor.device)
        found = H.scaler_found_inf(scaler, self, anchor.device)
        g2 = global_sq_norm(grads, foreach=self.foreach, device=anchor.device, dtype=acc)
        # ||g|| of the first pass (sam_sps's ``grad_norm`` attribute; 0-d, no host read;
        # 0 when not finite: nothing non-finite is written to the state).
        gnorm, ok = self._norm_and_finite(grads, g2)
        gn = (g2.sqrt() if gnorm is None else gnorm).clamp_min(1e-12)
        gn = torch.where(torch.isfinite(gn), gn, torch.zeros_like(gn))
        self.state[_KEY] = {**self._counters, "grad_norm": gn}
        if loss is not None:
            ok = ok & torch.isfinite(self._loss_scalar(loss, like))
        if found is not None:
            ok = ok & (found == 0)

        if not self.perturbs_next:
            if loss is None:
                raise ValueError(
                    "loss: first_step() needs the loss on a non-perturbing step (interval > 1)"
                )
            self._plain_step(lists, self._loss_scalar(loss, like), g2, ok, gnorm)
            self._advance_calls()
            self._fire_post_hooks()
            return False

        for group, ps, gs in lists:
            if not ps:
                continue
            # c = rho (1 - lambda + lambda / ||g||) in the accumulation dtype (C3)
            c = _on_host_if_cpu(
                lambda g2, gnorm, rho=group["rho"], lambd=group["lambd"]: sam_perturbation_scale(
                    g2, rho, lambd, grad_norm=gnorm
                ),
                g2,
                gnorm,
            )
            c = torch.where(ok, c, torch.zeros_like(c))
            bufs = [real_view(b) for b in self._buffers(ps)]
            rps = [real_view(p) for p in ps]
            for bp, bb, bg in group_by_device_dtype(rps, bufs, gs):
                d, dt = bp[0].device, bp[0].dtype
                H.sanitize_(bg, ok.to(device=d))  # these gradients are discarded next
                if acc_dtype(dt) != dt:
                    # float16/bfloat16: the offset c g in float32, cast once (c itself may
                    # exceed the 16-bit range when ||g|| < rho / 65504; issue 11, bug 4)
                    c_a = c.to(device=d, dtype=acc_dtype(dt))
                    for cp, cb, cg in chunked(bp, bb, bg):
                        off = [(g.to(c_a.dtype) * c_a).to(dt) for g in cg]
                        if self.restore == "copy":
                            H.copy_(cb, cp, self.foreach)  # save x
                            H.add_(cp, off, self.foreach)  # x -> e
                        else:
                            H.copy_(cb, off, self.foreach)  # offset c g
                            H.add_(cp, cb, self.foreach)  # x -> e
                    continue
                c_d = c.to(device=d, dtype=dt)
                # Chunk by chunk, so that each chunk is still in cache for its second op.
                for cp, cb, cg in chunked(bp, bb, bg):
                    if self.restore == "copy":
                        H.copy_(cb, cp, self.foreach)  # save x
                        H.addcmul_(cp, cg, c_d, self.foreach)  # x -> e
                    else:
                        H.copy_(cb, cg, self.foreach)
                        H.mul_(cb, c_d, self.foreach)  # offset c g
                        H.add_(cp, cb, self.foreach)  # x -> e
        self.zero_grad(set_to_none=True)
        H.scaler_reset(scaler, self)
        self.state[_PENDING] = {
            "ok": ok,
            "found": found,
            "params": [(group, ps) for group, ps, _ in lists],
        }
        return True

    @torch.no_grad()
    def second_step(self, loss: Any, *, scaler: Any = None) -> torch.Tensor:
        """After the second backward (gradients at :math:`e`, same batch).

        Computes :math:`\\langle\\nabla f(e), e-x\\rangle` and
        :math:`\\|\\nabla f(e)\\|^2`, gets the step size and coefficients from
        :func:`psd_core.polyak.sam_sps_coefficients`, copies the parameters back to
        :math:`x` and applies :math:`x \\mathrel{+}= -\\gamma\\nabla f(e) - \\gamma w x`
        in place (zero when the step is skipped). ``loss``: the (unscaled,
        accumulated) loss at :math:`e`. Returns the step size of the first group (0-d).
        """
        pending = self.state.get(_PENDING)
        if pending is None:
            raise RuntimeError("second_step() called without first_step()")
        del self.state[_PENDING]
        if loss is None:  # move back to x before refusing (no half-done step)
            for _, ps in pending["params"]:
                if ps:
                    bufs = [real_view(self.state[p][self._key]) for p in ps]
                    for bp, bb in group_by_device_dtype([real_view(p) for p in ps], bufs):
                        self._restore_(bp, bb)
            self._loss_scalar(None, self._anchor())  # raises ValueError naming the loss
        anchor = self._anchor()
        acc = self._acc_dtype()
        dev = anchor.device
        like = torch.zeros((), dtype=acc, device=dev)
        found2 = H.scaler_found_inf(scaler, self, dev)

        # Gradients at e; a parameter perturbed in the first pass without a gradient
        # now is moved back and left alone.
        per_group = []
        all_ge: list[torch.Tensor] = []
        all_e: list[torch.Tensor] = []
        all_x: list[torch.Tensor] = []
        for group, ps in pending["params"]:
            bufs = [self.state[p][self._key] for p in ps]
            with_g = [
                (real_view(p), real_view(b), real_view(p.grad))
                for p, b in zip(ps, bufs)
                if p.grad is not None
            ]
            per_group.append((group, ps, bufs, with_g))
            all_ge.extend(g for _, _, g in with_g)
            all_e.extend(p for p, _, _ in with_g)
            all_x.extend(b for _, b, _ in with_g)
        if all_ge:
            # ||g_e||^2 and <g_e, e - x> (copy) or <g_e, offset> (subtract) in one pass
            ge2, inner = H.sq_norm_and_dot(
                all_ge,
                all_e,
                all_x,
                acc,
                dev,
                diff=self.restore == "copy",
                foreach=self.foreach,
                scratch=self.__dict__.setdefault("_scratch", {}),
            )
        else:
            ge2 = torch.full((), float("nan"), dtype=acc, device=dev)
            inner = torch.zeros((), dtype=acc, device=dev)
        loss_e = self._loss_scalar(loss, like)
        ge_norm, ge_fin = (None, None)
        if all_ge:
            ge_norm, ge_fin = self._norm_and_finite(all_ge, ge2)
        ok1 = pending["ok"]
        world = self._world()
        if world > 1:
            bad1 = (~ok1).to(acc)
            loss_e, inner, bad1 = self._all_reduce_mean([loss_e, inner, bad1], world)
            ok1 = bad1 == 0
        if found2 is not None:
            ok1 = ok1 & (found2 == 0)

        cache: dict[SAMSPSConfig, SAMSPSCoefficients] = {}
        first: SAMSPSCoefficients | None = None
        for group, ps, bufs, with_g in per_group:
            cfg = self._config(group)
            if cfg not in cache:
                cache[cfg] = _on_host_if_cpu(
                    lambda loss_e, ge2, inner, ok1, ge_norm, ge_fin, cfg=cfg: sam_sps_coefficients(
                        loss_e,
                        ge2,
                        inner,
                        cfg,
                        extra_finite=ok1,
                        grad_e_norm=ge_norm,
                        finite=ge_fin,
                    ),
                    loss_e,
                    ge2,
                    inner,
                    ok1,
                    ge_norm,
                    ge_fin,
                )
            co = cache[cfg]
            first = co if first is None else first
            group["lr"] = co.step_size
            if len(with_g) < len(ps):  # perturbed without a gradient now: only moved back
                gone = [(real_view(p), real_view(b)) for p, b in zip(ps, bufs) if p.grad is None]
                for bp, bb in group_by_device_dtype(*map(list, zip(*gone))):
                    self._restore_(bp, bb)
            if with_g:
                # Moving back and the descent step, fused chunk by chunk.
                self._descend(
                    [p for p, _, _ in with_g],
                    [g for _, _, g in with_g],
                    co,
                    cfg,
                    saved=[b for _, b, _ in with_g],
                )
        assert first is not None
        self._finish(first.finite)
        if pending["found"] is not None:
            H.scaler_merge_found_inf(scaler, self, pending["found"])
        self._advance_calls()
        self._fire_post_hooks()
        return first.step_size

    # ------------------------------------------------------------ shared pieces
    def _restore_(self, ps: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
        """Move the parameters back to ``x`` from the ``x``/``offset`` buffers."""
        if self.restore == "copy":
            H.copy_(ps, saved, self.foreach)  # back to x, bit-exactly
        else:
            H.sub_(ps, saved, self.foreach)  # back to x, up to a rounding

    def _descend(
        self,
        ps: list[torch.Tensor],
        gs: list[torch.Tensor],
        co: SAMSPSCoefficients,
        cfg: SAMSPSConfig,
        saved: list[torch.Tensor] | None = None,
    ) -> None:
        """``x += co.params * x + co.grad * g`` in place; ``g`` is zeroed first when
        the step is skipped so that the update is exactly zero. With ``saved`` (the
        ``x``/``offset`` buffers), each chunk is first moved back to ``x`` (chunk by
        chunk, so the three passes over a chunk hit the cache)."""
        lists = [ps, gs] if saved is None else [ps, gs, saved]
        for bucket in group_by_device_dtype(*lists):
            bp, bg = bucket[0], bucket[1]
            d, dt = bp[0].device, bp[0].dtype
            H.sanitize_(bg, co.finite.to(device=d))
            c_p = co.params.to(device=d, dtype=dt)
            c_g = co.grad.to(device=d, dtype=dt)
            # CPU, restore="copy": the parameters are written straight from the saved
            # ``x`` with ``out=`` (same values as copying back, then ``p += c_p * p`` and
            # ``p += c_g * g``; without weight decay the whole restore-and-descend is one
            # pass that reads ``x`` and ``g`` and writes ``p`` once). Per tensor: on CPU
            # foreach ops are a loop anyway. Other devices: foreach copy, then foreach
            # ``addcmul_`` (a few kernel launches instead of one per tensor).
            from_x = saved is not None and self.restore == "copy" and d.type == "cpu"
            decay = cfg.weight_decay != 0.0
            for chunk in chunked(*bucket):
                cp, cg = chunk[0], chunk[1]
                if from_x and not decay and (len(cp) == 1 or not self.foreach):
                    for p, x, g in zip(cp, chunk[2], cg):
                        torch.addcmul(x, g, c_g, out=p)
                    continue
                if from_x and not decay:
                    # several small tensors (the chunk is cache-sized): two foreach
                    # kernels instead of one launch per tensor
                    H.copy_(cp, chunk[2], True)
                    H.addcmul_(cp, cg, c_g, True)
                    continue
                if from_x:
                    for p, x in zip(cp, chunk[2]):
                        torch.addcmul(x, x, c_p, out=p)
                else:
                    if saved is not None:
                        self._restore_(cp, chunk[2])
                    if decay:
                        H.addcmul_(cp, cp, c_p, self.foreach)
                H.addcmul_(cp, cg, c_g, self.foreach)

    def _finish(self, finite: torch.Tensor) -> None:
        c = self._counters
        f = finite.to(c["count"].device)
        # A new dict with new tensors: earlier state_dict() snapshots stay valid.
        self.state[_KEY] = {
            **c,
            "count": c["count"] + f.to(torch.int64),
            "skipped": c["skipped"] + (~f).to(torch.int64),
        }

    def _advance_calls(self) -> None:
        c = self._counters
        self.state[_KEY] = {**c, "calls": int(c["calls"]) + 1}

    def _plain_step(
        self,
        lists: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]],
        loss_x: torch.Tensor,
        g2: torch.Tensor,
        ok: torch.Tensor,
        gnorm: torch.Tensor | None = None,
    ) -> None:
        """SPS_max step at ``x`` (inner product 0) on a non-perturbing step (``gnorm``:
        the overflow-safe ``||g||`` when the squared norm overflowed)."""
        world = self._world()
        acc = g2.dtype
        if world > 1:
            bad = (~ok).to(acc)
            loss_x, bad = self._all_reduce_mean([loss_x, bad], world)
            ok = bad == 0
        inner = torch.zeros((), dtype=acc, device=g2.device)
        cache: dict[SAMSPSConfig, SAMSPSCoefficients] = {}
        first: SAMSPSCoefficients | None = None
        for group, ps, gs in lists:
            cfg = self._config(group)
            if cfg not in cache:
                cache[cfg] = sam_sps_coefficients(
                    loss_x, g2, inner, cfg, extra_finite=ok, grad_e_norm=gnorm, finite=ok
                )
            co = cache[cfg]
            first = co if first is None else first
            group["lr"] = co.step_size
            if ps:
                self._descend([real_view(p) for p in ps], gs, co, cfg)
        assert first is not None
        self._finish(first.finite)

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict; the step counters are its ``state["sam_sps"]``
        entry, the ``x``/``offset`` buffers are scratch between steps and are left out."""
        if _PENDING in self.state:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): finish the step first"
            )
        sd = super().state_dict()
        state = {}
        for k, v in sd["state"].items():
            if isinstance(k, int) and isinstance(v, dict):
                v = {kk: vv for kk, vv in v.items() if kk not in _SCRATCH}
                if not v:
                    continue
            state[k] = v
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our checkpoints (also those before 0.2, with a top-level ``"sam_sps"``
        entry) and ``sam_sps.SAM_SPS`` checkpoints (``lr`` and ``weight_decay`` per
        group; the other hyperparameters keep this optimizer's values)."""
        state_dict = dict(state_dict)
        legacy = state_dict.pop("sam_sps", None)
        super().load_state_dict(state_dict)
        dev = self._anchor().device
        for group in self.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"].to(dev)
        for p, st in self.state.items():
            if isinstance(p, torch.Tensor):
                for k in _SCRATCH:
                    st.pop(k, None)
        self.state.pop(_PENDING, None)
        extra = legacy if legacy is not None else self.state.get(_KEY)
        if extra is None:
            extra = {"calls": 0, "count": torch.zeros((), dtype=torch.int64)}
            extra["skipped"] = extra["count"]
        self.state[_KEY] = {
            "calls": int(extra["calls"]),
            "count": extra["count"].to(device=dev, dtype=torch.int64).clone(),
            "skipped": extra["skipped"].to(device=dev, dtype=torch.int64).clone(),
        }
