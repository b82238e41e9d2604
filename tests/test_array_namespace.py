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
    hit = A._LEAF_NAMESPACES[(id(type(x)), x.dtype)]  # resolved once for this kind of leaf
    assert hit == (type(x), xp)
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


def test_a_cached_entry_of_another_type_is_not_used():
    a = np.zeros(2)
    key = (id(type(a)), a.dtype)
    A._LEAF_NAMESPACES[key] = (list, "stale")  # as if the id belonged to a freed type
    try:
        assert A.namespace(a) is array_namespace(a)
    finally:
        A._LEAF_NAMESPACES.clear()


def test_compiled_psd_counts_with_several_libraries_cached():
    """Round-8 regression: with the caches holding keys of array-api-strict and torch
    (as after the conformance tests), Dynamo broke the graph at a lookup keyed by a
    module inside a ``try`` and the compiled PSD step left its counters at 0."""
    torch = pytest.importorskip("torch")
    xs = pytest.importorskip("array_api_strict")
    from psd_torch import PSD

    A._LEAF_NAMESPACES.clear()
    A._INT_RANGES.clear()
    for leaf in (np.zeros((), np.float32), np.float32(1), np.zeros((), np.int64), np.int64(1)):
        A.namespace(leaf)
    for leaf in (xs.asarray(1.0, dtype=xs.float32), xs.asarray(1, dtype=xs.int64)):
        A.saturating_increment(xs.astype(leaf, xs.int64))
    for leaf in (torch.tensor(1.0), torch.tensor(1)):
        A.saturating_increment(leaf.to(torch.int64))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = PSD(list(model.parameters()), lr=0.05, epsilon=50.0, radius=1e-2, seed=0)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).mean().backward()
        step()
    assert int(opt.psd_state.count) == 3
