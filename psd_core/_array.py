"""Array-API helpers over *trees*: a parameter vector stored as a list of arrays.

Every function here takes arrays from any array-API library (NumPy, PyTorch, JAX,
CuPy, array-api-strict), asks :func:`array_namespace` for ``xp`` and uses only
standard functions. Nothing mutates its inputs, nothing reads an array value on the
host, so everything traces under ``jax.jit`` / ``tf.function``.

A *tree* is a non-empty ``list``/``tuple`` of arrays treated as one long vector;
``||.||`` and ``<.,.>`` below are the global 2-norm and dot product over all leaves.
Global reductions accumulate in float32 or better: float16/bfloat16 leaves are
upcast before squaring, float64 leaves keep float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import array_namespace, device

Array = Any
Tree = Sequence[Array]

__all__ = [
    "Array",
    "Tree",
    "accumulation_dtype",
    "as_scalar",
    "coefficient_for",
    "count_dtype",
    "is_complex",
    "real_dtype",
    "int_constant",
    "saturating_increment",
    "tree_acc_dtype",
    "namespace",
    "register_namespace_hook",
    "tree_all_finite",
    "tree_dot",
    "tree_lincomb",
    "tree_norm",
    "tree_select",
    "tree_size",
    "tree_sq_norm",
    "tree_zeros_like",
]


_NAMESPACE_HOOKS: list[Callable[[Any], Any]] = []
"""Hooks ``hook(leaf) -> namespace | None`` consulted before ``array_namespace``
(for array types array-api-compat does not know, e.g. TensorFlow tensors; see
:func:`register_namespace_hook`)."""


def register_namespace_hook(hook: Callable[[Any], Any]) -> None:
    """Register ``hook(leaf) -> namespace or None``, consulted by :func:`namespace` first.

    Lets an adapter supply an array-API namespace for a library that
    ``array_api_compat.array_namespace`` does not support (``psd_keras`` registers a
    TensorFlow bridge). Registering the same hook twice is a no-op.
    """
    if hook not in _NAMESPACE_HOOKS:
        _NAMESPACE_HOOKS.append(hook)
        _LEAF_NAMESPACES.clear()


_LEAF_NAMESPACES: dict[Any, Any] = {}
"""``(id(type), dtype) -> (type, namespace)`` of the leaves seen so far. The namespace of an array
depends only on its type (and, for array-api-compat, on its dtype: a NumPy array of
JAX's ``float0`` belongs to JAX), so it is resolved once per kind of leaf instead of
once per call: the core's scalar layer asks for it dozens of times per step, and
``array_namespace`` costs microseconds each time."""

_PY_SCALARS = (bool, int, float, complex)
_NOT_LEAVES = (list, tuple, *_PY_SCALARS)


def _leaf_namespace(leaf: Array) -> Any:
    """The namespace of one array (cached by type and dtype; see :func:`_int_range`
    for why there is no ``try`` around the lookup)."""
    dtype = getattr(leaf, "dtype", None)
    key: Any = None
    xp = None
    if getattr(type(dtype), "__hash__", None) is not None:  # else: resolve every time
        key = (id(type(leaf)), dtype)
        hit = _LEAF_NAMESPACES.get(key)
        if hit is not None and hit[0] is type(leaf):  # (an id is reused only once freed)
            xp = hit[1]
    if xp is None:
        for hook in _NAMESPACE_HOOKS:
            xp = hook(leaf)
            if xp is not None:
                break
        else:
            xp = array_namespace(leaf)
        if key is not None:
            _LEAF_NAMESPACES[key] = (type(leaf), xp)
    return xp


def _namespace_uncached(leaves: list[Array]) -> Any:
    for hook in _NAMESPACE_HOOKS:
        for leaf in leaves:
            xp = hook(leaf)
            if xp is not None:
                return xp
    return array_namespace(*leaves)


def namespace(*trees: Array) -> Any:
    """The array namespace of the leaves of one or more trees (or bare arrays).

    Python scalars among the leaves are ignored, as ``array_namespace`` ignores them;
    leaves of different libraries raise its ``TypeError`` (unless a hook claims one).
    """
    if len(trees) == 1:  # the common call: one bare array (the scalar layer's 0-d values)
        t = trees[0]
        if t is not None and not isinstance(t, _NOT_LEAVES):
            return _leaf_namespace(t)
    leaves: list[Array] = []
    for t in trees:
        if isinstance(t, list | tuple):
            leaves.extend(t)
        elif t is not None:
            leaves.append(t)
    xp = None
    for leaf in leaves:
        if isinstance(leaf, _PY_SCALARS):
            continue
        x = _leaf_namespace(leaf)
        if xp is None:
            xp = x
        elif x is not xp:  # mixed libraries: the full rules (hooks first, then the error)
            return _namespace_uncached(leaves)
    if xp is None:  # no array at all: array_namespace's error
        return _namespace_uncached(leaves)
    return xp


def real_dtype(xp: Any, dtype: Any) -> Any:
    """The real counterpart of ``dtype``: complex64 -> float32, complex128 -> float64."""
    if xp.isdtype(dtype, "complex floating"):
        return xp.float32 if dtype == xp.complex64 else xp.float64
    return dtype


def accumulation_dtype(xp: Any, dtype: Any) -> Any:
    """Real dtype used for reductions over leaves of ``dtype``: float32 for <32-bit
    floats, the real counterpart for complex dtypes, ``dtype`` otherwise."""
    dtype = real_dtype(xp, dtype)
    if xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits < 32:
        return xp.float32
    return dtype


def is_complex(xp: Any, x: Array) -> bool:
    """Whether ``x`` has a complex dtype (static)."""
    return bool(xp.isdtype(x.dtype, "complex floating"))


_COUNT_DTYPES: dict[int, Any] = {}


def count_dtype(xp: Any) -> Any:
    """Integer dtype of the core's counters and budgets on namespace ``xp`` (static).

    int64 where the namespace really has it (NumPy, PyTorch, array-api-strict, JAX
    with ``jax_enable_x64``); int32 otherwise (JAX without x64), where counters
    saturate at :math:`2^{31}-1` and configuration values above it are clamped to
    it, which then means "effectively unlimited".
    """
    key = id(xp)
    dt = _COUNT_DTYPES.get(key)
    if dt is None:
        import warnings

        dt = getattr(xp, "int64", None)
        if dt is None:
            dt = xp.int32
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    probe = xp.zeros((), dtype=dt)
                    if probe.dtype != dt:
                        dt = xp.int32
                except Exception:  # pragma: no cover - namespaces without int64 arrays
                    dt = xp.int32
        # JAX's x64 flag can change at run time: do not cache its answer.
        if "jax" not in getattr(xp, "__name__", ""):
            _COUNT_DTYPES[key] = dt
    return dt


def int_constant(value: Any, like: Array) -> Array:
    """``value`` as a 0-d array of ``like``'s integer dtype, clamped to its range.

    The clamp gives budgets above the dtype's range (e.g. :math:`M > 2^{31}-1` on
    int32 counters) the meaning "effectively unlimited" instead of an overflow.
    ``value`` is a Python int, or an array (an integer, or an integral float such as
    the array-valued theory constants): arrays are clamped with array operations, so
    a traced budget (``optax.inject_hyperparams`` under ``jax.jit``) stays traceable.
    """
    xp = namespace(like)
    if not hasattr(value, "dtype") or isinstance(value, (bool, int)):
        lo, hi = _int_range(xp, like.dtype)
        v = max(min(int(value), hi), lo)
        return xp.asarray(v, dtype=like.dtype, device=scalar_device(like))
    info = xp.iinfo(like.dtype)
    top = xp.asarray(int(info.max), dtype=like.dtype, device=scalar_device(like))
    bottom = xp.asarray(int(info.min), dtype=like.dtype, device=scalar_device(like))
    if xp.isdtype(value.dtype, "integral"):
        wide = xp.iinfo(value.dtype)
        if int(wide.max) > int(info.max) or int(wide.min) < int(info.min):
            value = xp.clip(value, int(info.min), int(info.max))
        return xp.astype(value, like.dtype)
    # an integral float: saturate before the cast (a cast out of range is undefined)
    above = value >= float(info.max)
    below = value <= float(info.min)
    cast = xp.astype(xp.where(above | below, xp.zeros_like(value), value), like.dtype)
    return xp.where(above, top, xp.where(below, bottom, cast))


_INT_RANGES: dict[Any, tuple[int, int]] = {}


def _int_range(xp: Any, dtype: Any) -> tuple[int, int]:
    """``(iinfo(dtype).min, iinfo(dtype).max)`` as Python ints (static; cached).

    Keyed by ``(id(xp), dtype)`` and looked up with ``dict.get``, without ``try``. The
    round-6 version keyed the cache by the module and caught ``KeyError``. With keys of
    several libraries in it, Dynamo could not compare the module keys and broke the graph
    at that lookup, inside the ``try``, and the compiled PSD step then left its counters
    at 0 (``tests/test_array_namespace.py`` reproduces it). This version compiles
    without a graph break here.
    """
    if getattr(type(dtype), "__hash__", None) is None:  # an unhashable dtype
        info = xp.iinfo(dtype)
        return int(info.min), int(info.max)
    key = (id(xp), dtype)
    r = _INT_RANGES.get(key)
    if r is None:
        info = xp.iinfo(dtype)
        r = _INT_RANGES[key] = (int(info.min), int(info.max))
    return r


def saturating_increment(counter: Array) -> Array:
    """``counter + 1`` that stops at the dtype's maximum instead of wrapping."""
    xp = namespace(counter)
    # the maximum as a Python int: compared without a 0-d array of its own
    return xp.where(counter < _int_range(xp, counter.dtype)[1], counter + 1, counter)


def scalar_device(like: Array) -> Any:
    """The device on which to create 0-d state and scalars next to ``like``.

    ``like``'s device, except where ``like`` is split over several devices (a JAX
    array with a multi-device ``NamedSharding``, as in FSDP): a 0-d array cannot take
    that layout, so it is created on the default device (``None``; JAX then leaves it
    uncommitted and ``jit`` replicates it).
    """
    dev = device(like)
    devices = getattr(dev, "device_set", None)  # a JAX Sharding; duck-typed, no import
    if devices is not None and len(devices) > 1:
        return None
    return dev


def as_scalar(value: Any, like: Array, dtype: Any = None) -> Array:
    """``value`` (Python number or 0-d array) as a 0-d array on ``like``'s device.

    ``dtype`` defaults to ``like.dtype``. Arrays are cast with ``astype`` (no host
    round-trip), Python numbers with ``asarray``.
    """
    xp = namespace(like)
    dtype = like.dtype if dtype is None else dtype
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        try:
            xp_v = namespace(value)
        except TypeError:
            xp_v = None
        if xp_v is not None and xp_v is not xp:
            # A scalar from a different library (e.g. a NumPy float from a schedule).
            value = float(value)
        else:
            return xp.astype(value, dtype) if value.dtype != dtype else value
    return xp.asarray(value, dtype=dtype, device=scalar_device(like))


def number_like(xp: Any, value: Any, like: Array, dev: Any) -> Array:
    """``value`` as a 0-d array of ``like``'s dtype on ``dev``, with the namespace and the
    device already known (the scalar layer looks them up once per call).

    A Python ``int`` or ``float`` goes straight to ``xp.asarray``; anything else (an
    array, a NumPy scalar from a schedule) through :func:`as_scalar`.
    """
    if type(value) in (int, float):
        return xp.asarray(value, dtype=like.dtype, device=dev)
    return as_scalar(value, like)


def coefficient_for(c: Any, leaf: Array) -> Array:
    """``c`` cast to ``leaf``'s dtype and shaped to broadcast against it.

    A 0-d coefficient broadcasts as is. A coefficient with a batch shape ``(n,)``
    (one independent problem per row, see :mod:`psd_core.perturbation`) is reshaped to
    ``(n, 1, ..., 1)`` so that it scales row ``i`` of a ``(n, ...)`` leaf.
    """
    c = as_scalar(c, leaf, real_dtype(namespace(leaf), leaf.dtype))
    extra = leaf.ndim - c.ndim
    if c.ndim > 0 and extra > 0:
        xp = namespace(leaf)
        c = xp.reshape(c, tuple(c.shape) + (1,) * extra)
    return c


def tree_acc_dtype(tree: Tree) -> Any:
    """dtype of :func:`tree_sq_norm` of ``tree`` (static)."""
    xp = namespace(tree)
    dt = None
    for leaf in tree:
        a = accumulation_dtype(xp, leaf.dtype)
        dt = a if dt is None else xp.result_type(dt, a)
    if dt is None:
        raise ValueError("the parameter list is empty")
    return dt


def tree_size(tree: Tree) -> int:
    """Real dimension of the tree (static: shapes are known at trace time).

    Each real scalar counts 1 and each complex scalar 2 (its real and imaginary
    parts), the dimension :math:`d` of the real vector space the methods work in.
    """
    xp = namespace(tree)
    total = 0
    for leaf in tree:
        n = 1
        for s in leaf.shape:
            n *= int(s)
        total += 2 * n if is_complex(xp, leaf) else n
    return total


def cast(xp: Any, x: Array, dtype: Any) -> Array:
    """``x`` as ``dtype`` (``x`` itself when it already has that dtype)."""
    return xp.astype(x, dtype) if x.dtype != dtype else x


def _flat(xp: Any, x: Array, dtype: Any) -> Array:
    return cast(xp, xp.reshape(x, (-1,)), dtype)


def _sq(xp: Any, x: Array, acc: Any) -> Array:
    """Elementwise :math:`|x|^2` in ``acc`` (``re^2 + im^2`` for complex ``x``)."""
    if is_complex(xp, x):
        re, im = _flat(xp, xp.real(x), acc), _flat(xp, xp.imag(x), acc)
        return re * re + im * im
    f = _flat(xp, x, acc)
    return f * f


def tree_sq_norm(tree: Tree) -> Array:
    r"""Global squared norm :math:`\|x\|^2 = \sum_{\text{leaves}} \sum_i |x_i|^2` (0-d, real).

    Not overflow-safe: a finite entry above :math:`\sqrt{\max}` of the
    accumulation dtype (1e20 in float32) gives ``inf``; use :func:`tree_norm` and
    :func:`tree_all_finite` where that matters.
    """
    xp = namespace(tree)
    total = None
    for leaf in tree:
        acc = accumulation_dtype(xp, leaf.dtype)
        s = xp.sum(_sq(xp, leaf, acc))
        total = s if total is None else total + s
    if total is None:
        raise ValueError("tree_sq_norm: the tree has no leaves (empty parameter list)")
    return total


def tree_norm(tree: Tree) -> Array:
    r"""Overflow-safe global 2-norm :math:`\|x\|` in the accumulation dtype (0-d, real).

    Scaled by :math:`s = \max_i |x_i|`: :math:`\|x\| = s\,\sqrt{\sum_i |x_i/s|^2}`, so
    it is finite for every finite tree whose norm fits the dtype (1e20 in float32
    gives 1e20, not ``inf``). NaN or inf entries give a non-finite result.
    Two passes over the data; :func:`tree_sq_norm` is the one-pass version.
    """
    xp = namespace(tree)
    acc = tree_acc_dtype(tree)
    scale = None
    for leaf in tree:
        if tree_size([leaf]) == 0:
            continue
        m = xp.max(_flat(xp, xp.abs(leaf), acc))
        scale = m if scale is None else xp.maximum(scale, m)
    if scale is None:
        return xp.zeros((), dtype=acc, device=scalar_device(tree[0]))
    ok = xp.isfinite(scale) & (scale > 0)
    safe = xp.where(ok, scale, xp.ones_like(scale))
    total = None
    for leaf in tree:
        a = _flat(xp, xp.abs(leaf), acc) / safe
        t = xp.sum(a * a)
        total = t if total is None else total + t
    norm = safe * xp.sqrt(total)
    return xp.where(ok, norm, xp.where(xp.isfinite(scale), xp.zeros_like(norm), scale))


def tree_all_finite(tree: Tree) -> Array:
    """0-d bool: every entry of every leaf is finite (no NaN, no inf).

    Unlike ``isfinite(tree_sq_norm(tree))`` this is not fooled by a finite tree whose
    squared norm overflows (e.g. an entry of 1e20 in float32).
    """
    xp = namespace(tree)
    ok = None
    for leaf in tree:
        f = xp.all(xp.isfinite(leaf))
        ok = f if ok is None else ok & f
    if ok is None:
        raise ValueError("tree_all_finite: the tree has no leaves (empty parameter list)")
    return ok


def tree_dot(a: Tree, b: Tree) -> Array:
    r"""Global real inner product :math:`\operatorname{Re}\langle a, b\rangle` over matching leaves (0-d).

    For complex leaves :math:`\sum_i \operatorname{re}(a_i)\operatorname{re}(b_i) +
    \operatorname{im}(a_i)\operatorname{im}(b_i)`: the inner product of the real vector
    space of real and imaginary parts (torch's optimizers' convention for complex
    parameters).
    """
    if len(a) != len(b):
        raise ValueError(f"tree_dot: trees have {len(a)} and {len(b)} leaves")
    xp = namespace(a, b)
    total = None
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"tree_dot: leaf shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        acc = accumulation_dtype(xp, xp.result_type(x.dtype, y.dtype))
        cx, cy = is_complex(xp, x), is_complex(xp, y)
        if cx or cy:
            s = xp.sum(
                _flat(xp, xp.real(x) if cx else x, acc) * _flat(xp, xp.real(y) if cy else y, acc)
            )
            if cx and cy:
                s = s + xp.sum(_flat(xp, xp.imag(x), acc) * _flat(xp, xp.imag(y), acc))
        else:
            s = xp.sum(_flat(xp, x, acc) * _flat(xp, y, acc))
        total = s if total is None else total + s
    if total is None:
        raise ValueError("tree_dot: the trees have no leaves (empty parameter list)")
    return total


def tree_lincomb(coeffs: Sequence[Any], trees: Sequence[Tree]) -> list[Array]:
    r"""Leafwise linear combination :math:`\sum_k c_k\, t_k`.

    ``coeffs`` are Python numbers or 0-d arrays; each is cast to the leaf dtype so
    that a float64 coefficient never promotes float32 parameters.
    """
    if len(coeffs) != len(trees) or not trees:
        raise ValueError("tree_lincomb: need one coefficient per tree and at least one tree")
    n = len(trees[0])
    for t in trees:
        if len(t) != n:
            raise ValueError(
                f"tree_lincomb: trees have different numbers of leaves ({len(t)} vs {n})"
            )
    out = []
    for i in range(n):
        acc = None
        for c, t in zip(coeffs, trees):
            leaf = t[i]
            term = coefficient_for(c, leaf) * leaf
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def tree_select(condition: Array, on_true: Tree, on_false: Tree) -> list[Array]:
    """Leafwise ``xp.where(condition, on_true, on_false)`` with a 0-d boolean condition."""
    xp = namespace(on_true, on_false)
    out = []
    for a, b in zip(on_true, on_false):
        c = condition
        extra = a.ndim - c.ndim
        if c.ndim > 0 and extra > 0:
            c = xp.reshape(c, tuple(c.shape) + (1,) * extra)
        out.append(xp.where(c, a, b))
    return out


def tree_zeros_like(tree: Tree) -> list[Array]:
    xp = namespace(tree)
    return [xp.zeros_like(x) for x in tree]
