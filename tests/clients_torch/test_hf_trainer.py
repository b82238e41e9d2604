"""psd_torch optimizers inside Hugging Face ``transformers.Trainer`` (CPU, offline).

A tiny GPT-2 (``GPT2Config``: 1 layer, ``n_embd=32``, random initialization, no download)
is fine-tuned on a short corpus written by the test and tokenized with a char-level
mapping (no tokenizer download). Each Trainer run is compared with an independent plain
PyTorch loop over the same batches (``train_sampling_strategy="sequential"``, dropout 0):

* ``optimizers=(PerturbedAdam(...), scheduler)`` and ``(PSD(...), scheduler)``: the
  Trainer's run equals the loop that calls ``opt.step(); scheduler.step()``, with
  perturbations on both (the counters agree);
* ``SAM_SPS`` through :class:`psd_torch.hf.SAMTrainer` (the ``training_step`` hook):
  two forward passes per step and the same parameters as ``SAM_SPS.step(closure)``;
* a plain ``Trainer`` with ``SAM_SPS`` fails with the optimizer's closure error.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from psd_torch import PSD, SAM_SPS, PerturbedAdam  # noqa: E402
from psd_torch.hf import SAMTrainer  # noqa: E402

CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a small language model learns to spell the words it reads. "
    "saddle points are escaped by a perturbation of small radius. "
)
BLOCK = 16
BATCH = 4
STEPS = 6


def _tokens() -> tuple[list[list[int]], int]:
    vocab = sorted(set(CORPUS))
    ids = [vocab.index(c) for c in CORPUS]
    blocks = [ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)][: 2 * BATCH]
    return blocks, len(vocab)


class CharDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _example(torch.tensor(self.blocks[i]))


def _example(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs and labels; the first label of each block is ignored (-100): no position
    predicts it, and the Trainer counts the non-ignored labels to normalize the loss
    (``num_items_in_batch``), so the Trainer's loss is then the plain mean."""
    labels = ids.clone()
    labels[..., 0] = -100
    return {"input_ids": ids, "labels": labels}


def _model(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


OPTIMIZERS = {
    # g_thres above every Adam step norm: perturbations every 3rd step.
    "PerturbedAdam": lambda ps: PerturbedAdam(ps, lr=3e-3, g_thres=1e3, t_thres=2, r=1e-3, seed=1),
    # epsilon above every gradient norm: the gate opens after each 1-step episode.
    "PSD": lambda ps: PSD(ps, lr=0.05, epsilon=1e3, radius=1e-2, episode_length=1, seed=2),
}


def _schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _batches(blocks: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(STEPS):
        k = s % (len(blocks) // BATCH)
        out.append(_example(torch.tensor(blocks[k * BATCH : (k + 1) * BATCH])))
    return out


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trainer_with_optimizer_and_scheduler_equals_plain_loop(name: str, tmp_path) -> None:
    blocks, vocab = _tokens()
    model = _model(vocab)
    opt = OPTIMIZERS[name](model.parameters())
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=CharDataset(blocks),
        optimizers=(opt, _schedule(opt)),
    )
    trainer.train()
    assert trainer.state.global_step == STEPS

    ref = _model(vocab)
    ref_opt = OPTIMIZERS[name](ref.parameters())
    ref_sched = _schedule(ref_opt)
    ref.train()
    for batch in _batches(blocks):
        ref_opt.zero_grad()
        ref(**batch).loss.backward()
        ref_opt.step()
        ref_sched.step()
    _assert_same_params(model, ref)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < ref_opt.defaults["lr"]
    if name == "PSD":
        assert int(opt.psd_state.episodes) == int(ref_opt.psd_state.episodes) >= 2
    else:
        n = int(opt.adam_state["perturbations"])
        assert n == int(ref_opt.adam_state["perturbations"]) >= 1


def test_sam_trainer_runs_two_passes_and_equals_closure_step(tmp_path) -> None:
    blocks, vocab = _tokens()
    hyper = dict(rho=0.05, gamma_b=0.5, weight_decay=0.0)
    model = _model(vocab)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    opt = SAM_SPS(model.parameters(), **hyper)
    trainer = SAMTrainer(
        model=model,
        args=_args(tmp_path, max_grad_norm=1.0),  # the Trainer clips the spent gradients: harmless
        train_dataset=CharDataset(blocks),
        optimizers=(opt, None),
    )
    trainer.train()
    assert trainer.state.global_step == STEPS
    assert len(forwards) == 2 * STEPS
    assert int(opt.steps) == STEPS and int(opt.skipped) == 0

    ref = _model(vocab)
    ref_opt = SAM_SPS(ref.parameters(), **hyper)
    ref.train()
    for batch in _batches(blocks):

        def closure(batch=batch):
            loss = ref(**batch).loss
            loss.backward()
            return loss

        ref_opt.step(closure)
    _assert_same_params(model, ref)
    # The reported step size is SAM-SPS's (PolyakStepSizeScheduler leaves it in place).
    torch.testing.assert_close(opt.step_size, ref_opt.step_size, rtol=1e-5, atol=0)
    assert 0.0 < float(opt.step_size) <= hyper["gamma_b"]
    torch.testing.assert_close(
        torch.as_tensor(trainer._get_learning_rate()), ref_opt.step_size, rtol=1e-5, atol=0
    )


def test_plain_trainer_with_sam_sps_needs_sam_trainer(tmp_path) -> None:
    blocks, vocab = _tokens()
    model = _model(vocab)
    opt = SAM_SPS(model.parameters())
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=CharDataset(blocks),
        optimizers=(opt, None),
    )
    with pytest.raises(ValueError, match="closure"):
        trainer.train()


def test_sam_trainer_rejects_gradient_accumulation(tmp_path) -> None:
    blocks, vocab = _tokens()
    model = _model(vocab)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SAMTrainer(
            model=model,
            args=_args(tmp_path, gradient_accumulation_steps=2),
            train_dataset=CharDataset(blocks),
            optimizers=(SAM_SPS(model.parameters()), None),
        )
