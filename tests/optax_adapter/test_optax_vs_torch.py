"""psd_optax.psd against psd_torch.PSD with identical draws (float64, 1e-10).

The torch optimizer's ``noise_fn`` hook is fed the draws that the Optax
transformation makes from its own PRNG key on the same step.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from optax_trees import to_tree, to_vec

import psd_optax
from psd_core.functions import coupled_quartic

torch = pytest.importorskip("torch")
psd_torch = pytest.importorskip("psd_torch")

jax.config.update("jax_enable_x64", True)

PROBLEM = coupled_quartic(5)


@pytest.mark.parametrize(
    "extra",
    [{}, {"noise": "gaussian", "radius": 0.02}, {"step_on_perturb": True}],
    ids=["ball", "gaussian", "step_on_perturb"],
)
def test_psd_matches_psd_torch(extra):
    try:
        PSD = psd_torch.PSD
    except (AttributeError, ImportError) as exc:  # pragma: no cover - concurrent development
        pytest.skip(f"psd_torch.PSD unavailable: {exc}")
    kw = {**dict(epsilon=0.5, radius=0.1, episode_length=5, t_thres=2), **extra}
    lr = 0.05
    tx = psd_optax.psd(lr, seed=11, **kw)
    params = to_tree(np.full(5, 1e-3))
    state = tx.init(params)
    tparams = [
        torch.tensor(np.asarray(leaf), dtype=torch.float64, requires_grad=True)
        for leaf in jax.tree_util.tree_leaves(params)
    ]
    pending: dict[str, object] = {}

    def noise_fn(ps):
        return pending["normals"], pending["uniform"]

    opt = PSD(tparams, lr=lr, noise_fn=noise_fn, **kw)
    step = jax.jit(tx.update)
    for _ in range(24):
        g = to_tree(PROBLEM.grad(to_vec(params)))
        _, sub = jax.random.split(state.key)
        normals, uniform = psd_optax.gaussian_noise(sub, jax.tree_util.tree_leaves(g))
        pending["normals"] = [torch.from_numpy(np.array(z)) for z in normals]
        pending["uniform"] = torch.tensor(float(uniform), dtype=torch.float64)
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)

        x = torch.cat([p.detach().reshape(-1) for p in tparams])
        gt = PROBLEM.grad(x)
        with torch.no_grad():
            tparams[0].grad = gt[:2].clone()
            tparams[1].grad = gt[2:].reshape(3, 1).clone()
        opt.step()
        np.testing.assert_allclose(
            np.asarray(to_vec(params)),
            torch.cat([p.detach().reshape(-1) for p in tparams]).numpy(),
            rtol=0,
            atol=1e-10,
        )
    assert int(state.episodes) >= 2
