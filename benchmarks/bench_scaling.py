"""How the optimizers' cost grows: step ratio to the framework's SGD/Adam vs model size.

For PyTorch (``psd_torch.PSD`` vs ``torch.optim.SGD(foreach=True)``, ``PerturbedAdam``
vs ``torch.optim.Adam(foreach=True)``, ``SAM_SPS`` (optimizer work, both passes) vs
SGD) and Optax (``psd`` vs ``sgd``, ``perturbed_adam`` vs ``adam``, ``sam_sps`` vs
``sgd``, built by ``bench_optax.build``: jit-compiled, gradients pre-filled), the
ratio of step times at ``--sizes`` float32 parameters split into each of
``--tensors`` equal tensors, plus one realistic small model: a 100k-parameter MLP
(10 ``Linear`` layers = 20 tensors of very different sizes, ``--mlp``).

A ratio that stays flat as the size grows is a per-byte overhead (more memory
traffic per parameter); one that falls with size is a per-tensor or per-call
overhead (Python, kernel launches, dispatch), which dominates small models.

Every optimizer of one (framework, size, tensors) point is built first and the
steps are timed in interleaved rounds (``--rounds``, median kept); the number of
steps per round shrinks with the size (``--work`` parameter-steps per round).

Usage::

    python benchmarks/bench_scaling.py                           # 1e5..1e8, 10 and 1000 tensors
    python benchmarks/bench_scaling.py --sizes 1e5,1e6 --frameworks torch --rounds 3
    python benchmarks/bench_scaling.py --plot docs/benchmarks_figures/cost_growth.png \\
        --json-out scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (name, baseline name); the baseline of a baseline is itself.
TORCH_ROWS = [
    ("SGD(foreach)", "SGD(foreach)"),
    ("PSD", "SGD(foreach)"),
    ("SAM_SPS", "SGD(foreach)"),
    ("Adam(foreach)", "Adam(foreach)"),
    ("PerturbedAdam", "Adam(foreach)"),
]
OPTAX_ROWS = [
    ("sgd", "sgd"),
    ("psd", "sgd"),
    ("psd (fused)", "sgd"),
    ("sam_sps", "sgd"),
    ("adam", "adam"),
    ("perturbed_adam", "adam"),
    ("perturbed_adam (fused)", "adam"),
]

MLP_WIDTHS = [64] + [106] * 9 + [10]
"""A 100k-parameter MLP: 64 inputs, 9 hidden layers of 106, 10 outputs (20 tensors)."""


def mlp_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(MLP_WIDTHS, MLP_WIDTHS[1:]):
        shapes += [(b, a), (b,)]
    return shapes


def n_params(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def split_shapes(n: int, k: int) -> list[tuple[int, ...]]:
    sizes = [n // k] * k
    sizes[-1] += n - sum(sizes)
    return [(s,) for s in sizes]


# --------------------------------------------------------------------------- torch
def torch_factories() -> dict[str, tuple[Callable[[list[Any]], Any], bool]]:
    """name -> (factory(params) -> optimizer, steps with a closure). One place to adapt."""
    import torch

    from psd_torch import PSD, SAM_SPS, PerturbedAdam

    return {
        "SGD(foreach)": (lambda ps: torch.optim.SGD(ps, lr=1e-3, foreach=True), False),
        "Adam(foreach)": (lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), False),
        # gate closed: ||g|| >> 1e-3 on these gradients
        "PSD": (lambda ps: PSD(ps, 1e-3, 1e-3, 1e-3, seed=0), False),
        "PerturbedAdam": (lambda ps: PerturbedAdam(ps, lr=1e-3, g_thres=0.0, seed=0), False),
        "SAM_SPS": (lambda ps: SAM_SPS(ps), True),
    }


def torch_steppers(shapes: list[tuple[int, ...]]) -> dict[str, Callable[[], None]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    out: dict[str, Callable[[], None]] = {}
    for name, (factory, closure_mode) in torch_factories().items():
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        grads = [1e-3 * torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt = factory(params)
        if closure_mode:
            loss = torch.tensor(1.0)

            def closure(params: Any = params, grads: Any = grads, loss: Any = loss) -> Any:
                for p, g in zip(params, grads):
                    p.grad = g
                return loss

            def step(opt: Any = opt, closure: Any = closure) -> None:
                opt.step(closure)

        else:

            def step(opt: Any = opt) -> None:
                opt.step()

        out[name] = step
    return out


def torch_train_steppers(batch: int) -> dict[str, Callable[[], None]]:
    """A whole training step on the 100k MLP (``MLP_WIDTHS``, ReLU, cross-entropy on a
    fixed random batch): forward, backward and the optimizer step (``SAM_SPS``: two
    forward/backward passes, through ``step(closure)``). Every model starts from the
    same weights."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, MLP_WIDTHS[0], generator=gen)
    y = torch.randint(0, MLP_WIDTHS[-1], (batch,), generator=gen)
    out: dict[str, Callable[[], None]] = {}
    for name, (factory, closure_mode) in torch_factories().items():
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b in zip(MLP_WIDTHS, MLP_WIDTHS[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        opt = factory(list(model.parameters()))

        def closure(model: Any = model, opt: Any = opt) -> Any:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure_mode:

            def step(opt: Any = opt, closure: Any = closure) -> None:
                opt.step(closure)

        else:

            def step(opt: Any = opt, closure: Any = closure) -> None:
                closure()
                opt.step()

        out[name] = step
    return out


def torch_runner(
    shapes: list[tuple[int, ...]], train_batch: int | None = None
) -> dict[str, Callable[[int], None]]:
    steppers = torch_steppers(shapes) if train_batch is None else torch_train_steppers(train_batch)

    def make(step: Callable[[], None]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                step()

        return run

    return {k: make(v) for k, v in steppers.items()}


# --------------------------------------------------------------------------- optax
def optax_runner(shapes: list[tuple[int, ...]], donate: bool) -> dict[str, Callable[[int], None]]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_optax import build

    rng = np.random.default_rng(0)

    def tree(scale: float) -> dict[str, Any]:
        return {
            f"w{i:04d}": jnp.asarray(scale * rng.standard_normal(s, dtype=np.float32))
            for i, s in enumerate(shapes)
        }

    params0 = tree(1.0)
    grads = tree(1e-3)
    out: dict[str, Callable[[int], None]] = {}
    for name, _ in OPTAX_ROWS:
        tx, step = build(name, grads)
        fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
        params = jax.tree_util.tree_map(jnp.copy, params0)
        state = jax.tree_util.tree_map(jnp.copy, tx.init(params))
        box = [params, state]

        def run(n: int, fn: Any = fn, box: list[Any] = box) -> None:
            p, s = box
            for _ in range(n):
                p, s = fn(p, s, grads)
            jax.block_until_ready((p, s))
            box[0], box[1] = p, s

        out[name] = run
    return out


# --------------------------------------------------------------------------- driver
def measure(
    framework: str,
    shapes: list[tuple[int, ...]],
    args: argparse.Namespace,
    train_batch: int | None = None,
) -> dict[str, float]:
    """name -> median seconds per step (``train_batch``: whole training steps, torch)."""
    n = n_params(shapes)
    if framework == "torch":
        runs = torch_runner(shapes, train_batch)
    else:
        runs = optax_runner(shapes, args.donate)
    steps = max(args.min_steps, min(args.max_steps, int(args.work / n)))
    for run in runs.values():
        run(2)  # compile + warm up
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(steps)
            samples[name].append((time.perf_counter() - t0) / steps)
    del runs
    gc.collect()
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--frameworks", default="torch,optax")
    ap.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="total float32 parameters")
    ap.add_argument("--tensors", default="10,1000", help="tensor counts")
    ap.add_argument("--no-mlp", dest="mlp", action="store_false", help="skip the 100k MLP")
    ap.add_argument(
        "--train-step",
        type=int,
        default=0,
        metavar="BATCH",
        help="torch: also time whole training steps of the 100k MLP (forward, backward, "
        "step) at this batch size",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    ap.add_argument("--work", type=float, default=3e8, help="parameter-steps per round")
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument(
        "--torch-threads", type=int, help="torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument("--donate", action="store_true", help="Optax: donate params and state")
    ap.add_argument("--json-out", help="write the results as JSON")
    ap.add_argument("--json-in", help="plot/print results of an earlier --json-out run")
    ap.add_argument("--plot", help="write the cost-growth figure (PNG) here")
    args = ap.parse_args(argv)

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.json_in:
        data = json.loads(Path(args.json_in).read_text())
    else:
        data = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "donate": args.donate,
            "points": [],
        }
        points = []
        for fw in args.frameworks.split(","):
            cases: list[tuple[str, int, list[tuple[int, ...]]]] = []
            for k in (int(t) for t in args.tensors.split(",")):
                for n in (int(float(s)) for s in args.sizes.split(",")):
                    cases.append((f"{k} tensors", n, split_shapes(n, k)))
            if args.mlp:
                shapes = mlp_shapes()
                cases.insert(0, ("MLP (20 tensors)", n_params(shapes), shapes))
            train = f"MLP train step (batch {args.train_step})"
            if args.train_step and fw == "torch":
                cases.insert(0, (train, n_params(mlp_shapes()), mlp_shapes()))
            rows = TORCH_ROWS if fw == "torch" else OPTAX_ROWS
            for layout, n, shapes in cases:
                load = os.getloadavg()[0]
                times = measure(fw, shapes, args, args.train_step if layout == train else None)
                for name, base in rows:
                    points.append(
                        {
                            "framework": fw,
                            "layout": layout,
                            "tensors": len(shapes),
                            "params": n,
                            "name": name,
                            "baseline": base,
                            "ms": 1e3 * times[name],
                            "baseline_ms": 1e3 * times[base],
                            "ratio": times[name] / times[base],
                            "load": load,
                        }
                    )
                print(f"# {fw} {layout} {n:,} params done (load {load:.1f})", flush=True)
                if args.json_out:  # partial results survive an interrupted run
                    Path(args.json_out).write_text(json.dumps({**data, "points": points}))
        data["points"] = points
        import jax
        import torch

        data["versions"] = (
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}"
        )
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(data, indent=1))

    print_table(data)
    if args.plot:
        plot(data, args.plot)


def print_table(data: dict[str, Any]) -> None:
    print(
        f"\n# cost growth: {data['machine']}, {data.get('versions', '')}, {data['date']}, "
        f"optax donated={data['donate']}\n"
    )
    print(
        "| framework | optimizer | baseline | layout | params | ms/step | baseline ms | ratio | load |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for p in data["points"]:
        if p["name"] == p["baseline"]:
            continue
        print(
            f"| {p['framework']} | {p['name']} | {p['baseline']} | {p['layout']} | "
            f"{p['params']:,} | {p['ms']:.3f} | {p['baseline_ms']:.3f} | {p['ratio']:.2f}x | "
            f"{p['load']:.1f} |"
        )


def plot(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = sorted({p["framework"] for p in data["points"]}, reverse=True)
    fig, axes = plt.subplots(1, len(frameworks), figsize=(6 * len(frameworks), 4.5), squeeze=False)
    for ax, fw in zip(axes[0], frameworks):
        pts = [p for p in data["points"] if p["framework"] == fw and p["name"] != p["baseline"]]
        names = list(dict.fromkeys(p["name"] for p in pts))
        layouts = [lay for lay in dict.fromkeys(p["layout"] for p in pts) if "MLP" not in lay]
        styles = ["-o", "--s", ":^"]
        for ci, name in enumerate(names):
            color = f"C{ci}"
            for li, lay in enumerate(layouts):
                xs = [
                    (p["params"], p["ratio"])
                    for p in pts
                    if p["name"] == name and p["layout"] == lay
                ]
                if xs:
                    ax.plot(
                        *zip(*sorted(xs)),
                        styles[li % 3],
                        color=color,
                        label=f"{name} / {pts[[q['name'] for q in pts].index(name)]['baseline']}, {lay}",
                    )
            mlp = [p for p in pts if p["name"] == name and p["layout"] == "MLP (20 tensors)"]
            for p in mlp:
                ax.plot(
                    p["params"],
                    p["ratio"],
                    "*",
                    color=color,
                    markersize=14,
                    markeredgecolor="k",
                    label=f"{name}, 100k MLP (20 tensors)",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("float32 parameters")
        ax.set_ylabel("step time / baseline step time")
        ax.set_title(f"{fw}: flat = per-byte, falling = per-tensor/per-call overhead", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Cost growth ({data['machine']}, {data['date']})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
