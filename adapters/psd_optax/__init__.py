"""Optax adapter for :mod:`psd_core`: ``optax.GradientTransformationExtraArgs`` factories.

* :func:`psd` / :func:`from_theory` — perturbed saddle-escape descent;
* :func:`perturbed_adam` — PerturbedAdam (psd-optimizer semantics, global gate);
* :func:`sam_sps` — SAM / USAM with the stochastic Polyak step size.

They follow Optax's conventions: ``init`` returns uncommitted arrays (a leafless
tree is accepted, for ``optax.tree.map_params``), ``update`` ignores extra keyword
arguments, randomness is a ``seed`` or ``key`` (int or PRNG key, possibly traced)
and every number argument can be injected with ``optax.inject_hyperparams``.

All the math (gates, state machines, coefficients, the non-finite policy) comes from
:mod:`psd_core`; this package flattens pytrees, keeps the PRNG key in the state,
draws noise with ``jax.random`` only on perturbing steps (``jax.lax.cond``) and
returns optax updates. :func:`update_and_apply` is the fused step (update and
apply in one, noise added by an in-place ``lax.while_loop``). Everything is
jit-able, vmap-able and works with sharded parameters. See ``docs/guides/optax.md``.

Precision (the core's): non-finite steps are decided by ``tree_all_finite`` of the
gradient (a finite 1e20 in float32 is applied), and the Adam direction and SAM-SPS's
offset and step are computed in the accumulation dtype (float32 for float16/bfloat16
parameters) and cast once.

Complex parameters follow Optax's convention: pass the *conjugate* of ``jax.grad``
(``optax.tree.conj(grads)``, as Optax's own tests do; JAX's gradient of a real
function of complex ``w`` is the conjugate of torch's), and have ``sam_sps``'s
``value_and_grad_fn`` return conjugated gradients too. Then every transformation
equals the same problem on the real pairs ``[re, im]``
(``tests/optax_adapter/test_optax_precision.py``).
"""

from __future__ import annotations

from psd_core.polyak import SAMSPSState

from ._adam import PerturbedAdamState, perturbed_adam
from ._common import NoiseFn, gaussian_noise
from ._fused import update_and_apply
from ._psd import PSDState, from_theory, psd
from ._sam_sps import sam_sps

__all__ = [
    "NoiseFn",
    "PSDState",
    "PerturbedAdamState",
    "SAMSPSState",
    "from_theory",
    "gaussian_noise",
    "perturbed_adam",
    "psd",
    "sam_sps",
    "update_and_apply",
]
