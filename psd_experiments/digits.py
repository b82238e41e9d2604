"""Experiment 6 — real data: scikit-learn's digits with a small MLP in PyTorch.

64-32-10 ReLU MLP, cross-entropy, mini-batches of 64, a stratified 70/30
train/test split (standardized on the train part). Methods:

* SGD with the learning rate tuned on a grid {0.01, 0.03, 0.1, 0.3} by accuracy
  on a 20% validation split of the training set (seed 0), then rerun on the
  full training set; SGD + ``CosineAnnealingLR`` at the tuned rate; Adam (lr 1e-3).
  All ``torch.optim``.
* SAM-SPS (lambd=1) and USAM-SPS (lambd=0) at rho in {0.05, 0.1, 0.2}: no learning
  rate (Polyak step, f*=0, gamma_b=1).
* PSD (PSDTorch semantics: SGD step every call at the tuned lr, Gaussian noise
  r=1e-3 when ||g|| <= 1e-2 and more than 50 steps since the last one) and
  PerturbedAdam (psd-optimizer defaults).

The psd-core methods use the PyTorch adapters (``psd_torch``) when they import
and run; otherwise the core's pure transformations (``psd_core.sam_sps``,
``psd_core.psd``, ``psd_core.perturbed_adam``) are driven directly on the torch
tensors. The ``implementation`` column says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import ExperimentResult, RunConfig, new_figure, progress, save_figure, write_csv

NAME = "digits"
COLUMNS = [
    "method",
    "rho",
    "lr",
    "implementation",
    "seeds",
    "test_acc_mean",
    "test_acc_std",
    "final_train_loss",
    "epochs",
    "wall_time_s",
]
LR_GRID = [0.01, 0.03, 0.1, 0.3]
RHOS = [0.05, 0.1, 0.2]
BATCH = 64


def _data(seed: int = 0):
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    sc = StandardScaler().fit(Xtr)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    li = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return t(sc.transform(Xtr)), li(ytr), t(sc.transform(Xte)), li(yte)


def _init(seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (32, 10), (10,)]
    out = []
    for s in shapes:
        if len(s) == 2:
            w = torch.randn(s, generator=g) * (2.0 / s[0]) ** 0.5
        else:
            w = torch.zeros(s)
        out.append(w.requires_grad_(True))
    return out


def _loss(params: list[Any], X: Any, y: Any) -> Any:
    import torch.nn.functional as Fn

    W1, b1, W2, b2 = params
    return Fn.cross_entropy(Fn.relu(X @ W1 + b1) @ W2 + b2, y)


def _accuracy(params: list[Any], X: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        W1, b1, W2, b2 = params
        pred = (torch.relu(X @ W1 + b1) @ W2 + b2).argmax(dim=1)
        return float((pred == y).float().mean())


def _batches(n: int, seed: int, epochs: int):
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            yield perm[i : i + BATCH]


# -- steppers: each returns (step(params, Xb, yb) -> loss, implementation) -----------------


def _torch_optim(kind: str, params: list[Any], lr: float, total_steps: int):
    import torch

    opt = torch.optim.Adam(params, lr=lr) if kind == "Adam" else torch.optim.SGD(params, lr=lr)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        if kind == "SGD+cosine"
        else None
    )

    def step(Xb: Any, yb: Any) -> float:
        opt.zero_grad()
        loss = _loss(params, Xb, yb)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return float(loss.detach())

    name = {"Adam": "torch.optim.Adam", "SGD": "torch.optim.SGD"}.get(
        kind, "torch.optim.SGD+CosineAnnealingLR"
    )
    return step, name


def _sam_sps(params: list[Any], rho: float, lambd: float, seed: int):
    import torch

    try:
        from psd_torch import SAM_SPS

        opt = SAM_SPS(params, weight_decay=0.0, rho=rho, lambd=lambd, f_star=0.0, gamma_b=1.0)

        def step(Xb: Any, yb: Any) -> float:
            def closure() -> Any:
                loss = _loss(params, Xb, yb)
                loss.backward()
                return loss

            return float(opt.step(closure).detach())

        return step, "psd_torch.SAM_SPS"
    except Exception:  # adapter missing or incompatible: drive the core directly
        import psd_core

        tx = psd_core.sam_sps(rho, lambd, 0.0, 1.0, 0.0)
        state = [tx.init([p.detach() for p in params])]

        def step(Xb: Any, yb: Any) -> float:
            loss = _loss(params, Xb, yb)
            grads = list(torch.autograd.grad(loss, params))

            def vg(e: list[Any]) -> tuple[Any, list[Any]]:
                e = [t.detach().requires_grad_(True) for t in e]
                le = _loss(e, Xb, yb)
                return le.detach(), [g.detach() for g in torch.autograd.grad(le, e)]

            upd, state[0] = tx.update(
                grads,
                state[0],
                [p.detach() for p in params],
                value_and_grad_fn=vg,
                value=loss.detach(),
            )
            with torch.no_grad():
                for p, u in zip(params, upd):
                    p.add_(u)
            return float(loss.detach())

        return step, "psd_core.sam_sps (driven on torch tensors)"


def _psd(params: list[Any], lr: float, seed: int):
    import torch

    kw = dict(t_thres=50, noise="gaussian", step_on_perturb=True)
    try:
        from psd_torch import PSD

        opt = PSD(params, lr=lr, epsilon=1e-2, radius=1e-3, seed=seed, **kw)

        def step(Xb: Any, yb: Any) -> float:
            opt.zero_grad()
            loss = _loss(params, Xb, yb)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step, "psd_torch.PSD"
    except Exception:
        import psd_core

        tx = psd_core.psd(lr, 1e-2, 1e-3, **kw)
        state = [tx.init([p.detach() for p in params])]
        gen = torch.Generator().manual_seed(seed)

        def step(Xb: Any, yb: Any) -> float:
            loss = _loss(params, Xb, yb)
            grads = [g.detach() for g in torch.autograd.grad(loss, params)]
            normals = [torch.randn(g.shape, generator=gen) for g in grads]
            upd, state[0] = tx.update(grads, state[0], normals=normals)
            with torch.no_grad():
                for p, u in zip(params, upd):
                    p.add_(u)
            return float(loss.detach())

        return step, "psd_core.psd (driven on torch tensors)"


def _perturbed_adam(params: list[Any], seed: int):
    import torch

    try:
        from psd_torch import PerturbedAdam

        opt = PerturbedAdam(params, lr=1e-3, g_thres=1e-3, t_thres=10, r=1e-3, seed=seed)

        def step(Xb: Any, yb: Any) -> float:
            opt.zero_grad()
            loss = _loss(params, Xb, yb)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return step, "psd_torch.PerturbedAdam"
    except Exception:
        import psd_core

        tx = psd_core.perturbed_adam(1e-3, g_thres=1e-3, t_thres=10, radius=1e-3)
        state = [tx.init([p.detach() for p in params])]
        gen = torch.Generator().manual_seed(seed)

        def step(Xb: Any, yb: Any) -> float:
            loss = _loss(params, Xb, yb)
            grads = [g.detach() for g in torch.autograd.grad(loss, params)]
            normals = [torch.randn(g.shape, generator=gen) for g in grads]
            upd, state[0] = tx.update(grads, state[0], normals=normals)
            with torch.no_grad():
                for p, u in zip(params, upd):
                    p.add_(u)
            return float(loss.detach())

        return step, "psd_core.perturbed_adam (driven on torch tensors)"


def _train(
    make: Callable[[list[Any], int], tuple[Callable[[Any, Any], float], str]],
    data: tuple[Any, Any, Any, Any],
    seed: int,
    epochs: int,
) -> tuple[float, float, str, list[float]]:
    import torch

    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = data
    params = _init(seed)
    step, impl = make(params, seed)
    losses: list[float] = []
    per_epoch = (Xtr.shape[0] + BATCH - 1) // BATCH
    epoch_losses: list[float] = []
    for k, idx in enumerate(_batches(Xtr.shape[0], seed, epochs)):
        losses.append(step(Xtr[idx], ytr[idx]))
        if (k + 1) % per_epoch == 0:
            epoch_losses.append(float(np.mean(losses[-per_epoch:])))
    return _accuracy(params, Xte, yte), epoch_losses[-1], impl, epoch_losses


def run(cfg: RunConfig) -> ExperimentResult:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    epochs = 8 if cfg.quick else 30
    seeds = [cfg.seed] if cfg.quick else [cfg.seed + k for k in range(3)]
    Xtr, ytr, Xte, yte = _data(0)
    n_train = Xtr.shape[0]
    steps_total = epochs * ((n_train + BATCH - 1) // BATCH)

    # 1. tune SGD's learning rate on a validation split (seed cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n_train, generator=g)
    n_val = n_train // 5
    val, tr = perm[:n_val], perm[n_val:]
    tune_data = (Xtr[tr], ytr[tr], Xtr[val], ytr[val])
    jobs: list[tuple[str, float, Any]] = [("tune", lr, None) for lr in LR_GRID]
    jobs += [("final", 0.0, None)]
    val_acc: dict[float, float] = {}
    for _, lr, _ in progress(jobs[:-1], f"{NAME} (SGD lr grid)", cfg):
        acc, *_ = _train(
            lambda p, s, lr=lr: _torch_optim("SGD", p, lr, steps_total), tune_data, cfg.seed, epochs
        )
        val_acc[lr] = acc
    best_lr = max(LR_GRID, key=lambda lr: (val_acc[lr], -lr))

    data = (Xtr, ytr, Xte, yte)
    methods: list[tuple[str, float, float, Callable[..., Any]]] = [
        (
            "SGD (tuned lr)",
            float("nan"),
            best_lr,
            lambda p, s: _torch_optim("SGD", p, best_lr, steps_total),
        ),
        (
            "SGD+cosine",
            float("nan"),
            best_lr,
            lambda p, s: _torch_optim("SGD+cosine", p, best_lr, steps_total),
        ),
    ]
    for rho in RHOS:
        methods.append(
            ("SAM-SPS", rho, float("nan"), lambda p, s, rho=rho: _sam_sps(p, rho, 1.0, s))
        )
        methods.append(
            ("USAM-SPS", rho, float("nan"), lambda p, s, rho=rho: _sam_sps(p, rho, 0.0, s))
        )
    methods += [
        ("Adam", float("nan"), 1e-3, lambda p, s: _torch_optim("Adam", p, 1e-3, steps_total)),
        ("PSD", float("nan"), best_lr, lambda p, s: _psd(p, best_lr, s)),
        ("PerturbedAdam", float("nan"), 1e-3, lambda p, s: _perturbed_adam(p, s)),
    ]
    rows, curves = [], {}
    for name, rho, lr, make in progress(methods, NAME, cfg):
        t0 = time.perf_counter()
        accs, losses, impl, curve = [], [], "", []
        for s in seeds:
            acc, fl, impl, curve_s = _train(make, data, s, epochs)
            accs.append(acc)
            losses.append(fl)
            curve.append(curve_s)
        curves[(name, rho)] = np.mean(np.asarray(curve), axis=0)
        rows.append(
            dict(
                method=name,
                rho=rho,
                lr=lr,
                implementation=impl,
                seeds=len(seeds),
                test_acc_mean=float(np.mean(accs)),
                test_acc_std=float(np.std(accs)),
                final_train_loss=float(np.mean(losses)),
                epochs=epochs,
                wall_time_s=time.perf_counter() - t0,
            )
        )
    path = cfg.path(f"{NAME}.csv")
    write_csv(path, COLUMNS, rows)
    png = cfg.path(f"{NAME}.png")
    _figure(rows, curves, png)
    best = max(rows, key=lambda r: r["test_acc_mean"])
    headline = f"best test accuracy: {best['method']} {100 * best['test_acc_mean']:.1f}%"
    grid = [dict(lr=lr, val_acc=val_acc[lr]) for lr in LR_GRID]
    notes = [
        f"sklearn load_digits, 70/30 stratified split (random_state=0), 64-32-10 ReLU MLP, batch {BATCH}, "
        f"{epochs} epochs, seeds {seeds} (model init and batch order); std is over seeds (population std).",
        f"SGD lr tuned on a 20% validation split of the training set: best lr = {best_lr:g}.",
        "No weight decay anywhere. SAM-SPS/USAM-SPS: f_star=0, gamma_b=1, variant sps+. PSD: lr = tuned "
        "SGD lr, epsilon=1e-2, radius=1e-3 (gaussian), t_thres=50, step_on_perturb=True. PerturbedAdam: "
        "lr=1e-3, g_thres=1e-3, t_thres=10, r=1e-3.",
    ]
    return ExperimentResult(
        NAME,
        path,
        png,
        rows,
        COLUMNS,
        headline,
        notes,
        extra_tables=[("SGD learning-rate grid (validation accuracy)", ["lr", "val_acc"], grid)],
    )


def _figure(rows: list[dict[str, Any]], curves: dict[Any, Any], path: str) -> None:
    fig, (ax1, ax2) = new_figure(2)
    labels = [r["method"] + (f" {r['rho']:g}" if r["rho"] == r["rho"] else "") for r in rows]
    y = np.arange(len(rows))
    ax1.barh(
        y, [100 * r["test_acc_mean"] for r in rows], xerr=[100 * r["test_acc_std"] for r in rows]
    )
    ax1.set_yticks(y, labels, fontsize=7)
    lo = min(100 * r["test_acc_mean"] for r in rows)
    ax1.set_xlim(max(0.0, lo - 5), 100)
    ax1.set_xlabel("test accuracy (%)")
    ax1.set_title("digits MLP: test accuracy")
    for k, ((name, rho), c) in enumerate(curves.items()):
        ax2.plot(
            np.arange(1, len(c) + 1),
            c,
            label=name + (f" {rho:g}" if rho == rho else ""),
            color=f"C{k % 10}",
            lw=1,
        )
    ax2.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("train loss (epoch mean)")
    ax2.legend(fontsize=5)
    save_figure(fig, path)
