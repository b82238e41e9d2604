"""How far float32 SAM-SPS runs drift from a float64 run: ours and the peer ``sam_sps``.

Run: ``python benchmarks/sam_sps_drift.py`` (about a minute on 2 CPU cores).

The setup is ``tests/torch_adapter/test_sam_sps.py::test_matches_peer_sam_sps_on_cnn``: a
conv-BN CNN on 512 scikit-learn digits, mini-batches of 128, ``rho=0.1``, ``gamma_b=0.3``,
32 steps. The reference is ``psd_torch.SAM_SPS`` in float64 (parameters *and* scalars in
float64). The peer's "float64" run is not one: ``sam_sps.SAM_SPS`` casts the gradients to
float32 for its norms and inner product, so its own float64-vs-float32 gap understates
the float32 drift. Printed: the largest relative difference of the Polyak step size
``gamma_t`` over the 32 steps, for each run against the float64 reference.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from psd_torch import SAM_SPS


def _data(dtype: torch.dtype, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=dtype).unsqueeze(1)
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def _cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 16, 10),
    )
    return net.to(dtype)


def step_sizes(kind: str, dtype: torch.dtype, wd: float, lambd: float, steps: int) -> np.ndarray:
    x, y = _data(dtype)
    model = _cnn(dtype)
    kw = dict(weight_decay=wd, rho=0.1, lambd=lambd, gamma_b=0.3)
    if kind == "peer":
        import sam_sps

        opt = sam_sps.SAM_SPS(model.parameters(), **kw)
    else:
        opt = SAM_SPS(model.parameters(), restore="subtract", **kw)
    out = []
    for i in range(steps):
        j = (i * 128) % x.shape[0]
        xb, yb = x[j : j + 128], y[j : j + 128]

        def closure(xb=xb, yb=yb):
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
        out.append(float(opt.param_groups[0]["lr"]))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; {args.steps} steps; max relative |gamma - gamma_ref|")
    print(
        "| weight_decay | lambd | ours float32 | peer float32 | peer 'float64' | ours vs peer (float32) |"
    )
    print("|---|---|---|---|---|---|")
    for wd, lambd in [(0.0, 1.0), (5e-4, 1.0), (0.0, 0.0), (5e-4, 0.0)]:
        ref = step_sizes("ours", torch.float64, wd, lambd, args.steps)
        runs = {
            "o32": step_sizes("ours", torch.float32, wd, lambd, args.steps),
            "p32": step_sizes("peer", torch.float32, wd, lambd, args.steps),
            "p64": step_sizes("peer", torch.float64, wd, lambd, args.steps),
        }

        def rel(a: np.ndarray, b: np.ndarray) -> float:
            return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))

        print(
            f"| {wd:g} | {lambd:g} | {rel(runs['o32'], ref):.2e} | {rel(runs['p32'], ref):.2e} "
            f"| {rel(runs['p64'], ref):.2e} | {rel(runs['o32'], runs['p32']):.2e} |"
        )


if __name__ == "__main__":
    main()
