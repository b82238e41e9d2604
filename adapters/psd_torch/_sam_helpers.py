"""Private helpers of :class:`psd_torch.SAM_SPS` (data movement only; no math).

* in-place primitives with a ``foreach`` switch (per-tensor fallback);
* global dot products accumulated in float32 or better (the core's
  :func:`~psd_core._array.accumulation_dtype`), without reading anything on the
  host (the ``(device, dtype)`` grouping and the global squared norm are shared with
  the other optimizers in :mod:`._common`);
* ``torch.amp.GradScaler`` bookkeeping for the two backward passes of one step;
* saving / restoring BatchNorm running statistics around the second pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import _dtensor as _dt  # [dtensor hook]
from ._common import (
    _DOT_MIN_NUMEL,
    CHUNK_NUMEL,
    acc_dtype,
    chunked,
    group_by_device_dtype,
    sq_norms,
)

__all__ = [
    "addcmul_",
    "add_",
    "copy_",
    "frozen_running_stats",
    "global_dot",
    "global_dot_diff",
    "mul_",
    "sanitize_",
    "scaler_found_inf",
    "scaler_merge_found_inf",
    "scaler_reset",
    "sq_norm_and_dot",
    "sub_",
]


# ---------------------------------------------------------------- in-place primitives
def mul_(xs: list[torch.Tensor], c: torch.Tensor, foreach: bool) -> None:
    """``x *= c`` (0-d tensor ``c``)."""
    if foreach:
        torch._foreach_mul_(xs, c)
    else:
        for x in xs:
            x.mul_(c)


def add_(xs: list[torch.Tensor], ys: list[torch.Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_add_(xs, ys)
    else:
        for x, y in zip(xs, ys):
            x.add_(y)


def sub_(xs: list[torch.Tensor], ys: list[torch.Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_sub_(xs, ys)
    else:
        for x, y in zip(xs, ys):
            x.sub_(y)


def addcmul_(
    xs: list[torch.Tensor], ys: list[torch.Tensor], c: torch.Tensor, foreach: bool
) -> None:
    """``x += c * y`` with a 0-d tensor ``c`` (no host read, no temporary)."""
    if foreach:
        torch._foreach_addcmul_(xs, ys, [c] * len(xs))
    else:
        for x, y in zip(xs, ys):
            x.addcmul_(y, c)


def copy_(xs: list[torch.Tensor], ys: list[torch.Tensor], foreach: bool) -> None:
    if foreach and not _dt.any_dtensor(xs):  # [dtensor hook] no DTensor _foreach_copy_
        torch._foreach_copy_(xs, ys)
    else:
        for x, y in zip(xs, ys):
            x.copy_(y)


def sanitize_(gs: list[torch.Tensor], keep: torch.Tensor) -> None:
    """Zero the gradients in place unless ``keep`` (0-d bool) holds.

    A coefficient of 0 does not neutralise a non-finite gradient (``0 * NaN`` is NaN),
    so before applying ``x += c * g`` the adapter zeroes ``g`` when the step is
    skipped. On CUDA (and any non-CPU device) this is ``torch.where(keep, g, 0)``
    written in place, with no host read; on CPU, where reading a scalar costs nothing,
    the flag is read on the host and the gradients are only touched when the step
    is skipped (saves a pass over the gradients).
    """
    if not gs:
        return
    if gs[0].device.type == "cpu":
        if not bool(keep):
            for g in gs:
                g.zero_()
        return
    zero = torch.zeros((), dtype=gs[0].dtype, device=gs[0].device)
    for g in gs:
        torch.where(keep, g, zero, out=g)


# ---------------------------------------------------------------- reductions
def _dot_diff(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<g, a - b>``; the difference is one temporary the size of this tensor."""
    acc = acc_dtype(g.dtype)
    if acc != g.dtype:  # float16/bfloat16: differences, products and sums in float32
        return torch.sum(g.to(acc) * (a.to(acc) - b.to(acc)))
    d = a - b
    if g.is_contiguous() and d.is_contiguous():
        return torch.dot(g.view(-1), d.view(-1))
    return torch.sum(g * d)


def _foreach_dot(
    gs: list[torch.Tensor], as_: list[torch.Tensor], bs: list[torch.Tensor], diff: bool
) -> torch.Tensor:
    """``sum_i <g_i, a_i - b_i>`` (``diff``) or ``sum_i <g_i, b_i>`` over one chunk of
    float32/float64 tensors, as foreach kernels (chunk-sized temporaries) and one sum."""
    if diff:
        prod = torch._foreach_sub(as_, bs)
        torch._foreach_mul_(prod, gs)
    else:
        prod = torch._foreach_mul(gs, bs)
    return torch.cat([t.reshape(-1) for t in prod]).sum()


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    acc = acc_dtype(x.dtype)
    if acc != x.dtype:  # float16/bfloat16: products and sums in float32
        return torch.sum(x.to(acc) * y.to(acc))
    if x.is_contiguous() and y.is_contiguous():
        return torch.dot(x.view(-1), y.view(-1))
    return torch.sum(x * y)


def global_dot(
    xs: list[torch.Tensor], ys: list[torch.Tensor], out_dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """:math:`\\sum_i \\langle x_i, y_i\\rangle` (0-d, ``out_dtype``, on ``device``; no temporaries
    for float32/float64)."""
    total = torch.zeros((), dtype=out_dtype, device=device)
    for bx, by in group_by_device_dtype(xs, ys):
        part = torch.stack([_dot(x, y) for x, y in zip(bx, by)]).sum()
        total = total + part.to(device=device, dtype=out_dtype)
    return total


def global_dot_diff(
    gs: list[torch.Tensor],
    as_: list[torch.Tensor],
    bs: list[torch.Tensor],
    out_dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """:math:`\\sum_i \\langle g_i, a_i - b_i\\rangle` (0-d, ``out_dtype``, on ``device``)."""
    total = torch.zeros((), dtype=out_dtype, device=device)
    for bg, ba, bb in group_by_device_dtype(gs, as_, bs):
        part = torch.stack([_dot_diff(g, a, b) for g, a, b in zip(bg, ba, bb)]).sum()
        total = total + part.to(device=device, dtype=out_dtype)
    return total


def sq_norm_and_dot(
    gs: list[torch.Tensor],
    as_: list[torch.Tensor],
    bs: list[torch.Tensor],
    out_dtype: torch.dtype,
    device: torch.device,
    *,
    diff: bool,
    foreach: bool = True,
    scratch: dict[Any, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`\\sum_i \\|g_i\\|^2` (as :func:`._common.global_sq_norm`) and
    :math:`\\sum_i \\langle g_i, a_i - b_i\\rangle` (``diff``) or
    :math:`\\sum_i \\langle g_i, b_i\\rangle`, in one chunked pass over ``g`` (each
    chunk is reduced twice while it is in cache). 0-d, ``out_dtype``, on ``device``.

    ``scratch``: a dict owned by the caller (kept between steps). With it, on CPU for
    float32/float64 chunks of large tensors, each difference :math:`a - b` is written
    into one reused buffer (``scratch[(device, dtype)]``, the size of the largest such
    chunk, at most ``CHUNK_NUMEL`` elements) instead of a fresh temporary per tensor:
    on CPU a temporary of a few hundred KB is an allocation with page faults every step,
    while the reused buffer stays in cache for the dot product that reads it.
    """
    if _dt.any_dtensor(gs):  # [dtensor hook] summed over the mesh
        return _dt.sq_norm_and_dot(gs, as_, bs, out_dtype, device, diff=diff, foreach=foreach)
    sq = torch.zeros((), dtype=out_dtype, device=device)
    dot = torch.zeros((), dtype=out_dtype, device=device)
    for bg, ba, bb in group_by_device_dtype(gs, as_, bs):
        sqs: list[torch.Tensor] = []  # 1-d tensors of squared norms
        sq0: list[torch.Tensor] = []  # 0-d squared norms (the scratch path)
        dots: list[torch.Tensor] = []
        dt, dev = bg[0].dtype, bg[0].device
        fast = diff and scratch is not None and dev.type == "cpu" and acc_dtype(dt) == dt
        for cg, ca, cb in chunked(bg, ba, bb):
            total = sum(t.numel() for t in cg)
            fast_chunk = fast and _DOT_MIN_NUMEL * len(cg) <= total <= CHUNK_NUMEL
            if fast_chunk:
                assert scratch is not None
                # one buffer per (device, dtype), as large as the largest chunk seen
                # (at most CHUNK_NUMEL elements: 1 MiB in float32)
                buf = scratch.get((dev, dt))
                if buf is None or buf.numel() < total:
                    buf = scratch[(dev, dt)] = torch.empty(total, dtype=dt, device=dev)
            if not fast_chunk:
                sqs.append(sq_norms(cg, foreach=foreach, device=device, dtype=out_dtype))
                if foreach and len(cg) > 1 and acc_dtype(dt) == dt and not _dt.any_dtensor(cg):
                    # Several small tensors: the products by foreach kernels and one sum
                    # (a few launches per chunk instead of two per tensor).
                    dots.append(_foreach_dot(cg, ca, cb, diff))
                elif not diff:
                    dots.extend(_dot(g, b) for g, b in zip(cg, cb))
                else:
                    dots.extend(_dot_diff(g, a, b) for g, a, b in zip(cg, ca, cb))
                continue
            # Large tensors: per tensor, the difference into the scratch buffer and both
            # dot products while this tensor's ``g`` is in cache (one BLAS dot each, as
            # ``sq_norms`` reduces large float32/float64 tensors).
            off = 0
            for g, a, b in zip(cg, ca, cb):
                n = a.numel()
                d = buf[off : off + n]
                off += n
                torch.sub(a, b, out=d if a.dim() == 1 else d.view(a.shape))
                if g.is_contiguous():
                    gf = g if g.dim() == 1 else g.view(-1)
                    dots.append(torch.dot(gf, d))
                    sq0.append(torch.dot(gf, gf))
                else:
                    dots.append(torch.sum(g * d.view(g.shape)))
                    sq0.append(torch.sum(g * g))
        if sq0:
            sqs.append(torch.stack(sq0).to(device=device, dtype=out_dtype))
        sq = sq + torch.cat(sqs).sum()
        dot = dot + torch.stack(dots).sum().to(device=device, dtype=out_dtype)
    return sq, dot


# ---------------------------------------------------------------- GradScaler
# ``torch.amp.GradScaler`` supports one ``unscale_`` per optimizer between two
# ``update()`` calls. A SAM step has two backward passes, each scaled, so the
# optimizer unscales each pass itself: ``scaler.unscale_(opt)`` (public) after each
# pass, with the per-optimizer record reset in between (private attribute
# ``_per_optimizer_states``), and the first pass's inf flag added into the second
# pass's record so that ``scaler.update()`` backs off when *either* pass overflowed.


def _opt_state(scaler: Any, optimizer: torch.optim.Optimizer) -> dict:
    return scaler._per_optimizer_states[id(optimizer)]


def scaler_found_inf(
    scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device
) -> torch.Tensor | None:
    """Unscale the optimizer's gradients (unless the user already called
    ``scaler.unscale_(opt)``, e.g. to clip) and return the inf/NaN flag (0-d float32,
    1 when found) on ``device``. ``None`` for no scaler or a disabled one."""
    if scaler is None or not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    state = _opt_state(scaler, optimizer)
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError(
            "SAM_SPS: scaler.step(optimizer) must not be used; call second_step(..., scaler=scaler)"
        )
    if state["stage"] is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
        state = _opt_state(scaler, optimizer)
    found = torch.zeros((), dtype=torch.float32, device=device)
    for v in state["found_inf_per_device"].values():
        found = found + v.to(device=device, dtype=torch.float32)
    return found


def scaler_reset(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Forget the first pass's unscale record so that the second pass can unscale."""
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import _refresh_per_optimizer_state

    scaler._per_optimizer_states[id(optimizer)] = _refresh_per_optimizer_state()


def scaler_merge_found_inf(
    scaler: Any, optimizer: torch.optim.Optimizer, found: torch.Tensor
) -> None:
    """Add ``found`` (the first pass's flag) into the recorded flags read by ``update()``."""
    if scaler is None or not scaler.is_enabled():
        return
    per_dev = _opt_state(scaler, optimizer)["found_inf_per_device"]
    if not per_dev:
        per_dev[found.device] = found.clone()
        return
    for v in per_dev.values():
        v.add_(found.to(device=v.device, dtype=v.dtype))


# ---------------------------------------------------------------- BatchNorm
def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]


@contextmanager
def frozen_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Save the running statistics of every BatchNorm module of ``model`` and copy them
    back on exit (in place, so compiled modules and DDP buffers keep their tensors)."""
    if model is None:
        yield
        return
    saved = []
    with torch.no_grad():
        for m in _bn_modules(model):
            bufs = [m.running_mean, m.running_var, m.num_batches_tracked]
            saved.append([(b, b.clone()) for b in bufs if b is not None])
    try:
        yield
    finally:
        with torch.no_grad():
            for entries in saved:
                for buf, copy in entries:
                    buf.copy_(copy)
