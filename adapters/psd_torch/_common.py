"""Shared helpers of the PyTorch optimizers (no math: the math lives in :mod:`psd_core`).

* grouping tensors by ``(device, dtype)`` so that ``torch._foreach_*`` ops see
  homogeneous lists, with a per-tensor fallback (``foreach=False``);
* the core's accumulation dtype (:func:`psd_core._array.accumulation_dtype`,
  :func:`psd_core._array.tree_acc_dtype`) on torch dtypes;
* the global squared norm of a list of tensors (a BLAS dot per float32/float64 tensor,
  ``torch._foreach_norm`` for float16/bfloat16),
  accumulated in float32 or better (float16/bfloat16 leaves are reduced in
  float32, float64 leaves keep float64) -- the torch-speed equivalent of
  :func:`psd_core._array.tree_sq_norm` (shared by all three optimizers);
* the optimizer-owned ``torch.Generator`` (seeded, on the parameters' device), its
  checkpoint state and the injectable draws (:class:`GeneratorStateMixin`);
* normal draws shaped like the parameters;
* reading a few 0-d flags/coefficients on the host in *one* transfer (free on CPU,
  one synchronization on CUDA);
* splitting parallel tensor lists into small chunks (:func:`chunked`) so that a
  multi-pass update keeps its temporaries small and cache-resident instead of
  allocating parameter-sized buffers every step (on these CPUs an allocation of tens
  of MB is often returned to the OS and faulted back in on every step).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import array_api_compat.torch as xp
import numpy as np
import torch

from psd_core import validation
from psd_core._array import accumulation_dtype, tree_acc_dtype

from . import _dtensor as _dt  # [dtensor hook]

__all__ = [
    "GeneratorStateMixin",
    "acc_dtype",
    "all_contiguous",
    "Group",
    "NoiseFn",
    "CHUNK_NUMEL",
    "check_params",
    "chunked",
    "draw_normals",
    "draw_uniform",
    "foreach_add_",
    "global_sq_norm",
    "group_by_device_dtype",
    "homogeneous",
    "host_floats",
    "host_view_of",
    "torch_dtype_of",
    "host_values",
    "on_host",
    "scalars_on_host",
    "scalars_to_torch",
    "scalars_to_torch_cached",
    "total_numel",
    "make_generator",
    "GENERATOR_KEY",
    "check_lr",
    "check_same_across_groups",
    "first_param",
    "lr_scalar",
    "real_view",
    "resolve_foreach",
    "safe_norm_and_finite",
    "sq_norms",
]

Group = tuple[list[torch.Tensor], ...]
"""Parallel lists of tensors sharing one ``(device, dtype)``."""


def check_params(params: Any) -> list[Any]:
    """Materialise ``params`` (an iterable of tensors or of param-group dicts) and
    raise ``ValueError`` when it is empty (``torch.optim`` does the same, we name it)."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, "
            f"but got {torch.typename(params)}"
        )
    params = list(params)
    if len(params) == 0:
        raise ValueError("params: the optimizer got an empty parameter list")
    return params


def resolve_foreach(foreach: bool | None) -> bool:
    """``None`` means "use foreach" (the fast path on every device)."""
    return True if foreach is None else bool(foreach)


@functools.cache
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The core's :func:`~psd_core._array.accumulation_dtype` of a torch dtype, memoized
    (it is asked once per tensor on the hot path)."""
    return accumulation_dtype(xp, dtype)


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def homogeneous(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the (non-empty) ``tensors`` share one ``(device, dtype)``.

    Eager: two C-level ``map`` calls into sets (about 0.1 us per tensor, against about
    0.5 us for a generator expression). Under ``torch.compile``: a plain loop, because
    Dynamo cannot trace ``operator.attrgetter`` (it broke the graph there and the
    compiled optimizer recompiled on every step).
    """
    if torch.compiler.is_compiling():
        dev, dt = tensors[0].device, tensors[0].dtype
        return all(t.dtype == dt for t in tensors) and all(t.device == dev for t in tensors)
    return len(set(map(_DTYPE, tensors))) == 1 and len(set(map(_DEVICE, tensors))) == 1


def total_numel(tensors: Sequence[torch.Tensor]) -> int:
    """The number of elements of all ``tensors`` (C-level ``map`` when eager, see
    :func:`homogeneous`)."""
    if torch.compiler.is_compiling():
        return sum(int(t.numel()) for t in tensors)
    return sum(map(torch.Tensor.numel, tensors))


def all_contiguous(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor is contiguous (C-level ``map`` when eager)."""
    if torch.compiler.is_compiling():
        return all(t.is_contiguous() for t in tensors)
    return all(map(torch.Tensor.is_contiguous, tensors))


def group_by_device_dtype(*lists: Sequence[torch.Tensor]) -> list[Group]:
    """Split parallel tensor lists into groups keyed by the first list's ``(device, dtype)``.

    Order inside each group follows the input order, and groups appear in the order
    of their first member, so iteration order is deterministic (draws depend on it).
    """
    first = lists[0]
    if first and homogeneous(first):
        return [tuple(list(items) for items in lists)]  # the usual case: one group
    out: dict[tuple[torch.device, torch.dtype], Group] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        if key not in out:
            out[key] = tuple([] for _ in lists)
        for group, t in zip(out[key], items):
            group.append(t)
    return list(out.values())


CHUNK_NUMEL = 1 << 18
"""Default chunk size of :func:`chunked` (elements; 1 MiB of float32)."""


def chunked(*lists: Sequence[torch.Tensor], max_numel: int | None = None) -> list[Group]:
    """Split parallel tensor lists (one ``(device, dtype)`` group, equal shapes per
    position) into chunks of at most ``max_numel`` elements of the first list.

    Consecutive small tensors share a chunk; a contiguous tensor larger than
    ``max_numel`` is cut into flat views of ``max_numel`` elements (all lists at the
    same offsets), a non-contiguous one forms its own chunk. Order is preserved.
    Chunks only bound the size of per-chunk temporaries; the values computed are
    the same elementwise.
    """
    if max_numel is None:
        max_numel = CHUNK_NUMEL
    if sum(t.numel() for t in lists[0]) <= max_numel:  # the small-model case: one chunk
        return [tuple(list(items) for items in lists)] if lists[0] else []
    out: list[Group] = []
    cur: Group = tuple([] for _ in lists)
    n = 0
    for items in zip(*lists):
        k = items[0].numel()
        # [dtensor hook] a DTensor is never cut into flat views (checked only for the
        # tensors that need cutting: this loop runs on every pass of every step)
        if k > max_numel and all(t.is_contiguous() for t in items) and not _dt.any_dtensor(items):
            if cur[0]:
                out.append(cur)
                cur, n = tuple([] for _ in lists), 0
            flats = [t.view(-1) for t in items]
            for s in range(0, k, max_numel):
                out.append(tuple([f[s : s + max_numel]] for f in flats))
            continue
        if cur[0] and n + k > max_numel:
            out.append(cur)
            cur, n = tuple([] for _ in lists), 0
        for c, t in zip(cur, items):
            c.append(t)
        n += k
    if cur[0]:
        out.append(cur)
    return out


_DOT_MIN_NUMEL = 1 << 14


def sq_norms(
    tensors: Sequence[torch.Tensor],
    *,
    foreach: bool = True,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The squared 2-norms of ``tensors`` (one ``(device, dtype)`` group) as a 1-d
    tensor of ``dtype`` on ``device``, each reduced in the core's
    :func:`~psd_core._array.accumulation_dtype`.

    Contiguous float32/float64 tensors of more than ``_DOT_MIN_NUMEL`` elements on
    average: the sum of squares directly, one BLAS dot per tensor (cheaper than a norm,
    and no sqrt-then-square rounding). Otherwise (many small tensors, where one foreach
    call beats a Python loop; float16, bfloat16, non-contiguous): ``torch._foreach_norm``
    (or a per-tensor norm) in the accumulation dtype, squared.
    """
    if _dt.any_dtensor(tensors):  # [dtensor hook] norms of the global tensors
        return _dt.sq_norms(tensors, foreach=foreach, device=device, dtype=dtype)
    dt = tensors[0].dtype
    red = acc_dtype(dt)
    big = total_numel(tensors) >= _DOT_MIN_NUMEL * len(tensors)
    if big and red == dt and dt.is_floating_point and all_contiguous(tensors):
        sq = [torch.dot(f, f) for f in (t if t.dim() == 1 else t.view(-1) for t in tensors)]
        return torch.stack(sq).to(device=device, dtype=dtype)
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=red if red != dt else None)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=red) for t in tensors]
    return torch.stack(norms).to(device=device, dtype=dtype).square()


def global_sq_norm(
    tensors: Sequence[torch.Tensor],
    *,
    foreach: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Global squared 2-norm :math:`\sum_{\text{leaves}}\|t\|^2` as a 0-d tensor.

    Each ``(device, dtype)`` group is reduced with :func:`sq_norms` in the
    core's :func:`~psd_core._array.accumulation_dtype` of its dtype (float32 for
    fp16/bf16); the per-tensor squared norms are then summed in ``dtype`` (default: :func:`psd_core._array.tree_acc_dtype` of the
    tensors, i.e. float64 when any leaf is float64) on ``device`` (default: the device
    of the first tensor). Never reads a value on the host. Non-finite entries give a
    non-finite result (that is how the core detects a step to skip).
    """
    if len(tensors) == 0:
        raise ValueError("global_sq_norm: empty tensor list")
    if _dt.any_dtensor(tensors):  # [dtensor hook] summed over the mesh
        return _dt.global_sq_norm(tensors, foreach=foreach, device=device, dtype=dtype)
    groups = group_by_device_dtype(tensors)
    # One leaf per group carries the group's dtype: the core's rule at O(#groups).
    out = tree_acc_dtype([ts[0] for (ts,) in groups]) if dtype is None else dtype
    dev = tensors[0].device if device is None else device
    total: torch.Tensor | None = None
    for (ts,) in groups:
        s = sq_norms(ts, foreach=foreach, device=dev, dtype=out).sum()
        total = s if total is None else total + s
    assert total is not None
    return total


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real ``(..., 2)`` view (shared storage), any other as is.

    The optimizers run on these views, so that a complex parameter is the real vector
    of its real and imaginary parts (contract C9; torch's built-in optimizers do the
    same): norms are :math:`|x|^2`, inner products :math:`\\mathrm{Re}\\langle a, b\\rangle`,
    the noise has independent :math:`N(0, 1)` real and imaginary parts and the
    dimension counts 2 per complex scalar.
    """
    return torch.view_as_real(t) if t.is_complex() else t


def safe_norm_and_finite(
    tensors: Sequence[torch.Tensor],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, finite)``: the overflow-safe global 2-norm (0-d ``dtype``) and whether
    every entry is finite (0-d bool) -- :func:`psd_core._array.tree_norm` and
    :func:`psd_core._array.tree_all_finite` at torch speed.

    Scaled by the largest magnitude :math:`s`: :math:`\\|x\\| = s\\sqrt{\\sum |x/s|^2}`, so a
    finite gradient of 1e20 in float32 has a finite norm. Two passes over the data; the
    optimizers call it only when the one-pass :func:`global_sq_norm` is not finite (read
    with their existing host read), so the usual step pays nothing for it.
    """
    if _dt.any_dtensor(tensors):  # [dtensor hook] maxima and sums over the mesh
        s = _dt.global_max_abs(tensors, device=device, dtype=dtype)
    else:
        maxes = [
            torch.stack(torch._foreach_norm(ts, float("inf"))).to(device=device, dtype=dtype).max()
            for (ts,) in group_by_device_dtype(tensors)
        ]
        s = torch.stack(maxes).max()
    finite = torch.isfinite(s)
    ok = finite & (s > 0)
    safe = torch.where(ok, s, torch.ones_like(s))
    scaled = [
        _dt.map_local(t, lambda x: x.to(acc_dtype(x.dtype)) / safe.to(x.device)) for t in tensors
    ]
    norm = safe * global_sq_norm(scaled, device=device, dtype=dtype).sqrt()
    norm = torch.where(ok, norm, torch.where(finite, torch.zeros_like(norm), s))
    return norm, finite


def foreach_add_(
    targets: list[torch.Tensor], others: list[torch.Tensor], alpha: float, *, foreach: bool = True
) -> None:
    """``t += alpha * o`` in place for every pair (one fused foreach call, or a loop)."""
    if foreach:
        torch._foreach_add_(targets, others, alpha=alpha)
    else:
        for t, o in zip(targets, others):
            t.add_(o, alpha=alpha)


def host_values(*values: torch.Tensor) -> list[float]:
    """Read several 0-d tensors on the host with a single transfer.

    On CPU this is free; on CUDA it is one device synchronization (documented where
    an optimizer calls it).
    """
    dev = values[0].device
    stacked = torch.stack([v.to(device=dev, dtype=torch.float64) for v in values])
    return stacked.tolist()


def on_host(*tensors: Any) -> bool:
    """Whether the scalar layer of a step can run on NumPy views of these tensors.

    True for plain CPU tensors in eager mode. There, each 0-d torch op of the core's
    scalar layer costs microseconds of dispatch (about 100 of them per step) while
    the same op on a NumPy 0-d array costs about one, and the values are read on the
    host anyway. The core runs unchanged on the NumPy namespace (array API). Not under
    ``torch.compile`` (it would break the graph), not for tensor subclasses
    (DTensor) and not on accelerators (the values would cross to the host).
    """
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and (type(t) is not torch.Tensor or not t.is_cpu):
            return False
    return True


def scalars_on_host(values: Any) -> Any:
    """Zero-copy NumPy views of CPU 0-d tensors (a NamedTuple, list, dict or single
    tensor); other values pass through."""
    if isinstance(values, torch.Tensor):
        return values.detach().numpy()
    if isinstance(values, tuple) and hasattr(values, "_fields"):
        return type(values)(*[scalars_on_host(v) for v in values])
    if isinstance(values, list | tuple):
        return type(values)(scalars_on_host(v) for v in values)
    if isinstance(values, dict):
        return {k: scalars_on_host(v) for k, v in values.items()}
    return values


def scalars_to_torch(values: Any) -> Any:
    """The inverse of :func:`scalars_on_host`: NumPy arrays/scalars back to CPU tensors
    of the same dtype (zero copy); other values pass through."""
    if isinstance(values, tuple) and hasattr(values, "_fields"):
        return type(values)(*[scalars_to_torch(v) for v in values])
    if isinstance(values, list | tuple):
        return type(values)(scalars_to_torch(v) for v in values)
    if isinstance(values, np.ndarray | np.generic):
        return torch.from_numpy(np.asarray(values))
    return values


def scalars_to_torch_cached(values: Any) -> tuple[Any, Any]:
    """:func:`scalars_to_torch` of a NamedTuple of NumPy scalars, with the 0-d arrays the
    new tensors view: ``(tensors, arrays)``. Keep both and hand them to
    :func:`host_view_of` on the next step, which then returns ``arrays`` without
    building new views."""
    arrays = type(values)(*[np.asarray(v) for v in values])
    return type(values)(*[torch.from_numpy(a) for a in arrays]), arrays


def host_view_of(state: Any, cache: tuple[Any, Any] | None) -> Any:
    """:func:`scalars_on_host` of a NamedTuple of CPU tensors, reusing ``cache`` (from
    :func:`scalars_to_torch_cached`) when it holds views of these very tensor objects
    (the usual step: the optimizer wrote them on the previous step). A state loaded
    or replaced since then holds other objects and gets new views."""
    if cache is not None:
        tensors, arrays = cache
        if len(tensors) == len(state) and all(map(operator.is_, tensors, state)):
            return arrays
    return scalars_on_host(state)


def torch_dtype_of(value: Any) -> torch.dtype:
    """The torch dtype of a tensor or of a NumPy array/scalar (from the host path)."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    return torch.from_numpy(np.asarray(value)).dtype


def host_floats(*values: Any) -> list[float]:
    """:func:`host_values` for values that may already be NumPy (from the host path)."""
    if all(not isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values]
    return host_values(*[torch.as_tensor(v) for v in values])


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device``.

    ``seed=None`` takes the seed from PyTorch's global generator (so
    ``torch.manual_seed`` makes runs reproducible); under DDP pass the same explicit
    ``seed`` on every rank so that perturbations agree.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    else:
        seed = validation.check_int("seed", seed, minimum=0)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def draw_normals(params: Iterable[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Standard normal draws shaped like ``params`` (their dtype), from ``generator``.

    Draws happen in parameter order on the generator's device and are moved to each
    parameter's device if it differs. The order is part of the reproducibility
    contract (tests replicate it).
    """
    gdev = generator.device
    out = []
    for p in params:
        z = torch.randn(p.shape, dtype=p.dtype, device=gdev, generator=generator)
        z = z if z.device == p.device else z.to(p.device)
        out.append(_dt.shard_like(z, p) if _dt.is_dtensor(p) else z)  # [dtensor hook]
    return out


def draw_uniform(generator: torch.Generator) -> torch.Tensor:
    """One :math:`U(0,1)` draw (float64, 0-d) from ``generator``."""
    return torch.rand((), dtype=torch.float64, device=generator.device, generator=generator)


NoiseFn = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], torch.Tensor]]
"""``noise_fn(params) -> (normals shaped like params, uniform 0-d)``: an injectable
source of draws (tests use it to feed the core and the optimizer the same draws)."""


GENERATOR_KEY = "generator"
"""Reserved ``optimizer.state`` key of the optimizer-owned generator: ``{"seed": int,
"state": ByteTensor | None, "device": str}`` (``state`` is ``None`` before the first draw)."""


class GeneratorStateMixin:
    """The optimizer-owned ``torch.Generator``, kept in ``optimizer.state`` (so that
    ``deepcopy``, ``pickle``, ``torch.save(opt)``, ``state_dict()`` and its hooks carry
    it), the draws, and the ``noise_fn`` hook.

    Mix in before ``torch.optim.Optimizer``; call :meth:`_init_generator` at the end
    of ``__init__``. ``noise_fn`` lives in ``defaults`` (it is dropped by
    ``state_dict()``, like any callable a user passes, and survives ``deepcopy``).

    The generator object itself is a cache rebuilt from ``state["generator"]`` when that
    entry changed (after ``load_state_dict``, ``deepcopy``, unpickling); each draw writes
    the new generator state back as a new tensor (never in place, so earlier
    ``state_dict()`` snapshots stay valid).
    """

    def _init_generator(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        else:
            seed = validation.check_int("seed", seed, minimum=0)
        self.state[GENERATOR_KEY] = {"seed": seed, "state": None}  # type: ignore[attr-defined]

    def _generator_device(self) -> torch.device:
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    @property
    def generator(self) -> torch.Generator:
        """The optimizer's ``torch.Generator`` (on the first parameter's device).

        Drawing from it directly does not advance the checkpointed state; the optimizer
        draws through :meth:`_draw`.
        """
        return self._gen()

    def _gen(self) -> torch.Generator:
        entry = self.state[GENERATOR_KEY]  # type: ignore[attr-defined]
        cache = self.__dict__.get("_gen_cache")
        if cache is not None and cache[1] is entry:
            return cache[0]
        dev = self._generator_device()
        gen = torch.Generator(device=dev)
        st = entry.get("state")
        if st is not None and entry.get("device", dev.type) == dev.type:
            gen.set_state(st.cpu() if isinstance(st, torch.Tensor) else st)
        else:
            gen.manual_seed(int(entry["seed"]))
        self.__dict__["_gen_cache"] = (gen, entry)
        return gen

    def _save_generator(self, gen: torch.Generator) -> None:
        entry = dict(self.state[GENERATOR_KEY])  # type: ignore[attr-defined]
        entry["state"] = gen.get_state()
        entry["device"] = gen.device.type
        self.state[GENERATOR_KEY] = entry  # type: ignore[attr-defined]
        self.__dict__["_gen_cache"] = (gen, entry)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        legacy = state_dict.pop("generator_state", None)  # checkpoints before 0.2
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if GENERATOR_KEY not in self.state:  # type: ignore[attr-defined]
            self.state[GENERATOR_KEY] = {"seed": 0, "state": None}  # type: ignore[attr-defined]
        if legacy is not None:
            entry = dict(self.state[GENERATOR_KEY])  # type: ignore[attr-defined]
            entry["state"] = legacy.cpu() if isinstance(legacy, torch.Tensor) else legacy
            entry["device"] = self._generator_device().type
            self.state[GENERATOR_KEY] = entry  # type: ignore[attr-defined]

    def _draw_normals(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        gen = self._gen()
        out = draw_normals(params, gen)
        self._save_generator(gen)
        return out

    def _draw(
        self, params: list[torch.Tensor], ball: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Normals shaped like ``params`` and, when ``ball``, one uniform draw: from
        ``noise_fn`` when given, else from the generator (normals first)."""
        noise_fn = self.defaults.get("noise_fn")  # type: ignore[attr-defined]
        if noise_fn is not None:
            normals, uniform = noise_fn(params)
            return list(normals), uniform
        gen = self._gen()
        normals = draw_normals(params, gen)
        uniform = draw_uniform(gen) if ball else None
        self._save_generator(gen)
        return normals, uniform


# ---------------------------------------------------------------- param groups


def check_lr(lr: Any) -> Any:
    """``lr >= 0``: a Python number or a one-element tensor (as ``torch.optim.SGD``)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(
                f"Invalid lr: a Tensor lr must have one element, got shape {tuple(lr.shape)}"
            )
        validation.check_nonnegative("lr", float(lr))
        return lr
    return validation.check_nonnegative("lr", lr)


def lr_scalar(lr: Any) -> Any:
    """A group's ``lr`` as the core takes it (a tensor ``lr`` becomes a detached 0-d tensor)."""
    return lr.detach().reshape(()) if isinstance(lr, torch.Tensor) else lr


def check_same_across_groups(
    optimizer: torch.optim.Optimizer, keys: Sequence[str], why: str
) -> None:
    """Raise ``ValueError`` when the newest group's value of a global hyperparameter
    differs from the first group's (these act on the whole step, e.g. on the global
    gradient norm, so a per-group value could only be ignored)."""
    groups = optimizer.param_groups
    if len(groups) < 2:
        return
    first, new = groups[0], groups[-1]
    for k in keys:
        if new[k] != first[k]:
            raise ValueError(
                f"Invalid {k}: {new[k]!r} in parameter group {len(groups) - 1}, but "
                f"{first[k]!r} in group 0; {type(optimizer).__name__}'s {k} {why}, so every "
                "parameter group must use the same value"
            )


def first_param(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p
    return None
