"""psd_torch optimizers inside PyTorch Lightning (``lightning``), CPU, tiny models.

* ``configure_optimizers`` returns ``SAM_SPS``, ``PSD`` or ``PerturbedAdam``; Lightning's
  automatic optimization passes its closure to ``optimizer.step`` and ``SAM_SPS`` runs
  it twice per step (forward calls counted), also under ``precision="bf16-mixed"``.
* The Lightning run equals a plain PyTorch loop with the same optimizer (independent
  reference: no Lightning), so the closure really drives the optimizer's math.
* ``Trainer.fit(ckpt_path=...)`` resumes exactly: 2 + 2 epochs with a checkpoint in
  between equal 4 uninterrupted epochs bit for bit, and the hyperparameters are chosen
  so that PSD and PerturbedAdam perturb on both sides of the checkpoint (the restored
  generator state matters: a freshly seeded generator would give other draws).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

L = pytest.importorskip("lightning")

from psd_torch import PSD, SAM_SPS, PerturbedAdam  # noqa: E402

N_BATCHES = 4
BATCH = 8

OPTIMIZERS = {
    "SAM_SPS": lambda ps: SAM_SPS(ps, rho=0.05, gamma_b=0.5, weight_decay=0.0),
    # epsilon above every gradient norm: the gate opens after each 2-step episode.
    "PSD": lambda ps: PSD(ps, lr=0.05, epsilon=1e3, radius=0.05, episode_length=2, seed=5),
    # g_thres above every Adam step norm: a perturbation every 3rd step.
    "PerturbedAdam": lambda ps: PerturbedAdam(ps, lr=0.01, g_thres=1e3, t_thres=3, r=0.01, seed=7),
}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_BATCHES * BATCH, 5, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    return [
        (x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(N_BATCHES)
    ]


def _loader() -> torch.utils.data.DataLoader:
    x = torch.cat([b[0] for b in _data()])
    y = torch.cat([b[1] for b in _data()])
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))


class Module(L.LightningModule):
    def __init__(self, name: str, seed: int = 0) -> None:
        super().__init__()
        self.name = name
        self.net = _net(seed)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).float(), y)

    def configure_optimizers(self):
        return OPTIMIZERS[self.name](self.parameters())


def _trainer(max_epochs: int, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kw,
    )


def _fit(module: Module, max_epochs: int, ckpt_path: str | None = None, **kw) -> L.Trainer:
    trainer = _trainer(max_epochs, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers / single-device advice
        trainer.fit(module, train_dataloaders=_loader(), ckpt_path=ckpt_path)
    return trainer


def _plain_loop(name: str, epochs: int) -> list[torch.Tensor]:
    """The same training without Lightning: the reference of the closure protocol."""
    net = _net(0)
    opt = OPTIMIZERS[name](net.parameters())
    for _ in range(epochs):
        for x, y in _data():

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.mse_loss(net(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_drives_the_optimizer(name: str) -> None:
    module = Module(name)
    trainer = _fit(module, max_epochs=1)
    passes = 2 if name == "SAM_SPS" else 1
    assert trainer.global_step == N_BATCHES
    assert module.forwards == passes * N_BATCHES
    for a, b in zip(module.net.parameters(), _plain_loop(name, 1)):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    opt = trainer.optimizers[0]
    if name == "SAM_SPS":
        assert int(opt.steps) == N_BATCHES and int(opt.skipped) == 0
        assert float(opt.step_size) > 0.0


def test_sam_sps_two_passes_under_bf16_mixed() -> None:
    module = Module("SAM_SPS")
    trainer = _fit(module, max_epochs=1, precision="bf16-mixed")
    assert module.forwards == 2 * N_BATCHES
    opt = trainer.optimizers[0]
    assert int(opt.steps) == N_BATCHES and int(opt.skipped) == 0
    assert all(p.dtype == torch.float32 for p in module.parameters())
    # Autocast ran the forward in bfloat16: the run is close to, not equal to, float32.
    ref = _plain_loop("SAM_SPS", 1)
    diff = max(float((a.detach() - b).abs().max()) for a, b in zip(module.net.parameters(), ref))
    assert 0.0 < diff < 5e-2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_from_checkpoint_equals_uninterrupted(name: str, tmp_path) -> None:
    full = Module(name)
    full_trainer = _fit(full, max_epochs=4)

    first = Module(name)
    _fit(first, max_epochs=2).save_checkpoint(tmp_path / "half.ckpt")
    resumed = Module(name, seed=123)  # other initial weights: the checkpoint must restore them
    resumed_trainer = _fit(resumed, max_epochs=4, ckpt_path=str(tmp_path / "half.ckpt"))

    assert resumed_trainer.global_step == full_trainer.global_step == 4 * N_BATCHES
    for a, b in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(a, b)
    o_full, o_res = full_trainer.optimizers[0], resumed_trainer.optimizers[0]
    if name == "PSD":
        assert int(o_full.psd_state.episodes) >= 4  # perturbed before and after the checkpoint
        for k, v in o_full.psd_state._asdict().items():
            assert torch.equal(v, getattr(o_res.psd_state, k)), k
    elif name == "PerturbedAdam":
        assert int(o_full.adam_state["perturbations"]) >= 4
        for k, v in o_full.adam_state.items():
            assert torch.equal(v, o_res.adam_state[k]), k
    else:
        assert int(o_res.steps) == int(o_full.steps) == 4 * N_BATCHES
    if hasattr(o_full, "generator"):
        assert torch.equal(o_full.generator.get_state(), o_res.generator.get_state())


def _drop_generator(tree) -> int:
    """Remove every entry whose key names the generator (wherever the optimizer keeps it)."""
    if not isinstance(tree, dict):
        return 0
    keys = [k for k in tree if isinstance(k, str) and "generator" in k]
    for k in keys:
        del tree[k]
    return len(keys) + sum(_drop_generator(v) for v in tree.values())


def test_resume_without_generator_state_differs(tmp_path) -> None:
    """The exactness above is not vacuous: dropping the saved generator state changes the run."""
    full = Module("PSD")
    _fit(full, max_epochs=4)
    first = Module("PSD")
    trainer = _fit(first, max_epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    ckpt = torch.load(tmp_path / "half.ckpt", weights_only=False)
    removed = [_drop_generator(sd) for sd in ckpt["optimizer_states"]]
    assert sum(removed) == 1
    torch.save(ckpt, tmp_path / "nogen.ckpt")
    resumed = Module("PSD")
    _fit(resumed, max_epochs=4, ckpt_path=str(tmp_path / "nogen.ckpt"))
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), full.parameters()))
