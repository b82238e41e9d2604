"""``psd_core._array.namespace``: resolved once per kind of leaf, same answers as
``array_namespace`` (issue 16, small-model overhead)."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import array_namespace

import psd_core._array as A
from tests.backends import backend_params, convert


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_namespace_equals_array_namespace_and_is_cached(backend, dtype):
    x = convert(np.zeros(3), backend, "float32")
    xp = array_namespace(x)
    x = xp.astype(x, getattr(xp, dtype))
    A._LEAF_NAMESPACES.clear()
    assert A.namespace(x) is xp
    assert A.namespace([x, x], x[0], None) is xp  # trees, bare arrays, None
    assert (type(x), x.dtype) in A._LEAF_NAMESPACES  # resolved once for this kind of leaf
    assert A.namespace(x, 2.0, 3) is xp  # Python scalars are ignored, as array_namespace does


def test_mixed_libraries_still_raise():
    torch = pytest.importorskip("torch")
    a, t = np.zeros(2), torch.zeros(2)
    A.namespace(a)
    A.namespace(t)  # both kinds cached
    with pytest.raises(TypeError):
        A.namespace(a, t)
    with pytest.raises(TypeError):
        A.namespace([t], [a])


def test_no_array_raises():
    with pytest.raises(TypeError):
        A.namespace(1.0, None)


def test_registering_a_hook_drops_the_cache():
    class Marker:
        pass

    a = np.zeros(2)
    assert A.namespace(a) is array_namespace(a)
    before = list(A._NAMESPACE_HOOKS)

    def hook(x):
        return Marker if isinstance(x, np.ndarray) else None

    try:
        A.register_namespace_hook(hook)
        assert A.namespace(a) is Marker  # not the cached answer from before the hook
    finally:
        A._NAMESPACE_HOOKS[:] = before
        A._LEAF_NAMESPACES.clear()
    assert A.namespace(a) is array_namespace(a)


def test_int_range_matches_iinfo():
    xp = array_namespace(np.zeros(1))
    for dt in (xp.int8, xp.int32, xp.int64, xp.uint8):
        info = xp.iinfo(dt)
        assert A._int_range(xp, dt) == (int(info.min), int(info.max))
    c = A.int_constant(2**40, xp.zeros((), dtype=xp.int32))
    assert int(c) == 2**31 - 1  # still clamped
