"""psd_torch's curvature check inherits the core's Lanczos fix in float32 (issue 11, bug 2).

At the minimum of ``f(w) = 1.5 ||w||^2`` (Hessian ``3 I``, no negative curvature) the
gate is open on every step (zero gradient), so the curvature check decides alone
whether to perturb. The exact answer is "never". Before the fix, float32 Lanczos
invented eigenvalues near -87 from rounding noise and the optimizer perturbed 6 times
in 60 steps (0 times in float64).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from psd_torch import PSD  # noqa: E402


def _episodes_at_the_minimum(dtype: torch.dtype, mode: str, steps: int = 60) -> tuple[int, float]:
    w = torch.nn.Parameter(torch.zeros(10, dtype=dtype))
    opt = PSD(
        [w],
        lr=0.1,
        epsilon=1e-3,
        radius=0.1,
        episode_length=5,
        seed=0,
        curvature=mode,
        curvature_gamma=0.5,
        curvature_iters=10,
    )

    def closure():
        opt.zero_grad()
        loss = 1.5 * (w * w).sum()
        loss.backward(retain_graph=(mode == "hvp"))
        return loss

    for _ in range(steps):
        opt.step(closure)
    return int(opt.psd_state.episodes), float(w.detach().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_hvp_curvature_check_never_perturbs_at_a_minimum(dtype):
    episodes, moved = _episodes_at_the_minimum(dtype, "hvp")
    assert episodes == 0
    assert moved == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_grad_diff_curvature_check_never_perturbs_at_a_minimum(dtype):
    episodes, moved = _episodes_at_the_minimum(dtype, "grad_diff")
    assert episodes == 0
    assert moved == 0.0


def test_hvp_curvature_check_still_perturbs_at_a_strict_saddle_in_float32():
    """The fix must not hide real negative curvature: f = sum(w^4 - w^2), Hessian -2 I at 0."""
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float32))
    opt = PSD(
        [w],
        lr=0.1,
        epsilon=1e-3,
        radius=0.1,
        episode_length=5,
        seed=0,
        curvature="hvp",
        curvature_gamma=0.5,
        curvature_iters=10,
    )

    def closure():
        opt.zero_grad()
        loss = ((w * w) ** 2 - w * w).sum()
        loss.backward(retain_graph=True)
        return loss

    opt.step(closure)
    assert int(opt.psd_state.episodes) == 1
