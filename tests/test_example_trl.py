"""examples/trl_distill.py: TRL's DistillationTrainer with vaopd's fused reverse KL gives TRL's loss.

Tiny random Qwen3 models built in code, a CPU, fp32. On one batch (the student's own completions,
made ragged so the mask matters, at a loss temperature of 0.7) the fused loss and the student's
gradients equal TRL's ``_compute_loss`` under both of its reductions; a short training run logs
the same losses as TRL's own trainer from the same seed and ends at the same weights.
"""
import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[trl]')")
from trl import DistillationTrainer  # noqa: E402

from trainer_utils import assert_adam_close  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl_distill.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("trl_distill", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def student_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["local", "num_items_in_batch"])
def test_fused_loss_and_gradients_equal_trls_on_a_batch(example, tmp_path, reduction):
    trainer = example.build_trainer(example.FusedReverseKLDistillationTrainer, str(tmp_path), max_steps=1, temperature=0.7)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    mask = batch["completion_mask"]
    assert mask.shape[1] >= 10
    mask[0, 4:] = 0  # shorter completions: their tail is padding for both losses
    mask[2, 9:] = 0
    num_items = None if reduction == "local" else torch.tensor(37.0)
    model = trainer.model

    results = {}
    for name, compute in (("fused", trainer._compute_loss), ("trl", lambda *a: DistillationTrainer._compute_loss(trainer, *a))):
        model.zero_grad(set_to_none=True)
        loss, _entropy, n_valid = compute(model, batch, num_items)
        loss.backward()
        results[name] = (loss.detach(), int(n_valid), student_grads(model))

    (fused, n_fused, g_fused), (trl, n_trl, g_trl) = results["fused"], results["trl"]
    assert n_fused == n_trl == int(mask.sum())
    assert fused.item() > 0
    torch.testing.assert_close(fused, trl, rtol=1e-5, atol=0)
    assert g_fused.keys() == g_trl.keys() and "lm_head.weight" in g_fused and "model.embed_tokens.weight" in g_fused
    for name in g_trl:
        torch.testing.assert_close(g_fused[name], g_trl[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
def test_training_matches_trls_trainer(example, tmp_path):
    runs = {}
    for name, cls in (("fused", example.FusedReverseKLDistillationTrainer), ("trl", DistillationTrainer)):
        trainer = example.build_trainer(cls, str(tmp_path / name), max_steps=3, temperature=0.7)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    (fused_losses, fused_weights), (trl_losses, trl_weights) = runs["fused"], runs["trl"]
    assert len(fused_losses) == 3
    assert fused_losses == pytest.approx(trl_losses, rel=1e-4)
    initial = example.build_tiny_model("student", example.build_tokenizer(), 0).state_dict()
    assert (fused_weights["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-4  # it trained
    assert_adam_close(fused_weights, trl_weights)  # same gradients to rounding, 3 AdamW steps at lr 1e-3


def test_refuses_a_divergence_it_does_not_compute(example, tmp_path):
    with pytest.raises(ValueError, match="beta"):
        example.build_trainer(example.FusedReverseKLDistillationTrainer, str(tmp_path), max_steps=1, beta=0.5)


def test_refuses_a_logit_transform_trl_would_apply(example, tmp_path):
    tokenizer = example.build_tokenizer()
    student = example.build_tiny_model("student", tokenizer, 0)
    student.config.final_logit_softcapping = 30.0  # TRL's kernel soft-caps the logits; the fused loss cannot
    with pytest.raises(ValueError, match="student's config sets final_logit_softcapping"):
        example.FusedReverseKLDistillationTrainer(
            model=student, teacher_model=example.build_tiny_model("teacher", tokenizer, 1),
            args=example.tiny_config(str(tmp_path), max_steps=1), train_dataset=example.prompts(), processing_class=tokenizer,
        )
