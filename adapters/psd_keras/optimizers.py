"""Keras 3 optimizers on ``psd_core``: :class:`PSD`, :class:`PerturbedAdam`, :class:`SAM_SPS`.

How they plug into Keras
------------------------
Keras calls ``Optimizer._backend_update_step(grads, variables, learning_rate)``
once per step with the *whole* list of gradients (after clipping / Keras weight
decay), on every backend and inside ``stateless_apply`` on JAX. The PSD and
PerturbedAdam gates need the global gradient norm, so these classes override that
hook (not the per-variable ``update_step``). It reads the optimizer's state
variables, calls the core's pure transformation (:func:`psd_core.psd`,
:func:`psd_core.perturbed_adam`) on the backend's native tensors and writes the
results back with ``assign``/``assign_add``. Nothing reads an array value on the
host, so the step traces under ``tf.function``, ``jax.jit`` and
``jit_compile=True``.

On the JAX and PyTorch backends the tensors are array-API arrays for
``array_api_compat``; on TensorFlow the core gets the bridge
:mod:`psd_keras._tf_namespace`.

State
-----
Every scalar of the core's state (``count``, ``since_perturb``, ``episode_left``,
... ) is a non-trainable optimizer variable, and so is the state of the
``keras.random.SeedGenerator`` that draws the noise, so ``model.save`` /
``load_model`` and ``stateless_apply`` carry all of it.

Randomness
----------
The noise ``z ~ N(0, I)`` shaped like the parameters (and one ``u ~ U(0, 1)`` for
``noise="ball"``) is drawn only on a step that perturbs: the gate and the
gradient (or Adam) part of the step come first, from the core with placeholder
noise statistics (the gate, that part and the state do not depend on the draws),
and the noise is added in a branch that runs only when the gate opens
(:meth:`_CoreOptimizer._perturb_if`): ``tf.cond`` on TensorFlow, a Python ``if``
(one host sync) on PyTorch, and on JAX a ``jax.lax.cond`` that carries the
variables (after the gradient part), PerturbedAdam's moments (reset to zeros on a
perturbation) and the seed state, and returns them unchanged on a quiet step.
A perturbation makes one ``keras.random.normal`` call per parameter dtype (the
draws are split into the variables' shapes), each seeded by the optimizer's ``SeedGenerator`` state, which
then advances by ``[0, 1]`` exactly as ``SeedGenerator.next`` does; on JAX the
state travels through the ``cond`` as a value, so the sequence is traceable and
deterministic under ``jit``/``stateless_apply``. A step that does not perturb
neither draws nor advances the state. Tests replace the noise source with
:meth:`_set_noise_fn` to feed the same draws to the core.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

import psd_core
from psd_core import perturbation as core
from psd_core._array import (
    coefficient_for,
    tree_all_finite,
    tree_norm,
    tree_select,
    tree_size,
    tree_sq_norm,
)
from psd_core.perturbation import (
    PerturbedAdamState,
    PSDState,
    perturbed_adam_config,
    psd_config,
)
from psd_core.polyak import SAMSPSState, sam_sps_config

__all__ = ["PSD", "PerturbedAdam", "SAM_SPS"]

_BACKEND = keras.backend.backend()


def _no_grad() -> Any:
    if _BACKEND == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _enable_grad() -> Any:
    """SAM's second pass differentiates even when the caller is under ``torch.no_grad``."""
    if _BACKEND == "torch":
        import torch

        return torch.enable_grad()
    return contextlib.nullcontext()


def _int_dtype() -> str:
    """Keras's name of the integer state's dtype: the core's counter dtype
    (:func:`psd_core._array.count_dtype`, contract C1) on this backend's namespace,
    i.e. int64, except on JAX without ``jax_enable_x64``, where it is int32 (the
    counters then saturate at 2**31 - 1)."""
    from psd_core._array import count_dtype, namespace

    probe = _read(ops.zeros((), "float32"))
    return keras.backend.standardize_dtype(count_dtype(namespace(probe)))


def _rename(exc: Exception, pairs: tuple[tuple[str, str], ...]) -> Exception:
    """The core's error with its argument names replaced by the Keras ones."""
    msg = str(exc)
    for core_name, keras_name in pairs:
        msg = msg.replace(f"Invalid {core_name}:", f"Invalid {keras_name}:").replace(
            f"{core_name} must", f"{keras_name} must"
        )
    return type(exc)(msg)


def _keras_lr(learning_rate: Any) -> Any:
    """Keras insists on a Python float (or a schedule / callable)."""
    if isinstance(learning_rate, bool):
        raise TypeError(f"learning_rate must be a real number, got {learning_rate!r}")
    if isinstance(learning_rate, int | float):
        return float(learning_rate)
    return learning_rate


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype(x: Any) -> str:
    """Keras's name of a dtype (``"float32"``, ...) for Keras variables, raw
    ``tf.Variable``s and backend tensors alike. ``standardize_dtype`` costs a few
    microseconds and the step asks several times per variable, so the name of each
    dtype object is kept (``None``, which means ``floatx()``, is not)."""
    dt = x.dtype
    if dt is None:
        return keras.backend.standardize_dtype(dt)
    try:
        return _DTYPE_NAMES[dt]
    except KeyError:
        name = _DTYPE_NAMES[dt] = keras.backend.standardize_dtype(dt)
        return name
    except TypeError:  # an unhashable dtype object
        return keras.backend.standardize_dtype(dt)


def _acc_dtype(variables: list[Any]) -> str:
    """dtype of the scalar float state: float64 if any variable is float64, else float32
    (float16/bfloat16 parameters accumulate in float32, as the core's reductions do)."""
    return "float64" if any(_dtype(v) == "float64" for v in variables) else "float32"


def _dense(g: Any) -> Any:
    """A backend tensor for a gradient. A TensorFlow ``IndexedSlices`` (the gradient of an
    ``Embedding`` / ``gather``) becomes its dense tensor with duplicate indices summed,
    which is what Keras's own scatter updates of the same slices add up to."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        if isinstance(g, tf.IndexedSlices):
            return tf.convert_to_tensor(g)
    return ops.convert_to_tensor(g)


def _read(v: Any) -> Any:
    """The backend tensor of a Keras variable (the stateless-scope value on JAX); on
    TensorFlow a plain ``tf.Tensor`` (never a variable), which the core's namespace
    lookup recognizes."""
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(v.value if isinstance(v, keras.Variable) else v)
    return ops.convert_to_tensor(v)


def _snapshot(v: Any) -> Any:
    """A copy of a variable's value that later ``assign`` calls cannot alias."""
    if _BACKEND == "torch":
        return v.value.detach().clone()
    if _BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.identity(_read(v))  # a raw tf.Variable has no ``.value`` property
    return v.value


def _sq_norm(grads: list[Any]) -> Any:
    """:func:`psd_core._array.tree_sq_norm` of the gradients. On PyTorch with contiguous
    float32/float64 gradients it is one BLAS dot per tensor (one pass, no temporary,
    as ``psd_torch`` does) instead of a square and a sum."""
    if _BACKEND == "torch":
        import torch

        dts = {g.dtype for g in grads}
        if dts <= {torch.float32, torch.float64} and all(g.is_contiguous() for g in grads):
            sq = [torch.dot(f, f) for f in (g if g.dim() == 1 else g.view(-1) for g in grads)]
            if len(dts) > 1:  # float32 and float64 tensors: summed in float64
                sq = [x.to(torch.float64) for x in sq]
            return torch.stack(sq).sum()
    if _BACKEND == "jax":
        import jax

        # Behind an optimization barrier XLA cannot merge ``g * g`` with the same
        # product in Adam's second moment, which would materialize it (one write and
        # one read of the gradient's size); the reduction then reads ``g`` itself.
        return tree_sq_norm(jax.lax.optimization_barrier(list(grads)))
    return tree_sq_norm(grads)


def _all_finite(grads: list[Any], sq_norm: Any) -> Any:
    """:func:`psd_core._array.tree_all_finite` of ``grads``, read only when needed: a
    NaN or inf entry makes the squared norm ``sq_norm`` non-finite, so a finite one
    proves every entry finite, and only a non-finite one (a non-finite entry, or a
    finite gradient whose square overflows) runs the entrywise check (``ops.cond``,
    on TensorFlow and JAX: XLA:CPU does not fuse the entrywise check into another
    pass, it writes a boolean array per variable and reduces it in several passes).
    Same value as ``tree_all_finite(grads)`` always."""
    fast = ops.isfinite(sq_norm)
    if _BACKEND == "torch":
        # No host read of ``fast`` (no sync on an accelerator): every entry is finite iff
        # each tensor's min and max are (NaN propagates through both, +inf reaches the
        # max, -inf the min). ``torch.aminmax`` is one vectorized read pass; the entrywise
        # ``isfinite(g).all()`` writes a boolean tensor per variable, and
        # ``_foreach_norm(g, inf)`` was about as slow on CPU.
        import torch

        dev = _torch_device(grads)
        if dev is not None and dev.type == "cpu" and not torch.compiler.is_compiling():
            # On CPU reading a scalar on the host costs nothing (no device to wait
            # for), so the entrywise check runs only when the squared norm is not
            # finite, as in ``psd_torch``: one read pass over the gradients fewer.
            if bool(fast):
                return fast
        nonempty = [g for g in grads if g.numel() > 0]  # min/max of nothing are undefined
        if not nonempty:
            return torch.ones((), dtype=torch.bool, device=_torch_device(grads))
        checks = [
            torch.isfinite(g).all()
            if g.is_complex()
            else torch.isfinite(torch.stack(torch.aminmax(g))).all()
            for g in nonempty
        ]
        return torch.stack(checks).all()
    return ops.cond(fast, lambda: fast, lambda: tree_all_finite(grads))


def _norm_and_finite(grads: list[Any], sq_norm: Any) -> tuple[Any, Any]:
    """``(tree_norm(grads), tree_all_finite(grads))`` the cheap way: when the one-pass
    squared norm ``sq_norm`` is finite, every entry is finite and the norm is its square
    root (equal to the overflow-safe norm up to rounding). Only a non-finite one (a
    non-finite entry, or a finite gradient whose square overflows) runs the overflow-safe
    norm and the entrywise check: ``ops.cond`` on TensorFlow and JAX, a host read on
    PyTorch on CPU (free there); on other PyTorch devices both run, with no host read."""
    fast = ops.isfinite(sq_norm)
    if _BACKEND == "torch":
        import torch

        dev = _torch_device(grads)
        cpu = dev is not None and dev.type == "cpu" and not torch.compiler.is_compiling()
        if cpu and bool(fast):
            return ops.sqrt(sq_norm), fast
        return tree_norm(grads), tree_all_finite(grads)
    return ops.cond(
        fast,
        lambda: (ops.sqrt(sq_norm), fast),
        lambda: (tree_norm(grads), tree_all_finite(grads)),
    )


def _scalars_on_host(grads: list[Any]) -> bool:
    """Whether this step's scalar layer runs on NumPy views (PyTorch only): CPU
    tensors, eager (not under ``torch.compile``), outside a Keras ``StatelessScope``
    (whose variables are not written in place). There each 0-d torch op of the core's
    scalar layer costs microseconds of dispatch while the same op on a NumPy 0-d array
    costs about one, and the values are read on the host anyway; ``psd_torch`` runs its
    scalar layer the same way (:func:`psd_torch._common.on_host`)."""
    if _BACKEND != "torch" or not grads:
        return False
    try:
        from keras.src.backend.common.stateless_scope import in_stateless_scope
    except ImportError:  # pragma: no cover - another Keras layout: stay on torch
        return False
    if in_stateless_scope():
        return False
    from psd_torch._common import on_host

    return bool(on_host(*grads))


def _torch_device(grads: list[Any]) -> Any:
    return grads[0].device if grads else None


def _cast_like(updates: list[Any], variables: list[Any]) -> list[Any]:
    """Updates computed in the accumulation dtype, cast once to the variables' dtypes."""
    return [
        u if _dtype(u) == _dtype(v) else ops.cast(u, _dtype(v)) for u, v in zip(updates, variables)
    ]


def _torch_foreach_adam(grads: list[Any], mu: list[Any]) -> bool:
    """Whether :func:`_torch_adam_direction_` applies: PyTorch, float32/float64
    moments and gradients of the same dtype (16-bit moments take the core's path,
    which rounds once per moment, from the accumulation dtype)."""
    return _BACKEND == "torch" and all(
        _dtype(m) in ("float32", "float64") and _dtype(g) == _dtype(m) for g, m in zip(grads, mu)
    )


def _torch_adam_direction_(
    grads: list[Any],
    mu: list[Any],
    nu: list[Any],
    finite: Any,
    bc1: Any,
    bc2: Any,
    c: core.PerturbedAdamConfig,
) -> list[Any]:
    """PyTorch: :func:`psd_core.perturbation.adam_moments` written into the moment
    tensors ``mu``/``nu`` in place and :func:`psd_core.perturbation.adam_direction`
    returned, with ``psd_torch.PerturbedAdam``'s ``torch._foreach_*`` kernels (tested
    against the core functions). Every coefficient comes from the core: the decay
    rates, the bias corrections ``bc1``/``bc2`` and the constant ``e`` of
    :func:`psd_core.perturbation.adam_eps` (Keras's ``epsilon`` convention). A
    non-finite gradient leaves the moments untouched (contract C4); one host read
    of ``(finite, bc1, bc2, e)``, as ``psd_torch`` does."""
    import torch

    from psd_torch.perturbed_adam import PerturbedAdam as TorchPerturbedAdam

    e = core.adam_eps(c.eps, bc2, mu[0], eps_mode=c.eps_mode)
    fin, b1c, b2c, ec = torch.stack(
        [finite.to(bc1.dtype), bc1, ops.cast(bc2, bc1.dtype), ops.cast(e, bc1.dtype)]
    ).tolist()
    if fin:
        TorchPerturbedAdam._moments_(list(grads), list(mu), list(nu), c.b1, c.b2, True)
    return TorchPerturbedAdam._direction(list(mu), list(nu), b1c, b2c, ec, True)


def _jax_norm_and_direction(
    direction: list[Any],
    ma: list[Any],
    va: list[Any],
    m: list[Any],
    v: list[Any],
    bc1: Any,
    bc2: Any,
    c: core.PerturbedAdamConfig,
) -> tuple[Any, list[Any]]:
    """JAX: the squared norm of the Adam ``direction`` and the direction the update
    uses, without a parameter-sized temporary. The direction has two readers, its norm
    (the gate) and the parameter update; XLA:CPU then writes it out once and reads
    it twice, and at 10M parameters that temporary (fresh memory on every step) cost
    more than the rest of the step. Here the norm's reduction computes the direction
    from the moments in its own pass, and the update recomputes it (the same core
    formula, :func:`psd_core.perturbation.adam_direction`) from the written moments
    behind an ``optimization_barrier``, so that XLA cannot merge the two. Where the
    moments are stored in another dtype than the direction's (16-bit moments) the
    shared direction is kept: recomputing it would need the unrounded moments."""
    s2 = tree_sq_norm(direction)
    if any(a is not x for a, x in zip(ma, m)) or any(a is not x for a, x in zip(va, v)):
        return s2, direction
    import jax

    # the bias corrections too: shared scalars would be broadcast once to each
    # variable's shape and that broadcast written out, for both readers (eps as well)
    eps = ops.convert_to_tensor(c.eps, _dtype(bc1))
    ma, va, bc1, bc2, eps = jax.lax.optimization_barrier((list(ma), list(va), bc1, bc2, eps))
    return s2, core.adam_direction(ma, va, bc1, bc2, eps, eps_mode=c.eps_mode)


class _CoreOptimizer(keras.optimizers.Optimizer):
    """Shared plumbing: seed generator, scalar state variables, noise draws."""

    _SCALARS: tuple[tuple[str, str], ...] = ()
    """``(name, kind)`` of the scalar state variables; kind ``"int"``, ``"float"`` or
    ``"bool"`` (kept in an integer variable)."""

    def __init__(
        self, learning_rate: Any, seed: int | None, name: str | None, **kwargs: Any
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        super().__init__(learning_rate=_keras_lr(learning_rate), name=name, **kwargs)
        self.seed = seed
        with keras.name_scope(self.name, caller=self):
            self._seed_generator = keras.random.SeedGenerator(seed, name="noise_seed")
        self._track_variable(self._seed_generator.state)
        self._noise_fn: Callable[[list[Any]], tuple[list[Any], Any]] | None = None
        self._state: dict[str, Any] = {}

    # ---------------------------------------------------------------- state
    def _initial_scalars(self) -> dict[str, Any]:
        return {}

    def _build_scalars(self, variables: list[Any]) -> None:
        acc = _acc_dtype(variables)
        idt = _int_dtype()
        imax = 2**63 - 1 if idt == "int64" else 2**31 - 1
        init = self._initial_scalars()
        for name, kind in self._SCALARS:
            value = init.get(name, 0)
            self._state[name] = self.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(
                    min(int(value), imax) if kind != "float" else value
                ),
                dtype=acc if kind == "float" else idt,
                name=name,
            )

    def _static(self, variables: list[Any]) -> dict[str, Any]:
        """Static facts of the last list of variables stepped (their dtype names, the
        real dimension), kept while the same variables come back: each costs a few
        microseconds per variable to ask Keras for, on every step."""
        key = tuple(map(id, variables))
        hit = self.__dict__.get("_static_cache")
        if hit is None or hit[0] != key:
            hit = (key, {"dtypes": [_dtype(v) for v in variables]})
            self.__dict__["_static_cache"] = hit
        return hit[1]

    def _variable_dtypes(self, variables: list[Any]) -> list[str]:
        return self._static(variables)["dtypes"]

    def _tree_size(self, grads: list[Any], variables: list[Any]) -> int:
        """:func:`psd_core._array.tree_size` of ``grads`` (static: a gradient has its
        variable's shape)."""
        facts = self._static(variables)
        if "dim" not in facts:
            facts["dim"] = tree_size(grads)
        return int(facts["dim"])

    def _read_scalars(self, host: bool = False) -> dict[str, Any]:
        """The scalar state: backend tensors, or with ``host`` (see
        :func:`_scalars_on_host`) zero-copy NumPy views of the torch variables."""
        if host:
            values = {n: self._state[n].value.detach().numpy() for n, _ in self._SCALARS}
            for name, kind in self._SCALARS:
                if kind == "bool":
                    values[name] = values[name].astype(bool)
            return values
        values = {name: _read(self._state[name]) for name, _ in self._SCALARS}
        for name, kind in self._SCALARS:
            if kind == "bool":  # stored as an integer (saved files stay numeric)
                values[name] = ops.cast(values[name], "bool")
        return values

    def _write_scalars(self, values: dict[str, Any], host: bool = False) -> None:
        """Stores the new scalar state. With ``host`` the values are NumPy 0-d arrays:
        all are read as Python numbers first (some may be views of the variables being
        written), then each torch variable is filled in place."""
        if host:
            new = {n: values[n].item() for n, _ in self._SCALARS if n in values}
            for name, value in new.items():
                self._state[name].value.fill_(value)
            return
        for name, _ in self._SCALARS:
            if name in values:
                var = self._state[name]
                self.assign(var, ops.cast(values[name], var.dtype))

    def _set_noise_fn(self, fn: Callable[[list[Any]], tuple[list[Any], Any]] | None) -> None:
        """Test hook: ``fn(variables) -> (normals, uniform)`` replaces the seed generator.

        ``normals`` are backend tensors shaped like the variables, ``uniform`` a 0-d
        tensor (or ``None`` for ``noise="gaussian"``). Called once per step at trace
        time (on every step, perturbing or not, so that a host stream feeding it
        stays aligned with one that draws on every step); the draws are used only
        when the step perturbs. Only meaningful for eager ``optimizer.apply`` loops.
        ``None`` restores the seed generator.
        """
        self._noise_fn = fn

    def _draws(self, variables: list[Any], ball: bool, seed: Any) -> tuple[list[Any], Any, Any]:
        """``(normals, uniform, seed)``: one ``keras.random.normal`` call per draw dtype
        (float16/bfloat16 variables draw in float32 and are cast), split into the
        variables' shapes. ``seed`` is the ``SeedGenerator`` (it advances itself), or on
        JAX the generator's state value, returned advanced by ``[0, 1]`` per call as
        ``SeedGenerator.next`` would."""
        gen = self._seed_generator

        def next_seed() -> Any:
            nonlocal seed
            if seed is gen:
                return gen
            current = seed
            seed = ops.add(seed, ops.convert_to_tensor([0, 1], dtype=seed.dtype))
            return current

        groups: dict[str, list[int]] = {}
        for i, v in enumerate(variables):
            dt = _dtype(v)
            groups.setdefault(dt if dt in ("float32", "float64") else "float32", []).append(i)
        normals: list[Any] = [None] * len(variables)
        for draw_dt, idx in groups.items():
            sizes = [int(math.prod(variables[i].shape)) for i in idx]
            z = keras.random.normal((sum(sizes),), dtype=draw_dt, seed=next_seed())
            parts = [z] if len(idx) == 1 else ops.split(z, list(itertools.accumulate(sizes))[:-1])
            for i, part in zip(idx, parts):
                part = ops.reshape(part, tuple(variables[i].shape))
                dt = _dtype(variables[i])
                normals[i] = part if dt == draw_dt else ops.cast(part, dt)
        uniform = None
        if ball:
            uniform = keras.random.uniform((), dtype=_acc_dtype(variables), seed=next_seed())
        return normals, uniform, seed

    def _apply_grad_part(
        self, coeffs: core.PSDCoefficients, variables: list[Any], grads: list[Any]
    ) -> None:
        """Adds the core's gradient part ``where(finite, a * g, 0)``
        (:func:`psd_core.perturbation.psd_updates` with ``normals=None``; ``g`` may be
        the Adam direction in the accumulation dtype, cast once) to the variables.

        On JAX (XLA) the select fuses into the update. On TensorFlow (a graph of
        separate kernels when not XLA-compiled) and PyTorch (eager) it would cost a
        pass and a parameter-sized zero tensor per variable, so there the update
        ``a * g`` is applied only where ``finite`` holds and ``a != 0``, where it is
        the same value: ``tf.cond``, or on PyTorch one host read of ``(finite, a)`` and
        ``torch._foreach_add_(variables, grads, alpha=a)``, i.e. ``keras.optimizers.SGD``'s
        own update.
        """
        if _BACKEND == "jax":
            step = core.psd_updates(coeffs, grads, None)
            self._apply_updates(variables, _cast_like(step, variables))
            return
        go = coeffs.finite & (coeffs.grad != 0)
        if _BACKEND == "torch":
            import torch

            if isinstance(go, torch.Tensor):
                ok, a = torch.stack([go.to(coeffs.grad.dtype), coeffs.grad]).tolist()
            else:  # the scalar layer ran on the host (NumPy)
                ok, a = bool(go), float(coeffs.grad)
            if not ok:
                return
            vals = [v.value for v in variables]
            if all(g.dtype == x.dtype for g, x in zip(grads, vals)):
                torch._foreach_add_(vals, list(grads), alpha=a)
                return

        def add() -> Any:
            step = [coefficient_for(coeffs.grad, g) * g for g in grads]
            self._apply_updates(variables, _cast_like(step, variables))
            return ops.convert_to_tensor(True)

        if _BACKEND == "torch":
            add()
            return

        ops.cond(go, add, lambda: ops.convert_to_tensor(False))

    def _perturb_if(
        self,
        pred: Any,
        variables: list[Any],
        resets: list[Any],
        noise_updates: Callable[[list[Any], Any], list[Any]],
        ball: bool,
    ) -> None:
        """Where ``pred`` (a 0-d bool tensor) holds: draw, add ``noise_updates(normals,
        uniform)`` to ``variables`` and set ``resets`` (optimizer variables) to zero.
        Otherwise nothing is drawn, written or advanced. See the module docstring."""
        hooked = None if self._noise_fn is None else self._noise_fn(variables)
        gen = self._seed_generator

        def draw(seed: Any) -> tuple[list[Any], Any, Any]:
            if hooked is not None:
                return list(hooked[0]), hooked[1], seed
            return self._draws(variables, ball, seed)

        if _BACKEND == "jax":
            import jax
            import jax.numpy as jnp

            # One ``lax.cond`` carries the variables (already updated by the gradient
            # part), the moments to reset and the seed state; the quiet branch returns
            # them unchanged, so a quiet step writes nothing parameter-sized (issue 16,
            # docs/benchmarks.md, round 6). Not a ``lax.cond`` returning the noise
            # update (zeros on a quiet step, written to a parameter-sized buffer on
            # every step), nor a 0/1-trip ``while_loop``: XLA hoists the draw's
            # loop-invariant counters (two uint32 arrays of the parameters' size) out
            # of the loop body and computes them on every step.
            def on(vals: list[Any], zs: list[Any], seed: Any) -> tuple[Any, ...]:
                normals, uniform, seed = draw(seed)
                ups = _cast_like(noise_updates(normals, uniform), variables)
                vals = [x + u for x, u in zip(vals, ups)]
                return vals, [jnp.zeros_like(x) for x in zs], seed

            def off(vals: list[Any], zs: list[Any], seed: Any) -> tuple[Any, ...]:
                return vals, zs, seed

            vals, zs, seed = jax.lax.cond(
                pred,
                on,
                off,
                [_read(v) for v in variables],
                [_read(r) for r in resets],
                _read(gen.state),
            )
            for v, x in zip(variables, vals):
                v.assign(x)
            for r, x in zip(resets, zs):
                self.assign(r, x)
            gen.state.assign(seed)
            return

        def perturb() -> Any:
            normals, uniform, _ = draw(gen)
            self._apply_updates(variables, noise_updates(normals, uniform))
            for r in resets:
                self.assign(r, ops.zeros_like(_read(r)))
            return ops.convert_to_tensor(True)

        if _BACKEND == "torch":
            if bool(pred):  # one host sync, as in psd_torch
                perturb()
            return
        ops.cond(pred, perturb, lambda: ops.convert_to_tensor(False))

    def _apply_updates(self, variables: list[Any], updates: list[Any]) -> None:
        if _BACKEND == "torch":
            import torch

            torch._foreach_add_([v.value for v in variables], list(updates))
            return
        for v, u in zip(variables, updates):
            self.assign_add(v, u)

    # ---------------------------------------------------------------- step
    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} updates all variables at once (_backend_update_step)"
        )

    def _backend_update_step(
        self, grads: Any, trainable_variables: Any, learning_rate: Any
    ) -> None:
        variables = list(trainable_variables)
        with _no_grad():
            grads = [_dense(g) for g in grads]
            names = self._variable_dtypes(variables)
            grads = [g if _dtype(g) == n else ops.cast(g, n) for g, n in zip(grads, names)]
            lr = ops.convert_to_tensor(learning_rate)
            self._core_step(grads, variables, lr)

    def _core_step(self, grads: list[Any], variables: list[Any], lr: Any) -> None:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["seed"] = self.seed
        return config


@keras.saving.register_keras_serializable(package="psd_keras")
class PSD(_CoreOptimizer):
    """Perturbed saddle-escape descent (PSD) as a Keras 3 optimizer.

    Gradient descent with step ``learning_rate`` that, when the global gradient
    norm is at most ``g_thres`` (and no escape episode runs, and more than
    ``t_thres`` steps passed since the last perturbation), adds a perturbation of
    radius ``radius`` and runs ``episode_length`` plain gradient steps. The math is
    :func:`psd_core.psd`, whose gate threshold is the paper's :math:`\\varepsilon`
    (``epsilon``); see :func:`psd_core.perturbation.psd_config` for every
    hyperparameter (they are validated there: bad values raise ``ValueError``).

    In ``psd_keras`` ``epsilon`` always means Adam's constant (Keras's convention,
    see :class:`PerturbedAdam`), so PSD calls its gate threshold ``g_thres``, as
    psd-optimizer's ``PSDTorch`` / ``PSDTensorFlow`` do. Defaults follow
    ``keras.optimizers.SGD`` (``learning_rate=0.01``) and psd-optimizer
    (``g_thres = radius = 1e-3``).

    Args:
        learning_rate: float, ``keras.optimizers.schedules.LearningRateSchedule``
            or callable (default 0.01).
        g_thres: gate threshold on the global gradient norm (the core's
            ``epsilon``), ``>= 0`` (default 1e-3).
        radius: perturbation radius, ``>= 0`` (default 1e-3).
        episode_length, t_thres, max_episodes, gate, ema_beta, noise,
            step_on_perturb: as in :func:`psd_core.psd`. ``episode_length``,
            ``t_thres`` and ``max_episodes`` are checked at construction and may be
            as large as you like; the counters are int64 (int32 on JAX without
            x64), and a value beyond the counter's range means "effectively
            unlimited" (contract C1).
        seed: seed of the ``keras.random.SeedGenerator`` that draws the noise.
        name, **kwargs: the usual Keras optimizer arguments (``clipnorm``,
            ``global_clipnorm``, ``clipvalue``, ``weight_decay`` (Keras's decoupled
            decay), ``use_ema``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``, ...), applied by Keras's
            ``Optimizer.apply`` as for ``keras.optimizers.SGD``.
    """

    _SCALARS = (
        ("count", "int"),
        ("since_perturb", "int"),
        ("episode_left", "int"),
        ("episodes", "int"),
        ("grad_sq_ema", "float"),
        ("skipped", "int"),
        ("perturbed", "bool"),
    )

    def __init__(
        self,
        learning_rate: Any = 0.01,
        g_thres: float = 1e-3,
        radius: float = 1e-3,
        episode_length: int = 0,
        *,
        t_thres: int = 0,
        max_episodes: int | None = None,
        gate: str = "grad_norm",
        ema_beta: float = 0.1,
        noise: str = "ball",
        step_on_perturb: bool = False,
        seed: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "epsilon" in kwargs:
            raise TypeError(
                "PSD's gate threshold is g_thres (in psd_keras epsilon is Adam's "
                f"constant); got epsilon={kwargs['epsilon']!r}"
            )
        try:
            config = psd_config(
                learning_rate,
                g_thres,
                radius,
                episode_length,
                t_thres=t_thres,
                max_episodes=max_episodes,
                gate=gate,
                ema_beta=ema_beta,
                noise=noise,
                step_on_perturb=step_on_perturb,
            )
        except (ValueError, TypeError) as exc:  # name the Keras argument, not the core's
            raise _rename(exc, (("epsilon", "g_thres"),)) from None
        super().__init__(learning_rate, seed, name, **kwargs)
        self._config = config
        self.max_episodes = max_episodes

    def _initial_scalars(self) -> dict[str, Any]:
        # The core's initial state (psd_init), read once on the host at build time,
        # so the initial values (e.g. since_perturb = t_thres + 1) live only in the core.
        import numpy as np

        init = psd_core.perturbation.psd_init(np.zeros((), dtype=np.float32), self._config)
        kinds = dict(self._SCALARS)
        return {
            name: float(value) if kinds.get(name) == "float" else int(value)
            for name, value in init._asdict().items()
        }

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._build_scalars(list(variables))

    def _core_step(self, grads: list[Any], variables: list[Any], lr: Any) -> None:
        c = self._config
        host = _scalars_on_host(grads)
        if host:
            lr = lr.detach().numpy()
        cfg = psd_config(
            lambda _count: lr,
            c.epsilon,
            c.radius,
            c.episode_length,
            t_thres=c.t_thres,
            max_episodes=self.max_episodes,
            gate=c.gate,
            ema_beta=c.ema_beta,
            noise=c.noise,
            step_on_perturb=c.step_on_perturb,
        )
        state = PSDState(**self._read_scalars(host))
        g2 = _sq_norm(grads)
        finite = _all_finite(grads, g2)
        if host:
            g2, finite = g2.numpy(), finite.numpy()
        dim = self._tree_size(grads, variables)
        ball = c.noise == "ball"

        def coefficients(nsq: Any, uniform: Any) -> tuple[Any, PSDState]:
            return core.psd_coefficients(
                g2, state, cfg, dim=dim, noise_sq_norm=nsq, uniform=uniform, finite=finite
            )

        # The gate, the gradient part and the state do not depend on the draws: ask
        # the core with placeholder noise statistics, then add the noise if it perturbs.
        one = ops.ones_like(g2)
        probe, new_state = coefficients(one, one)
        self._apply_grad_part(probe, variables, grads)

        def noise_updates(normals: list[Any], uniform: Any) -> list[Any]:
            nsq = tree_sq_norm(normals) if ball else None
            if host:  # the draws' statistics to the host, the coefficients back to torch
                from psd_torch._common import scalars_on_host, scalars_to_torch

                co = coefficients(scalars_on_host(nsq), scalars_on_host(uniform))[0]
                return core.psd_updates(scalars_to_torch(co), None, normals)
            return core.psd_updates(coefficients(nsq, uniform)[0], None, normals)

        self._perturb_if(probe.perturb, variables, [], noise_updates, ball)
        self._write_scalars(new_state._asdict(), host)

    @property
    def psd_state(self) -> PSDState:
        """The core state (backend tensors) for logging and tests."""
        return PSDState(**self._read_scalars())

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        c = self._config
        config.update(
            g_thres=c.epsilon,
            radius=c.radius,
            gate=c.gate,
            ema_beta=c.ema_beta,
            noise=c.noise,
            step_on_perturb=c.step_on_perturb,
            episode_length=c.episode_length,
            t_thres=c.t_thres,
            max_episodes=self.max_episodes,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> PSD:
        config = dict(config)
        if "epsilon" in config and "g_thres" not in config:  # saved before the rename
            config["g_thres"] = config.pop("epsilon")
        return super().from_config(config, custom_objects=custom_objects)


@keras.saving.register_keras_serializable(package="psd_keras")
class PerturbedAdam(_CoreOptimizer):
    """Adam that adds noise of radius ``radius`` after ``t_thres`` consecutive small steps.

    The math is :func:`psd_core.perturbed_adam` (psd-optimizer's ``PerturbedAdam``
    with the gate on the *global* norm of the bias-corrected Adam step; on a
    perturbation the update is the noise and both moments are reset). Argument
    names follow ``keras.optimizers.Adam`` (``beta_1``, ``beta_2``, ``epsilon``);
    ``g_thres`` and ``t_thres`` follow psd-optimizer, ``radius`` the rest of this
    project.

    Args:
        learning_rate: float, schedule or callable (default 1e-3).
        beta_1, beta_2: Adam's moment decay rates.
        epsilon: Adam's constant, with Keras's meaning (default 1e-7): the step is
            :math:`\\hat m / (\\sqrt{\\hat v} + \\epsilon / \\sqrt{1-\\beta_2^t})`,
            i.e. ``epsilon`` is added to :math:`\\sqrt{v}` as in
            ``keras.optimizers.Adam`` (the core's ``eps_mode="keras"``), so the same
            arguments give Keras's Adam step.
        g_thres: a step is "small" when the global norm of the bias-corrected Adam
            step is ``<= g_thres``.
        t_thres: consecutive small steps before a perturbation (any int ``>= 0``;
            beyond the counter's range means "never").
        radius: noise radius.
        noise: ``"gaussian"`` or ``"ball"``.
        seed: seed of the noise generator.
        name, **kwargs: the usual Keras optimizer arguments, applied by Keras's
            ``Optimizer.apply`` as for ``keras.optimizers.Adam``.
    """

    _SCALARS = (
        ("count", "int"),
        ("small_steps", "int"),
        ("perturbations", "int"),
        ("skipped", "int"),
        ("perturbed", "bool"),
    )

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        g_thres: float = 1e-3,
        t_thres: int = 10,
        radius: float = 1e-3,
        *,
        noise: str = "gaussian",
        seed: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if "r" in kwargs:
            raise TypeError(f"PerturbedAdam's noise radius is radius; got r={kwargs['r']!r}")
        try:
            config = perturbed_adam_config(
                learning_rate,
                beta_1,
                beta_2,
                epsilon,
                g_thres,
                t_thres,
                radius,
                noise,
                eps_mode="keras",
            )
        except (ValueError, TypeError) as exc:  # name the Keras argument, not the core's
            raise _rename(exc, (("b1", "beta_1"), ("b2", "beta_2"), ("eps", "epsilon"))) from None
        super().__init__(learning_rate, seed, name, **kwargs)
        self._config = config

    def build(self, variables: Any) -> None:
        if self.built:
            return
        variables = list(variables)
        super().build(variables)
        self._mu, self._nu = self.add_optimizer_variables(variables, ["momentum", "velocity"])
        self._build_scalars(variables)

    def _core_step(self, grads: list[Any], variables: list[Any], lr: Any) -> None:
        c = self._config
        idx = [self._get_variable_index(v) for v in variables]
        mu_vars = [self._mu[i] for i in idx]
        nu_vars = [self._nu[i] for i in idx]
        s = self._read_scalars()
        mu = [_read(m) for m in mu_vars]
        nu = [_read(v) for v in nu_vars]
        state = PerturbedAdamState(
            count=s["count"],
            mu=mu,
            nu=nu,
            small_steps=s["small_steps"],
            perturbations=s["perturbations"],
            skipped=s["skipped"],
            perturbed=s["perturbed"],
        )
        g2 = _sq_norm(grads)
        # Contract C4: a non-finite gradient skips the step; a finite one gives a
        # finite direction, so the moments are final as soon as they are computed
        # (new ones, or the old ones on a skipped step) and are written in the same
        # pass. A perturbation's reset to zeros runs with the noise, in _perturb_if.
        finite = _all_finite(grads, g2)
        dim = tree_size(grads)
        ball = c.noise == "ball"
        bc1, bc2 = core.adam_bias_corrections(s["count"] + 1, c.b1, c.b2, g2)
        if _torch_foreach_adam(grads, mu):
            # the variables' own tensors, updated in place
            mu_t, nu_t = [m.value for m in mu_vars], [v.value for v in nu_vars]
            direction = _torch_adam_direction_(grads, mu_t, nu_t, finite, bc1, bc2, c)
        else:
            # the new moments in the accumulation dtype: the direction comes from them,
            # and they are rounded only for storage (16-bit moments, as fused Adam)
            mu1, nu1 = core.adam_moments(grads, mu, nu, c.b1, c.b2, accumulate=True)
            if _BACKEND == "tensorflow":
                # TensorFlow runs each op as its own kernel: a select per moment (two
                # parameter-sized passes) costs more than writing the new moments only
                # where the gradient is finite (``tf.cond``, as the gradient part). The
                # direction then comes from the new moments; on a skipped step it may
                # be non-finite and is not used: the update is not applied and the
                # gate ignores the step norm (``finite=False``).
                def write() -> Any:
                    for var, val in zip(mu_vars, core.adam_store(mu1, mu)):
                        self.assign(var, val)
                    for var, val in zip(nu_vars, core.adam_store(nu1, nu)):
                        self.assign(var, val)
                    return ops.convert_to_tensor(True)

                ops.cond(finite, write, lambda: ops.convert_to_tensor(False))
                ma, va = mu1, nu1
            else:
                m = tree_select(finite, core.adam_store(mu1, mu), mu)
                v = tree_select(finite, core.adam_store(nu1, nu), nu)
                for var, val in zip(mu_vars, m):
                    self.assign(var, val)
                for var, val in zip(nu_vars, v):
                    self.assign(var, val)
                # Where storage keeps the dtype, the written moments (the same values on
                # a finite step). On a skipped step the update is zero whatever the
                # direction is.
                ma = [a if _dtype(a) != _dtype(x) else x for a, x in zip(mu1, m)]
                va = [a if _dtype(a) != _dtype(x) else x for a, x in zip(nu1, v)]
            direction = core.adam_direction(ma, va, bc1, bc2, c.eps, eps_mode=c.eps_mode)
        if _BACKEND == "jax":
            s2, direction = _jax_norm_and_direction(direction, ma, va, m, v, bc1, bc2, c)
        else:
            s2 = _sq_norm(direction)

        def coefficients(nsq: Any, uniform: Any) -> core.PSDCoefficients:
            a = core.perturbed_adam_coefficients(
                s2,
                g2,
                state,
                c,
                dim=dim,
                noise_sq_norm=nsq,
                uniform=uniform,
                learning_rate=lr,
                finite=finite,
            )
            # The core's generic applier computes where(finite, a * d + b * z, 0).
            return a, core.PSDCoefficients(
                grad=a[0].step, noise=a[0].noise, finite=a[0].finite, perturb=a[0].perturb
            )

        one = ops.ones_like(s2)
        (probe, new_state), probe_c = coefficients(one, one)
        self._apply_grad_part(probe_c, variables, direction)

        def noise_updates(normals: list[Any], uniform: Any) -> list[Any]:
            nsq = tree_sq_norm(normals) if ball else None
            # in the direction's (accumulation) dtype, cast once, as the core's update
            z = _cast_like(normals, direction)
            return _cast_like(core.psd_updates(coefficients(nsq, uniform)[1], None, z), variables)

        self._perturb_if(probe.perturb, variables, mu_vars + nu_vars, noise_updates, ball)
        self._write_scalars(new_state._asdict())

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        c = self._config
        config.update(
            beta_1=c.b1,
            beta_2=c.b2,
            epsilon=c.eps,
            g_thres=c.g_thres,
            t_thres=c.t_thres,
            radius=c.radius,
            noise=c.noise,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> PerturbedAdam:
        config = dict(config)
        if "r" in config and "radius" not in config:  # saved before the rename
            config["radius"] = config.pop("r")
        return super().from_config(config, custom_objects=custom_objects)


@keras.saving.register_keras_serializable(package="psd_keras")
class SAM_SPS(_CoreOptimizer):  # noqa: N801 - the method's name
    """SAM / USAM with the stochastic Polyak step size (SAM-SPS), for Keras 3.

    A SAM step needs the loss and a second gradient at the perturbed point, which a
    plain ``optimizer.apply(grads)`` cannot see. Use it with a model built from
    :class:`psd_keras.SAMModel` / :class:`psd_keras.SAMSequential` (or the
    :class:`psd_keras.SAMTrainStep` mixin) so that ``fit`` does both passes, or call
    :meth:`sam_apply` (:meth:`stateless_sam_apply` on JAX) in a custom loop. The
    math is :func:`psd_core.sam_sps`; see :func:`psd_core.polyak.sam_sps_config`.

    A step runs through Keras's own ``Optimizer.apply``, so the standard options
    work as for a built-in optimizer, read as follows for a two-pass step:

    * ``loss_scale_factor``: both gradients (at ``x`` and at the perturbed point
      ``e``) are gradients of the scaled loss and are divided by the factor; the
      losses the Polyak step uses are unscaled.
    * ``clipnorm`` / ``global_clipnorm`` / ``clipvalue``: *both* gradients are
      clipped, the one at ``x`` (it sets the perturbation ``e``) and the one at
      ``e`` (the descent direction and the Polyak denominator).
    * ``use_ema`` / ``ema_momentum`` / ``ema_overwrite_frequency``: as for any
      Keras optimizer (an average of the weights after each step).
    * ``gradient_accumulation_steps`` raises ``ValueError``: the second pass
      evaluates one mini-batch at ``e``, so a perturbation averaged over several
      batches would be paired with the loss of one.
    * ``learning_rate`` and ``seed`` raise ``ValueError``: the step size is the
      Polyak step, capped at ``gamma_b``, and nothing is random. (Keras's
      ``learning_rate`` variable exists, as Keras requires, and is unused.)
    * ``weight_decay`` (default 0.0) is SAM-SPS's L2 term of the final step
      ``x - gamma (g_e + weight_decay * x)``, not Keras's decoupled decay.

    Args:
        rho, lambd, f_star, gamma_b, weight_decay, variant: as in
            :func:`psd_core.sam_sps`.
        name, **kwargs: the usual Keras optimizer arguments (see above).
    """

    _SCALARS = (("count", "int"), ("step_size", "float"), ("skipped", "int"))

    def __init__(
        self,
        rho: float = 0.1,
        lambd: float = 1.0,
        f_star: float = 0.0,
        gamma_b: float = 1.0,
        weight_decay: float = 0.0,
        variant: str = "sps+",
        *,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        config = sam_sps_config(rho, lambd, f_star, gamma_b, weight_decay, variant)
        for arg, why in (
            ("learning_rate", "the step size is the Polyak step, capped by gamma_b"),
            ("seed", "SAM-SPS draws no random numbers"),
        ):
            if arg in kwargs:
                raise ValueError(f"SAM_SPS takes no {arg} ({why}); got {arg}={kwargs[arg]!r}")
        steps = kwargs.get("gradient_accumulation_steps")
        if steps:
            raise ValueError(
                "SAM_SPS does not support gradient_accumulation_steps (its second pass "
                "evaluates one mini-batch at the perturbed point); got "
                f"gradient_accumulation_steps={steps!r}"
            )
        super().__init__(1.0, None, name, **kwargs)
        self._config = config
        self._sam_pass: tuple[Callable[..., Any], Any] | None = None

    def build(self, variables: Any) -> None:
        if self.built:
            return
        super().build(variables)
        self._build_scalars(list(variables))

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        if self._sam_pass is None:
            raise TypeError(
                "SAM_SPS needs the loss and the gradient at the perturbed point: train a "
                "psd_keras.SAMModel / SAMSequential (or a model with the SAMTrainStep mixin) "
                "with fit(), or call optimizer.sam_apply(grads, variables, "
                "value_and_grad_fn=..., loss=...) in a custom loop"
            )
        return super().apply(grads, trainable_variables)

    def sam_apply(
        self,
        grads: Any,
        trainable_variables: Any,
        *,
        value_and_grad_fn: Callable[[list[Any]], tuple[Any, list[Any]]],
        loss: Any = None,
    ) -> None:
        """One SAM-SPS step on ``trainable_variables`` (Keras variables), through
        Keras's ``Optimizer.apply`` (loss-scale unscaling, clipping, EMA,
        constraints, the ``iterations`` counter).

        Args:
            grads: gradients of the mini-batch loss at the current point ``x`` (of
                ``optimizer.scale_loss(loss)`` when ``loss_scale_factor`` is set, as
                for ``Optimizer.apply``). ``None`` entries count as zeros.
            trainable_variables: the variables (builds the optimizer on first use).
            value_and_grad_fn: ``fn(e) -> (loss_e, grads_e)`` evaluating the *same*
                mini-batch loss (unscaled) and its gradient (of the scaled loss, like
                ``grads``) at the perturbed point ``e`` (a list of backend tensors).
                It may assign ``e`` into the variables (TF, PyTorch); the variables
                are set to ``x + update`` afterwards.
            loss: the unscaled loss at ``x`` (only used by the non-finite check).
        """
        variables = list(trainable_variables)
        grads = [ops.zeros_like(_read(v)) if g is None else g for g, v in zip(grads, variables)]
        self._sam_pass = (value_and_grad_fn, loss)
        try:
            self.apply(grads, variables)
        finally:
            self._sam_pass = None

    def _backend_update_step(
        self, grads: Any, trainable_variables: Any, learning_rate: Any
    ) -> None:
        # Called by Optimizer.apply with the unscaled, clipped gradients at x.
        value_and_grad_fn, loss = self._sam_pass  # type: ignore[misc]
        variables = list(trainable_variables)
        grads = [_dense(g) for g in grads]
        params = [_snapshot(v) for v in variables]
        scale = self.loss_scale_factor

        def second_pass(e: list[Any]) -> tuple[Any, list[Any]]:
            with _enable_grad():
                loss_e, grads_e = value_and_grad_fn(e)
            grads_e = [_dense(g) for g in grads_e]
            if scale is not None:
                grads_e = [g / scale for g in grads_e]
            return loss_e, self._clip_gradients(grads_e)

        # psd_core.sam_sps's update, in its two halves, with the norms and finiteness
        # checks taken the cheap way (``_norm_and_finite``: from the one-pass squared norm
        # unless it is not finite) instead of the overflow-safe norm and the entrywise
        # check on every step.
        cfg = self._config
        state = SAMSPSState(**self._read_scalars())
        g2 = _sq_norm(grads)
        gnorm, fin = _norm_and_finite(grads, g2)
        e, offset = psd_core.polyak.sam_sps_perturbation(
            grads, params, state, cfg, grad_sq_norm=g2, grad_norm=gnorm
        )
        loss_e, grads_e = second_pass(e)
        grads_e = list(grads_e)
        ge2 = _sq_norm(grads_e)
        ge_norm, fin_e = _norm_and_finite(grads_e, ge2)
        updates, new_state = psd_core.polyak.sam_sps_descent(
            grads,
            grads_e,
            loss_e,
            offset,
            params,
            state,
            cfg,
            value=None if loss is None else ops.convert_to_tensor(loss),
            finite=fin,
            grad_e_sq_norm=ge2,
            grad_e_norm=ge_norm,
            finite_e=fin_e,
        )
        with _no_grad():
            for v, x_new in zip(variables, psd_core.apply_updates(params, updates)):
                self.assign(v, x_new)
            self._write_scalars(new_state._asdict())

    def stateless_sam_apply(
        self,
        optimizer_variables: list[Any],
        grads: list[Any],
        trainable_variables: list[Any],
        *,
        value_and_grad_fn: Callable[[list[Any]], tuple[Any, list[Any]]],
        loss: Any = None,
    ) -> tuple[list[Any], list[Any]]:
        """Stateless :meth:`sam_apply` (JAX): returns ``(trainable_values, optimizer_values)``."""
        if not self.built:
            raise ValueError(
                "SAM_SPS must be built (optimizer.build(variables)) before stateless_sam_apply"
            )
        mapping = list(zip(self._trainable_variables, trainable_variables)) + list(
            zip(self.variables, optimizer_variables)
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.sam_apply(
                grads, self._trainable_variables, value_and_grad_fn=value_and_grad_fn, loss=loss
            )
        new_trainable = [scope.get_current_value(v) for v in self._trainable_variables]
        new_opt = [scope.get_current_value(v) for v in self.variables]
        return new_trainable, new_opt

    @property
    def step_size(self) -> Any:
        """The last Polyak step size (backend tensor)."""
        return _read(self._state["step_size"])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        c = self._config
        config.pop("seed", None)
        config.pop("learning_rate", None)
        config.update(
            rho=c.rho,
            lambd=c.lambd,
            f_star=c.f_star,
            gamma_b=c.gamma_b,
            weight_decay=c.weight_decay,
            variant=c.variant,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> SAM_SPS:
        config = dict(config)
        # Files saved before SAM_SPS rejected learning_rate/seed hold the unused
        # placeholders learning_rate=1.0 and seed=None; any other value is refused.
        if config.get("learning_rate", 0) == 1.0:
            config.pop("learning_rate")
        if "seed" in config and config["seed"] is None:
            config.pop("seed")
        return cls(**config)
