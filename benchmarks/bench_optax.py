"""Step time of the psd_optax transformations next to their Optax counterparts.

Everything is jit-compiled; the gradients are pre-filled (random float32 arrays), so
only the optimizer's own work is timed. ``sam_sps`` gets a ``value_and_grad_fn`` that
returns the pre-filled gradients and a constant loss (optimizer work only, no model).
Each optimizer is timed with and without donated ``params``/``state`` buffers; the
runs are interleaved (round robin) and the best of ``--repeats`` rounds is kept.

Two reference rows build, from Optax's own parts, what PerturbedAdam's gate needs on
top of Adam: ``adam + update norm`` keeps the global norm of Adam's update in its
state (the gate is on that norm), and ``apply_if_finite(adam)`` is
``optax.apply_if_finite`` around Adam (a whole step skipped on a non-finite value,
the core's policy). They show what each ingredient costs in Optax itself.

Rows marked ``(fused)`` step with :func:`psd_optax.update_and_apply` (update and
apply in one, the noise added by an in-place ``lax.while_loop``) instead of
``tx.update`` + ``optax.apply_updates``.

Usage::

    python benchmarks/bench_optax.py                  # 10M params in 100 leaves
    python benchmarks/bench_optax.py --params 1000000 --leaves 10 --steps 5   # quick

Prints a markdown table: ms per step and the ratio to the baseline of each row.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psd_optax


def make_tree(n_params: int, n_leaves: int, seed: int) -> dict[str, jax.Array]:
    sizes = [n_params // n_leaves] * n_leaves
    sizes[-1] += n_params - sum(sizes)
    rng = np.random.default_rng(seed)
    return {
        f"w{i:03d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32))
        for i, s in enumerate(sizes)
    }


def with_update_norm(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` that also keeps ``optax.global_norm`` of its updates in the state."""

    def init(params: Any) -> Any:
        return inner.init(params), jnp.zeros((), jnp.float32)

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        updates, inner_state = inner.update(updates, state[0], params)
        return updates, (inner_state, optax.global_norm(updates))

    return optax.GradientTransformation(init, update)


def build(name: str, grads: Any) -> tuple[Any, Callable[..., Any]]:
    """(transformation, step(params, state, grads) -> (params, state))."""
    lr = 1e-3
    fused = name.endswith(" (fused)")
    name = name.removesuffix(" (fused)")
    if name == "sgd":
        tx = optax.sgd(lr)
    elif name == "adam":
        tx = optax.adam(lr)
    elif name == "adam + update norm":
        tx = with_update_norm(optax.adam(lr))
    elif name == "apply_if_finite(adam)":
        tx = optax.apply_if_finite(optax.adam(lr), max_consecutive_errors=10**9)
    elif name == "psd":
        # The gate stays closed on these gradients (||g|| >> epsilon): the usual step.
        tx = psd_optax.psd(lr, epsilon=1e-3, radius=1e-3, episode_length=10)
    elif name == "perturbed_adam":
        tx = psd_optax.perturbed_adam(lr, g_thres=1e-3, t_thres=10, radius=1e-3)
    elif name == "polyak_sgd":
        tx = optax.polyak_sgd(max_learning_rate=1.0, f_min=0.0)
    elif name == "sam_sps":
        tx = psd_optax.sam_sps(rho=0.05, lambd=1.0, f_star=0.0, gamma_b=1.0)
    elif name == "contrib.sam":
        tx = optax.contrib.sam(
            optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)), sync_period=2
        )
    else:  # pragma: no cover
        raise ValueError(name)

    loss = jnp.asarray(1.0, jnp.float32)

    if name == "polyak_sgd":

        def step(params: Any, state: Any, g: Any) -> Any:
            u, state = tx.update(g, state, params, value=loss)
            return optax.apply_updates(params, u), state

    elif name == "sam_sps":

        def step(params: Any, state: Any, g: Any) -> Any:
            u, state = tx.update(
                g, state, params, value=loss, value_and_grad_fn=lambda _e: (loss, g)
            )
            return optax.apply_updates(params, u), state

    elif fused:

        def step(params: Any, state: Any, g: Any) -> Any:
            return psd_optax.update_and_apply(tx, g, state, params)

    else:

        def step(params: Any, state: Any, g: Any) -> Any:
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

    return tx, step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=10_000_000, help="total float32 parameters")
    ap.add_argument("--leaves", type=int, default=100, help="number of leaves")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (best kept)")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated rows to time (each row's baseline is added), e.g. "
        "'perturbed_adam (fused),perturbed_adam'",
    )
    args = ap.parse_args(argv)

    params0 = make_tree(args.params, args.leaves, 0)
    grads = make_tree(args.params, args.leaves, 1)
    names = [
        "sgd",
        "psd",
        "psd (fused)",
        "polyak_sgd",
        "sam_sps",
        "contrib.sam",
        "adam",
        "adam + update norm",
        "apply_if_finite(adam)",
        "perturbed_adam",
        "perturbed_adam (fused)",
    ]
    baseline = {
        "sgd": "sgd",
        "psd": "sgd",
        "psd (fused)": "sgd",
        "polyak_sgd": "sgd",
        "sam_sps": "sgd",
        "contrib.sam": "sgd",
        "adam": "adam",
        "adam + update norm": "adam",
        "apply_if_finite(adam)": "adam",
        "perturbed_adam": "adam",
        "perturbed_adam (fused)": "adam",
    }
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            ap.error(f"--only: unknown rows {sorted(unknown)}; rows are {names}")
        wanted |= {baseline[w] for w in wanted}
        names = [n for n in names if n in wanted]
    runs: dict[tuple[str, bool], Any] = {}
    for name in names:
        for donate in (False, True):
            tx, step = build(name, grads)
            fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
            params = jax.tree_util.tree_map(jnp.copy, params0)
            state = jax.tree_util.tree_map(jnp.copy, tx.init(params))  # no aliasing with params
            for _ in range(2):  # compile + warm up
                params, state = fn(params, state, grads)
            jax.block_until_ready((params, state))
            runs[(name, donate)] = [fn, params, state]

    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            fn, params, state = run
            t0 = time.perf_counter()
            for _ in range(args.steps):
                params, state = fn(params, state, grads)
            jax.block_until_ready((params, state))
            best[key] = min(best[key], (time.perf_counter() - t0) / args.steps)
            run[1], run[2] = params, state

    print(
        f"# psd_optax benchmark: {args.params:,} float32 params in {args.leaves} leaves, "
        f"{args.steps} steps x {args.repeats} rounds (best), jax {jax.__version__}, "
        f"optax {optax.__version__}, {jax.devices()[0].platform} ({platform.machine()})\n"
    )
    print("| optimizer | baseline | ms/step | ratio | ms/step (donated) | ratio (donated) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        b = baseline[name]
        row = [name, b]
        for donate in (False, True):
            t = best[(name, donate)]
            row += [f"{1e3 * t:.2f}", f"{t / best[(b, donate)]:.2f}x"]
        print("| " + " | ".join(row) + " |")
    print()
    for name in ("psd", "psd (fused)"):
        if name not in names or "polyak_sgd" not in names:
            continue
        for donate in (False, True):
            r = best[(name, donate)] / best[("polyak_sgd", donate)]
            print(f"{name} / polyak_sgd{' (donated)' if donate else ''}: {r:.2f}x")


if __name__ == "__main__":
    main()
