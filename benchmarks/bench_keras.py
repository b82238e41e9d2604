"""Step time of the psd_keras optimizers next to Keras's own, on each Keras backend.

Two measurements, both timed side by side in one process per backend (interleaved
rounds, so background load affects every row alike; the median over rounds is kept):

1. **Optimizer step**: ``--params`` float32 parameters in ``--variables`` Keras
   variables, gradients pre-filled (the same gradient tensors for every optimizer),
   ``optimizer.apply(grads, variables)`` compiled the way ``fit`` compiles a train
   step on that backend with ``jit_compile="auto"`` (Keras 3's
   ``Trainer._resolve_auto_jit_compile``):

   * TensorFlow: ``tf.function(step, reduce_retracing=True, jit_compile=False)`` (Keras
     turns XLA off on CPU-only machines; ``--tf-xla`` adds ``jit_compile=True`` rows,
     what ``fit`` uses when a GPU is present);
   * JAX: ``jax.jit(stateless step, donate_argnums=0)``: the step is
     ``optimizer.stateless_apply(optimizer_values, grads, trainable_values)`` and
     the trainable and optimizer values are donated, as ``fit`` donates its state;
   * PyTorch: eager (Keras does not ``torch.compile`` unless ``jit_compile=True``).

2. **fit step**: a whole ``model.fit`` batch on a small MLP (``--mlp-in`` inputs,
   two hidden ReLU layers of ``--mlp-width``, 10 classes, batch ``--mlp-batch``),
   Keras SGD against psd_keras.PSD and psd_keras.SAM_SPS (two forward/backward
   passes, through ``psd_keras.SAMSequential``). A callback reads the batch loss at
   each ``on_train_batch_end`` (which waits for the step on JAX's asynchronous
   dispatch) and the time between consecutive batch ends is the step time, so the
   per-epoch setup of ``fit`` is not counted.

Without ``--backend`` the script runs itself once per backend (``KERAS_BACKEND`` set
in a child process) and prints each backend's table and then one ratio table.

Usage::

    python benchmarks/bench_keras.py                         # 10M params in 100 variables
    python benchmarks/bench_keras.py --backend jax --params 1000000 --variables 10
    python benchmarks/bench_keras.py --params 20000 --variables 4 --rounds 1 --steps 2 \\
        --mlp-batches 3                                      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BACKENDS = ("tensorflow", "jax", "torch")

# --------------------------------------------------------------------------- constructors
# Every optimizer the script builds, in one place (adapt here when an API changes).
# Positional arguments are used where psd_keras's names are being renamed:
#   PSD(learning_rate, <gate threshold: `epsilon` on main, `g_thres` after h-keras>,
#       radius, episode_length)
#   PerturbedAdam(learning_rate, beta_1, beta_2, epsilon, g_thres, t_thres,
#       <noise radius: `r` on main, `radius` after h-keras>)
# The gradients are 1e-3 * N(0, 1), so ||g|| >> 1e-3 and the PSD gate stays closed;
# PerturbedAdam with g_thres=0 never counts a small step (no perturbation).


def optimizer_table() -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (baseline name, factory) for the optimizer-step rows."""
    import keras

    import psd_keras

    return {
        "keras SGD": ("keras SGD", lambda: keras.optimizers.SGD(1e-3)),
        "psd_keras.PSD (gate closed)": (
            "keras SGD",
            lambda: psd_keras.PSD(1e-3, 1e-3, 1e-3, 10, seed=0),
        ),
        "psd_keras.PSD (perturbs every step)": (
            "keras SGD",
            lambda: psd_keras.PSD(1e-3, 1e9, 1e-3, 0, seed=0),
        ),
        "keras Adam": ("keras Adam", lambda: keras.optimizers.Adam(1e-3)),
        "psd_keras.PerturbedAdam (no perturbation)": (
            "keras Adam",
            lambda: psd_keras.PerturbedAdam(1e-3, 0.9, 0.999, 1e-7, 0.0, 10, 1e-3, seed=0),
        ),
    }


def fit_table() -> dict[str, tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """name -> (baseline name, optimizer factory, model class) for the fit rows."""
    import keras

    import psd_keras

    return {
        "fit: keras SGD": ("fit: keras SGD", lambda: keras.optimizers.SGD(1e-2), keras.Sequential),
        "fit: psd_keras.PSD (gate closed)": (
            "fit: keras SGD",
            lambda: psd_keras.PSD(1e-2, 1e-6, 1e-3, 10, seed=0),
            keras.Sequential,
        ),
        "fit: psd_keras.SAM_SPS (two passes)": (
            "fit: keras SGD",
            lambda: psd_keras.SAM_SPS(0.05),
            psd_keras.SAMSequential,
        ),
    }


def _sq_norm_floor(grads: list[Any]) -> Any:
    """The gradients' squared norm with the backend's cheapest stock primitive: one
    BLAS dot per tensor on PyTorch, ``sum(square(g))`` elsewhere (XLA fuses it into
    one read; TensorFlow without XLA runs two kernels)."""
    import keras
    from keras import ops

    if keras.backend.backend() == "torch":
        import torch

        return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum()
    return sum(ops.sum(ops.square(g)) for g in grads)


def floor_table() -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (baseline name, factory) for ``--floor``: Keras's own SGD and Adam with
    the reads that PSD and PerturbedAdam cannot do without, and nothing else.

    * PSD with its gate closed must read the gradients once more, for the global
      norm (the gate, and the finiteness check of contract C4), before or beside
      SGD's update: ``keras SGD + gradient norm`` is Keras SGD whose learning rate is
      multiplied by ``isfinite(||g||^2)`` (so the norm is computed and used).
    * PerturbedAdam must also take the global norm of the Adam direction
      ``m_hat / (sqrt(v_hat) + eps)`` (its gate): ``keras Adam + gradient and
      direction norms`` is Keras Adam, its learning rate scaled as above, followed by
      the direction's squared norm from the updated moments, written to an optimizer
      variable so that the compiler keeps it.

    The rows are stock Keras and backend code (no psd_core, no psd_keras): what the
    same compiler makes of the least extra work each algorithm needs."""
    import keras
    from keras import ops

    # the backend's own classes (keras.optimizers.SGD() is a torch_sgd.SGD on PyTorch,
    # with its foreach update; a subclass of keras.optimizers.SGD itself is not)
    sgd_cls, adam_cls = type(keras.optimizers.SGD()), type(keras.optimizers.Adam())

    class SGDPlusNorm(sgd_cls):  # type: ignore[misc, valid-type]
        def _backend_update_step(self, grads: Any, variables: Any, learning_rate: Any) -> None:
            super()._backend_update_step(grads, variables, _gated_lr(grads, learning_rate))

    class AdamPlusNorms(adam_cls):  # type: ignore[misc, valid-type]
        def build(self, variables: Any) -> None:
            super().build(variables)
            self._floor_d2 = self.add_variable((), name="floor_d2")

        def _backend_update_step(self, grads: Any, variables: Any, learning_rate: Any) -> None:
            super()._backend_update_step(grads, variables, _gated_lr(grads, learning_rate))
            t = ops.cast(self.iterations + 1, "float32")
            bc1 = 1 - ops.power(ops.cast(self.beta_1, "float32"), t)
            bc2 = 1 - ops.power(ops.cast(self.beta_2, "float32"), t)
            d2 = 0.0
            for v in variables:
                i = self._get_variable_index(v)
                m, nu = self._momentums[i].value, self._velocities[i].value
                d = (m / bc1) / (ops.sqrt(nu / bc2) + self.epsilon)
                d2 = d2 + ops.sum(ops.square(d))
            self._floor_d2.assign(d2)

    return {
        "floor: keras SGD + gradient norm": (
            "keras SGD",
            lambda: SGDPlusNorm(1e-3),
        ),
        "floor: keras Adam + gradient and direction norms": (
            "keras Adam",
            lambda: AdamPlusNorms(1e-3),
        ),
    }


def _gated_lr(grads: Any, learning_rate: Any) -> Any:
    """``learning_rate * isfinite(||g||^2)``: the norm is computed and used. On PyTorch
    (eager, CPU) a Python float read on the host, as psd_keras and psd_torch do on CPU
    (free there): a tensor ``alpha`` takes a slower ``_foreach_add_`` path."""
    import keras
    from keras import ops

    g2 = _sq_norm_floor(list(grads))
    lr = learning_rate * ops.cast(ops.isfinite(g2), _dtype_of(learning_rate))
    return float(lr) if keras.backend.backend() == "torch" else lr


def _dtype_of(x: Any) -> str:
    import keras

    return keras.backend.standardize_dtype(x.dtype)


TARGETS = {
    "psd_keras.PSD (gate closed)": 2.0,
    "psd_keras.PerturbedAdam (no perturbation)": 1.3,
    "fit: psd_keras.SAM_SPS (two passes)": 2.5,
}
"""Issue 16's targets: ratio to the row's baseline."""


# --------------------------------------------------------------------------- one backend
def _steps_table(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[], Any]]]:
    return {**optimizer_table(), **(floor_table() if args.floor else {})}


def _make_values(n: int, k: int, seed: int) -> list[Any]:
    import numpy as np

    sizes = [n // k] * k
    sizes[-1] += n - sum(sizes)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in sizes]


def _optimizer_steppers(
    args: argparse.Namespace,
    xla: bool,
    memory: dict[str, float] | None = None,
    faults: dict[str, float] | None = None,
) -> dict[str, Callable[[], None]]:
    """name -> run ``args.steps`` compiled optimizer steps (and wait for them). On JAX
    with ``memory`` given, ``memory[name]`` is the compiled step's temporary buffers
    (``compile().memory_analysis().temp_size_in_bytes``) over the parameters' bytes,
    and with ``faults`` given, ``faults[name]`` is the memory the process touched for
    the first time per step (minor page faults times the page size, from
    ``getrusage``, over a second warm-up call) over the parameters' bytes: temporaries
    that the step writes in freshly mapped memory."""
    import keras

    backend = keras.backend.backend()
    p0 = _make_values(args.params, args.variables, 0)
    g0 = [1e-3 * g for g in _make_values(args.params, args.variables, 1)]
    grads = [keras.ops.convert_to_tensor(g) for g in g0]
    out: dict[str, Callable[[], None]] = {}
    for name, (_, factory) in _steps_table(args).items():
        variables = [keras.Variable(p, name=f"w{i:03d}") for i, p in enumerate(p0)]
        opt = factory()
        opt.build(variables)
        if backend == "tensorflow":
            import tensorflow as tf

            def tf_step(opt: Any, variables: list[Any]) -> Callable[[], Any]:
                # a closure: tf.function must not see the variables as arguments
                return lambda: opt.apply(grads, variables)

            fn = tf.function(tf_step(opt, variables), reduce_retracing=True, jit_compile=xla)

            def run(fn: Any = fn, opt: Any = opt) -> None:
                for _ in range(args.steps):
                    fn()
                opt.iterations.numpy()  # the steps ran

        elif backend == "jax":
            import jax

            def stateless(tv: Any, ov: Any, g: Any, opt: Any = opt) -> Any:
                return opt.stateless_apply(ov, g, tv)

            fn = jax.jit(stateless, donate_argnums=(0, 1))
            box = [[v.value for v in variables], [v.value for v in opt.variables]]
            # no aliasing between the donated buffers and the Keras variables
            box = jax.tree_util.tree_map(lambda a: a.copy(), box)
            if memory is not None:
                mem = fn.lower(box[0], box[1], grads).compile().memory_analysis()
                memory[name] = mem.temp_size_in_bytes / (4 * args.params)

            def run(fn: Any = fn, box: list[Any] = box) -> None:
                tv, ov = box
                for _ in range(args.steps):
                    tv, ov = fn(tv, ov, grads)
                jax.block_until_ready((tv, ov))
                box[0], box[1] = tv, ov

        else:

            def run(opt: Any = opt, variables: list[Any] = variables) -> None:
                for _ in range(args.steps):
                    opt.apply(grads, variables)

        run()  # compile + warm up
        if faults is not None:
            faults[name] = _fresh_bytes(run) / args.steps / (4 * args.params)
        out[name + (" [XLA]" if xla else "")] = run
    return out


def _fresh_bytes(run: Callable[[], None]) -> float:
    """Bytes of memory first touched (minor page faults x page size) during ``run()``."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return float((after - before) * resource.getpagesize())


def _fit_steppers(args: argparse.Namespace) -> dict[str, Callable[[], list[float]]]:
    """name -> run one ``fit`` epoch of ``args.mlp_batches`` batches, return step times."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    n = args.mlp_batch * args.mlp_batches
    x = rng.standard_normal((n, args.mlp_in), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype("int32")

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[float] = []

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if logs and "loss" in logs:
                float(logs["loss"])  # waits for the step (JAX dispatches asynchronously)
            self.ends.append(time.perf_counter())

    out: dict[str, Callable[[], list[float]]] = {}
    for name, (_, factory, model_cls) in fit_table().items():
        keras.utils.set_random_seed(0)
        model = model_cls(
            [
                keras.Input((args.mlp_in,)),
                keras.layers.Dense(args.mlp_width, activation="relu"),
                keras.layers.Dense(args.mlp_width, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=factory(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

        def run(model: Any = model) -> list[float]:
            timer = StepTimer()
            model.fit(
                x,
                y,
                batch_size=args.mlp_batch,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[timer],
            )
            return [b - a for a, b in zip(timer.ends, timer.ends[1:])]

        run()  # compile + warm up
        out[name] = run
    return out


def run_backend(args: argparse.Namespace) -> dict[str, Any]:
    import keras

    backend = keras.backend.backend()
    memory: dict[str, float] | None = {} if args.memory and backend == "jax" else None
    faults: dict[str, float] | None = {} if args.memory and backend == "jax" else None
    opt_runs = (
        {}
        if args.skip_optimizer
        else _optimizer_steppers(args, xla=False, memory=memory, faults=faults)
    )
    if backend == "tensorflow" and args.tf_xla and not args.skip_optimizer:
        opt_runs.update(_optimizer_steppers(args, xla=True))
    fit_runs = {} if args.skip_fit else _fit_steppers(args)

    opt_samples: dict[str, list[float]] = {k: [] for k in opt_runs}
    fit_samples: dict[str, list[float]] = {k: [] for k in fit_runs}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, run in opt_runs.items():
            t0 = time.perf_counter()
            run()
            opt_samples[name].append((time.perf_counter() - t0) / args.steps)
        for name, run in fit_runs.items():
            fit_samples[name].extend(run())

    baselines = {k: b for k, (b, _) in _steps_table(args).items()}
    baselines.update({k + " [XLA]": b + " [XLA]" for k, b in baselines.items()})
    baselines.update({k: b for k, (b, _, _) in fit_table().items()})
    times = {k: statistics.median(v) for k, v in {**opt_samples, **fit_samples}.items() if v}
    rows = [
        {"name": k, "baseline": baselines[k], "ms": 1e3 * t, "ratio": t / times[baselines[k]]}
        for k, t in times.items()
    ]
    return {
        "backend": backend,
        "keras": keras.__version__,
        "backend_version": _backend_version(backend),
        "load": statistics.mean(loads),
        "rows": rows,
        "memory": memory or {},
        "faults": faults or {},
    }


def _backend_version(backend: str) -> str:
    import importlib

    mod = importlib.import_module(backend)
    threads = f", {mod.get_num_threads()} threads" if backend == "torch" else ""
    return f"{backend} {mod.__version__}{threads}"


def print_backend(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n## Keras backend {res['backend']} ({res['backend_version']}, keras {res['keras']}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {res['load']:.1f})\n"
    )
    print(
        f"Optimizer step: {args.params:,} float32 params in {args.variables} variables, "
        f"median of {args.rounds} rounds of {args.steps} steps. fit step: MLP "
        f"{args.mlp_in}-{args.mlp_width}-{args.mlp_width}-10, batch {args.mlp_batch}, "
        f"median over {args.rounds} epochs of {args.mlp_batches} batches.\n"
    )
    print("| optimizer | baseline | ms/step | ratio | target |")
    print("|---|---|---:|---:|---:|")
    for r in res["rows"]:
        t = TARGETS.get(r["name"].removesuffix(" [XLA]"))
        target = f"<= {t}x" if t else ""
        print(f"| {r['name']} | {r['baseline']} | {r['ms']:.2f} | {r['ratio']:.2f}x | {target} |")
    if res.get("memory"):
        print(
            "\nCompiled step's temporaries (`memory_analysis().temp_size_in_bytes`), in parameter sizes:\n"
        )
        for name, x in res["memory"].items():
            print(f"- {name}: {x:.2f}x")
    if res.get("faults"):
        print(
            "\nMemory first touched per step (minor page faults x page size, `getrusage`),"
            " in parameter sizes:\n"
        )
        for name, x in res["faults"].items():
            print(f"- {name}: {x:.2f}x")


def print_summary(results: list[dict[str, Any]]) -> None:
    names: list[str] = []
    for res in results:
        for r in res["rows"]:
            if r["name"] not in names and r["name"] != r["baseline"]:
                names.append(r["name"])
    cols = [res["backend"] for res in results]
    print("\n## Ratio to the baseline, per backend\n")
    print("| optimizer | baseline | " + " | ".join(cols) + " | target |")
    print("|---|---|" + "---:|" * len(cols) + "---:|")
    for name in names:
        cells, base = [], ""
        for res in results:
            row = next((r for r in res["rows"] if r["name"] == name), None)
            cells.append(f"{row['ratio']:.2f}x" if row else "")
            base = row["baseline"] if row else base
        t = TARGETS.get(name.removesuffix(" [XLA]"))
        print(f"| {name} | {base} | " + " | ".join(cells) + f" | {f'<= {t}x' if t else ''} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=BACKENDS, help="run in this process (KERAS_BACKEND)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="backends to spawn")
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--variables", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    ap.add_argument("--mlp-in", type=int, default=256)
    ap.add_argument("--mlp-width", type=int, default=512)
    ap.add_argument("--mlp-batch", type=int, default=256)
    ap.add_argument("--mlp-batches", type=int, default=20, help="batches per fit epoch")
    ap.add_argument("--tf-xla", action="store_true", help="also TF jit_compile=True rows")
    ap.add_argument("--torch-threads", type=int, help="torch backend: torch.set_num_threads")
    ap.add_argument(
        "--memory",
        action="store_true",
        help="JAX: print the compiled steps' temporary bytes and the memory first touched per step",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also the floor rows: Keras SGD/Adam plus only the norms PSD/PerturbedAdam need",
    )
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--skip-optimizer", action="store_true")
    ap.add_argument("--json", action="store_true", help="(child) print one JSON result line")
    args = ap.parse_args(argv)

    if args.backend:
        if os.environ.get("KERAS_BACKEND") != args.backend:
            raise SystemExit(f"--backend {args.backend} needs KERAS_BACKEND={args.backend}")
        if args.backend == "torch" and args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        res = run_backend(args)
        if args.json:
            print("#RESULT " + json.dumps(res))
        else:
            print_backend(res, args)
        return

    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                *passthrough,
                "--backend",
                backend,
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("#RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"\n## Keras backend {backend}: FAILED (exit {proc.returncode})\n")
            print("```\n" + proc.stderr[-3000:] + "\n```")
            continue
        res = json.loads(lines[-1].removeprefix("#RESULT "))
        print_backend(res, args)
        results.append(res)
    if results:
        print_summary(results)
    if len(results) < len(args.backends.split(",")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
