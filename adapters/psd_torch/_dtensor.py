"""DTensor / FSDP2 support of the PyTorch optimizers (data movement only; no math).

With ``torch.distributed.fsdp.fully_shard`` (FSDP2) or hand-made ``DTensor`` parameters,
every parameter, gradient and optimizer buffer is a ``DTensor`` whose local shard lives
on one rank. Elementwise updates (``p += a * g``, Adam's moments, SAM's moves) run on
DTensors unchanged (DTensor dispatches them shard by shard). What this module adds:

* **global reductions**: the squared norms and dot products that feed the core's gate,
  Polyak step and Adam gate are computed on the local shards and summed over the mesh
  dimensions along which the tensor is sharded (``dist.all_reduce``); replicated mesh
  dimensions are counted once. The result is a plain (non-DTensor) tensor, so the core
  and the host reads see the same scalars on every rank -- the values of the unsharded
  run up to the summation order;
* **draws**: noise for a DTensor parameter is drawn at the full (global) shape from the
  optimizer's generator -- the same draws as the single-process run, since every rank
  holds the same generator state -- and each rank keeps its shard (a full-size
  temporary per tensor, on perturbing steps only);
* DTensor-safe fallbacks for foreach ops that DTensor does not implement
  (``_foreach_copy_``) and for the flat chunk views of :func:`._common.chunked`.

The optimizers reach this module only through small hook calls marked
``# [dtensor hook]`` in :mod:`._common` and :mod:`._sam_helpers`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "any_dtensor",
    "dcp_compatible",
    "global_sq_norm",
    "is_dtensor",
    "shard_like",
    "sq_norm_and_dot",
    "sq_norms",
]

try:  # pragma: no cover - torch.distributed may be missing on some builds
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    """Whether any tensor of ``tensors`` is a DTensor (cheap: stops at the first)."""
    if DTensor is None:
        return False
    if torch.compiler.is_compiling():
        return any(isinstance(t, DTensor) for t in tensors)
    # eager: the distinct types first (a C-level map; usually one or two types)
    return any(issubclass(c, DTensor) for c in set(map(type, tensors)))


def _sum_dims(t: Any) -> tuple[Any, tuple[int, ...]]:
    """``(mesh, mesh dims to sum over)`` of a DTensor: the sharded dims. ``Partial``
    placements (pending reductions) are rejected: parameters and their gradients are
    sharded or replicated."""
    dims = []
    for i, pl in enumerate(t.placements):
        if isinstance(pl, Shard) or getattr(pl, "is_shard", lambda: False)():
            dims.append(i)
        elif isinstance(pl, Partial):
            raise ValueError(
                "tensors: a DTensor with a Partial placement (a pending reduction) cannot "
                f"be reduced by the optimizer; got placements {t.placements}"
            )
        elif not isinstance(pl, Replicate):
            raise ValueError(f"tensors: unsupported DTensor placement {pl!r}")
    return t.device_mesh, tuple(dims)


def _all_reduce_(x: torch.Tensor, mesh: Any, dims: tuple[int, ...]) -> torch.Tensor:
    import torch.distributed as dist

    for d in dims:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
    return x


def _split(tensors: Sequence[Any]) -> dict[Any, list[int]]:
    """Indices of ``tensors`` keyed by ``(mesh, dims)``; plain tensors under ``None``."""
    keys: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        key = _sum_dims(t) if is_dtensor(t) else None
        keys.setdefault(key, []).append(i)
    return keys


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def sq_norms(
    tensors: Sequence[Any], *, foreach: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`._common.sq_norms` of DTensors: per-tensor squared norms of the *global*
    tensors (local shards reduced, then summed over their sharded mesh dims)."""
    from ._common import sq_norms as local_sq_norms

    out = torch.empty(len(tensors), dtype=dtype, device=device)
    for key, idx in _split(tensors).items():
        part = local_sq_norms(
            [_local(tensors[i]) for i in idx], foreach=foreach, device=device, dtype=dtype
        )
        if key is not None:
            part = _all_reduce_(part.contiguous(), *key)
        out[torch.tensor(idx, device=device)] = part
    return out


def global_sq_norm(
    tensors: Sequence[Any],
    *,
    foreach: bool,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """:func:`._common.global_sq_norm` when some tensors are DTensors: one all-reduce per
    ``(mesh, sharded dims)`` group; a plain 0-d tensor (the same on every rank)."""
    from psd_core._array import tree_acc_dtype

    from ._common import global_sq_norm as local_global_sq_norm

    locals_ = [_local(t) for t in tensors]
    out = tree_acc_dtype(locals_) if dtype is None else dtype
    dev = locals_[0].device if device is None else device
    total: torch.Tensor | None = None
    for key, idx in _split(tensors).items():
        s = local_global_sq_norm([locals_[i] for i in idx], foreach=foreach, device=dev, dtype=out)
        if key is not None:
            s = _all_reduce_(s.clone(), *key)
        total = s if total is None else total + s
    assert total is not None
    return total


def sq_norm_and_dot(
    gs: list[Any],
    as_: list[Any],
    bs: list[Any],
    out_dtype: torch.dtype,
    device: torch.device,
    *,
    diff: bool,
    foreach: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`._sam_helpers.sq_norm_and_dot` of DTensors (shards of the same layout in the
    three lists): local reductions, then one all-reduce of the pair per group."""
    from ._sam_helpers import sq_norm_and_dot as local_sq_norm_and_dot

    sq = torch.zeros((), dtype=out_dtype, device=device)
    dot = torch.zeros((), dtype=out_dtype, device=device)
    for key, idx in _split(gs).items():
        s, d = local_sq_norm_and_dot(
            [_local(gs[i]) for i in idx],
            [_local(as_[i]) for i in idx],
            [_local(bs[i]) for i in idx],
            out_dtype,
            device,
            diff=diff,
            foreach=foreach,
        )
        pair = torch.stack([s, d])
        if key is not None:
            pair = _all_reduce_(pair, *key)
        sq, dot = sq + pair[0], dot + pair[1]
    return sq, dot


def global_max_abs(
    tensors: Sequence[Any], *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The largest magnitude over all (global) tensors: local maxima, then a ``MAX``
    all-reduce per ``(mesh, sharded dims)`` group; a plain 0-d tensor (NaN propagates)."""
    import torch.distributed as dist

    best = torch.zeros((), dtype=dtype, device=device)
    for key, idx in _split(tensors).items():
        locs = [_local(tensors[i]) for i in idx]
        locs = [t for t in locs if t.numel() > 0]
        if locs:
            m = torch.stack(
                [
                    torch.linalg.vector_norm(t, float("inf")).to(device=device, dtype=dtype)
                    for t in locs
                ]
            ).max()
        else:
            m = torch.zeros((), dtype=dtype, device=device)
        if key is not None:
            mesh, dims = key
            m = m.clone()
            for d in dims:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        best = torch.maximum(best, m)
    return best


def map_local(t: Any, fn: Any) -> Any:
    """``fn`` applied to ``t`` (a plain tensor) or to its local shard (a DTensor, same layout)."""
    if not is_dtensor(t):
        return fn(t)
    return DTensor.from_local(
        fn(t.to_local()),
        t.device_mesh,
        t.placements,
        run_check=False,
        shape=t.shape,
        stride=t.stride(),
    )


def shard_like(full: torch.Tensor, like: Any) -> Any:
    """``full`` (a plain tensor of ``like``'s global shape, the same on every rank) as a
    DTensor laid out like ``like``: each rank keeps its shard, without communication."""
    if not is_dtensor(like):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


# ---------------------------------------------------------------- distributed checkpoint

GLOBAL_KEY = "psd_torch"
"""Key of the optimizer-global entries inside the first parameter's ``state_dict()`` state."""


def _pack(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
    sd = dict(sd)
    state = dict(sd["state"])
    glob = {k: state.pop(k) for k in [k for k in state if not isinstance(k, int)]}
    extra = {k: sd.pop(k) for k in [k for k in sd if k not in ("state", "param_groups")]}
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for i in ids:
        state[i] = dict(state.get(i, {}))
    state[ids[0]][GLOBAL_KEY] = {"state": glob, "extra": extra}
    sd["state"] = state
    return sd


def _unpack(state_dict: dict[str, Any]) -> dict[str, Any]:
    sd = dict(state_dict)
    state = dict(sd["state"])
    for k in list(state):
        entry = state[k]
        if isinstance(entry, dict) and GLOBAL_KEY in entry:
            entry = dict(entry)
            packed = entry.pop(GLOBAL_KEY)
            state[k] = entry
            state.update(packed["state"])
            sd.update(packed["extra"])
    sd["state"] = {k: v for k, v in state.items() if v or not isinstance(k, int)}
    return sd


_DCP_MODULE = "torch.distributed.checkpoint"


def _called_by_dcp(depth: int = 4) -> bool:
    """Whether ``state_dict()`` was called from ``torch.distributed.checkpoint`` (its
    ``get_optimizer_state_dict`` / ``get_state_dict``), looking a few frames up."""
    f = sys._getframe(2)  # the caller of the decorated ``state_dict``
    for _ in range(depth):
        if f is None:
            return False
        if str(f.f_globals.get("__name__", "")).startswith(_DCP_MODULE):
            return True
        f = f.f_back
    return False


def dcp_compatible(cls: type | None = None, *, marker: bool = True) -> Any:
    """Class decorator: ``state_dict()`` loadable by ``torch.distributed.checkpoint``.

    ``get_optimizer_state_dict`` maps every key of ``state_dict()["state"]`` to a
    parameter name (a key that is not a parameter index raises ``KeyError``), drops every
    top-level entry but ``state`` and ``param_groups``, requires a state entry for every
    trainable parameter (``strict``), and on an optimizer whose ``state`` is empty calls
    ``step(closure=None)`` with zero gradients (which would perturb the parameters with
    PSD, and raises with SAM_SPS). So, as ``torch.optim.LBFGS`` keeps its global state in
    its first parameter's, the decorated ``state_dict()``, when called from
    ``torch.distributed.checkpoint`` (only then: everywhere else it returns torch's plain
    layout, the optimizer-global entries under their ``optimizer.state`` keys ``"psd"``,
    ``"perturbed_adam"``, ``"generator"``, ``"sam_sps"``, where state-dict hooks see
    them), moves the optimizer-global
    entries (the core's counters, the generator state, SAM_SPS's counters) into the first
    parameter's state under :data:`GLOBAL_KEY`, gives every parameter an entry, and
    ``state`` is never empty (a ``GLOBAL_KEY`` marker set by ``__init__``; ``marker=False``
    leaves it out, for a class whose code expects parameter entries only in ``state``).
    ``load_state_dict`` accepts this layout and the plain one. The wrappers are the
    outermost methods of the decorated class (a subclass that overrides ``state_dict``
    must add its entries before calling ``super()``).
    """
    if cls is None:
        return functools.partial(dcp_compatible, marker=marker)
    inner_init, inner_sd, inner_load = cls.__init__, cls.state_dict, cls.load_state_dict

    @functools.wraps(inner_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        inner_init(self, *args, **kwargs)
        if marker:
            self.state.setdefault(GLOBAL_KEY, {"format": 1})

    @functools.wraps(inner_sd)
    def state_dict(self: Any) -> dict[str, Any]:
        sd = inner_sd(self)
        return _pack(self, sd) if _called_by_dcp() else sd

    @functools.wraps(inner_load)
    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        inner_load(self, _unpack(state_dict))
        if marker:
            self.state.setdefault(GLOBAL_KEY, {"format": 1})
        else:
            self.state.pop(GLOBAL_KEY, None)

    cls.__init__ = __init__  # type: ignore[misc]
    cls.state_dict = state_dict  # type: ignore[method-assign]
    cls.load_state_dict = load_state_dict  # type: ignore[method-assign]
    return cls
