"""A minimal array-API namespace over TensorFlow, for ``psd_core`` on the TF backend.

``array_api_compat`` has no TensorFlow support, so ``psd_keras`` registers a
hook with :func:`psd_core._array.register_namespace_hook`: for a
``tf.Tensor``/``tf.Variable`` the core then gets *this module* as ``xp``. It only
holds the handful of standard functions the core's scalar and tree layers use
(``where``, ``sqrt``, ``maximum``, ``isfinite``, ``astype``, ``sum``, ...), each a
one-line call of the TensorFlow op with array-API argument names. There is no
formula here: the math stays in ``psd_core``. Every function is checked against
NumPy in ``tests/keras_adapter/test_keras_tf_namespace.py``.

Everything is graph-safe (no host reads), so the core traces under
``tf.function`` (``model.fit``, ``jit_compile=True``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

__all__ = [
    "abs",
    "all",
    "asarray",
    "astype",
    "bfloat16",
    "bool",
    "complex64",
    "complex128",
    "exp",
    "finfo",
    "float16",
    "float32",
    "float64",
    "full",
    "full_like",
    "iinfo",
    "int32",
    "int64",
    "isdtype",
    "isfinite",
    "imag",
    "log",
    "max",
    "maximum",
    "min",
    "minimum",
    "ones",
    "ones_like",
    "real",
    "reshape",
    "result_type",
    "sqrt",
    "square",
    "sum",
    "where",
    "zeros",
    "zeros_like",
]

__array_api_version__ = "2023.12"

_builtin_bool = bool

bool = tf.bool  # noqa: A001 - array-API name
int32 = tf.int32
int64 = tf.int64
float16 = tf.float16
bfloat16 = tf.bfloat16
float32 = tf.float32
float64 = tf.float64
complex64 = tf.complex64
complex128 = tf.complex128


def _dt(dtype: Any) -> Any:
    return tf.as_dtype(dtype)


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    """``tf.convert_to_tensor`` (``device`` is ignored: TF places ops itself)."""
    if isinstance(obj, tf.Tensor | tf.Variable):
        t = tf.convert_to_tensor(obj)
        return t if dtype is None or t.dtype == _dt(dtype) else tf.cast(t, _dt(dtype))
    return tf.convert_to_tensor(obj, dtype=None if dtype is None else _dt(dtype))


def astype(x: Any, dtype: Any, /, *, copy: _builtin_bool = True, device: Any = None) -> Any:
    return tf.cast(x, _dt(dtype))


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    return tf.where(condition, x1, x2)


def sqrt(x: Any, /) -> Any:
    return tf.sqrt(x)


def square(x: Any, /) -> Any:
    return tf.square(x)


def abs(x: Any, /) -> Any:  # noqa: A001
    return tf.abs(x)


def exp(x: Any, /) -> Any:
    return tf.exp(x)


def log(x: Any, /) -> Any:
    return tf.math.log(x)


def maximum(x1: Any, x2: Any, /) -> Any:
    return tf.maximum(x1, x2)


def minimum(x1: Any, x2: Any, /) -> Any:
    return tf.minimum(x1, x2)


def isfinite(x: Any, /) -> Any:
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        return tf.ones_like(x, dtype=tf.bool)
    return tf.math.is_finite(x)


def zeros_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros_like(x, dtype=None if dtype is None else _dt(dtype))


def ones_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones_like(x, dtype=None if dtype is None else _dt(dtype))


def full_like(x: Any, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Any:
    x = tf.convert_to_tensor(x)
    dt = x.dtype if dtype is None else _dt(dtype)
    return tf.fill(tf.shape(x), tf.cast(fill_value, dt))


def full(shape: Any, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Any:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype is None:
        return tf.fill(shape, tf.convert_to_tensor(fill_value))
    return tf.fill(shape, tf.cast(fill_value, _dt(dtype)))


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros(shape, dtype=tf.float32 if dtype is None else _dt(dtype))


def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones(shape, dtype=tf.float32 if dtype is None else _dt(dtype))


def reshape(x: Any, /, shape: Any, *, copy: Any = None) -> Any:
    return tf.reshape(x, shape)


def all(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Any:  # noqa: A001
    return tf.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def max(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Any:  # noqa: A001
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def min(x: Any, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Any:  # noqa: A001
    return tf.reduce_min(x, axis=axis, keepdims=keepdims)


def real(x: Any, /) -> Any:
    return tf.math.real(x)


def imag(x: Any, /) -> Any:
    return tf.math.imag(x)


def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: _builtin_bool = False) -> Any:  # noqa: A001
    if dtype is not None:
        x = tf.cast(x, _dt(dtype))
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: d.is_integer or d.is_floating or d.is_complex,
}


def isdtype(dtype: Any, kind: Any) -> _builtin_bool:
    """Array-API ``isdtype`` on TF dtypes (a kind name, a dtype, or a tuple of them)."""
    d = _dt(dtype)
    if isinstance(kind, tuple):
        return any(isdtype(d, k) for k in kind)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"isdtype: unknown kind {kind!r}")
        return _builtin_bool(_KINDS[kind](d))
    return d == _dt(kind)


class _FInfo(NamedTuple):
    bits: int
    eps: float
    max: float
    min: float
    smallest_normal: float
    dtype: Any


class _IInfo(NamedTuple):
    bits: int
    max: int
    min: int
    dtype: Any


def finfo(type: Any, /) -> _FInfo:  # noqa: A002
    import ml_dtypes

    d = _dt(type.dtype if hasattr(type, "dtype") and not isinstance(type, tf.DType) else type)
    f = ml_dtypes.finfo(d.as_numpy_dtype)
    return _FInfo(
        int(f.bits), float(f.eps), float(f.max), float(f.min), float(f.smallest_normal), d
    )


def iinfo(type: Any, /) -> _IInfo:  # noqa: A002
    d = _dt(type.dtype if hasattr(type, "dtype") and not isinstance(type, tf.DType) else type)
    return _IInfo(d.size * 8, int(d.max), int(d.min), d)


def result_type(*arrays_and_dtypes: Any) -> Any:
    """Array-API promotion of TF dtypes/tensors (float16 with bfloat16 gives float32)."""
    dts = [
        (x.dtype if isinstance(x, tf.Tensor | tf.Variable) else _dt(x)) for x in arrays_and_dtypes
    ]
    out = dts[0]
    for d in dts[1:]:
        if d == out:
            continue
        if d.is_floating and out.is_floating:
            if d.size != out.size:
                out = d if d.size > out.size else out
            else:  # float16 vs bfloat16
                out = tf.float32
        elif d.is_floating or out.is_floating:
            out = d if d.is_floating else out
        elif d == tf.bool or out == tf.bool:
            raise TypeError(f"result_type: no promotion between {out!r} and {d!r}")
        else:
            import numpy as np

            out = _dt(np.result_type(out.as_numpy_dtype, d.as_numpy_dtype))
    return out
