"""On-policy distillation in TRL's ``DistillationTrainer`` with vaopd's fused reverse KL as its loss.

TRL 1.16's ``DistillationTrainer`` samples completions from the student, runs the student's and
the teacher's bodies to their final hidden states, and computes a generalized JSD from those
hidden states and the two LM-head weights in ``_compute_loss`` (``beta=1`` is the reverse KL
``KL(pS || pT)``). ``FusedReverseKLDistillationTrainer`` keeps all of TRL's trainer (generation,
batching, multimodal inputs, optimizer, logging) and replaces only that loss with
``vaopd.kernels.fused_linear_reverse_kl``:

    loss = sum over valid completion tokens t of KL(pS_t || pT_t) / n
    pS_t = softmax(h_S,t @ W_S.T / temperature), pT_t likewise for the teacher,

with TRL's reduction (``n``: the generation batch's valid tokens when TRL passes
``num_items_in_batch``, else this micro-batch's) and TRL's ``temperature`` (applied by dividing the
hidden states: ``(h / T) @ W.T == logits / T``). The value and the student's gradients are TRL's,
to fp32 rounding (``tests/test_example_trl.py``). What changes is the work: vaopd forms the
student's gradients during the forward pass, four LM-head products per token where TRL's
``ChunkedDivergenceFunction`` does six (it recomputes both models' logits in backward).

Limits of the swap: ``beta`` must be 1 (the fused loss is the reverse KL only), the LM heads must
be plain weights (no bias, logit scale or soft-capping, which TRL's kernel applies), and the
student's entropy is not computed, so TRL's ``entropy`` log reads NaN. ``_compute_loss`` is TRL's
private override point: the ``trl`` extra pins 1.16.

Run it with a tiny random student and teacher built in code (no download; a CPU, seconds)::

    pip install -c constraints.txt -e ".[trl]"
    python examples/trl_distill.py --max-steps 3 --output-dir runs/trl_distill
"""
from __future__ import annotations

import argparse
import sys

import torch
from datasets import Dataset
from transformers import Qwen3Config, Qwen3ForCausalLM
from trl import DistillationConfig, DistillationTrainer

from vaopd.kernels import fused_linear_reverse_kl
from vaopd.tiny import build_tokenizer

# Inputs TRL's batches may carry for a vision-language model; passed to both bodies as TRL does.
MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
# Text-config attributes through which TRL's kernel rescales or caps logits; the fused loss has none.
LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling", "final_logit_softcapping")


class FusedReverseKLDistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is ``vaopd.kernels.fused_linear_reverse_kl``.

    Takes ``DistillationTrainer``'s arguments; ``args.beta`` must be 1.0 (reverse KL) and both
    models' LM heads plain ``[V, D]`` weights of the same ``V``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("teacher_model is required: the fused loss reads the teacher's hidden states and LM head")
        if self.beta != 1.0:
            raise ValueError(f"DistillationConfig.beta is {self.beta}: the fused loss is the reverse KL, beta=1.0; use trl.DistillationTrainer for other divergences")
        for role, model in (("student", self.model), ("teacher", self.teacher_model)):
            _check_plain_head(self.accelerator.unwrap_model(model), role)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """``(loss, entropy_sum, n_valid)`` as TRL's ``_compute_loss`` returns them; the loss is
        the fused reverse KL, the entropy sum NaN (not computed)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():  # through the teacher's wrapper, so that sharded teachers gather their weights
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                unwrapped_teacher, input_ids, attention_mask, logits_to_keep, **multimodal,
            )

        student_weight = unwrapped_student.get_output_embeddings().weight
        teacher_weight = unwrapped_teacher.get_output_embeddings().weight
        valid = loss_mask.to(student_weight.device) != 0  # [B, K] completion tokens in the loss
        n_valid = valid.sum()
        denominator = n_valid.clamp(min=1) if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=student_weight.device)
        # Only the valid rows are computed: padding would cost as much as a token.
        coef = torch.ones(int(n_valid), device=student_weight.device) / denominator
        loss, _kl = fused_linear_reverse_kl(
            student_hidden.to(student_weight.device)[valid] / self.temperature, student_weight,
            teacher_hidden.to(teacher_weight.device)[valid] / self.temperature, teacher_weight, coef,
        )
        return loss, torch.tensor(float("nan"), device=loss.device), n_valid


def _check_plain_head(model, role: str) -> None:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"the {role}'s LM head has a bias; fused_linear_reverse_kl takes weights only: use trl.DistillationTrainer")
    config = model.config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the {role}'s config sets {name}={getattr(config, name)}, a logit transform the fused loss does not apply: use trl.DistillationTrainer")


# A tiny text-only Qwen3 student and a wider, deeper teacher on vaopd's tiny tokenizer (same vocabulary).
TINY = {"student": dict(hidden_size=64, num_hidden_layers=2), "teacher": dict(hidden_size=96, num_hidden_layers=3)}
QUESTIONS = [
    "How many squares are in the image?",
    "What is the sum of the red and blue shapes?",
    "How many circles are in the image? Think step by step.",
    "Count the shapes one by one.",
    "What number is the answer?",
    "How many triangle shapes are there?",
    "Is the square red or blue?",
    "Put the final answer in a box.",
]


def build_tiny_model(role: str, tokenizer, seed: int) -> Qwen3ForCausalLM:
    """A random-init fp32 ``Qwen3ForCausalLM`` (``role``: "student" or "teacher"), deterministic in ``seed``."""
    config = Qwen3Config(
        vocab_size=len(tokenizer), intermediate_size=2 * TINY[role]["hidden_size"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id, **TINY[role],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def prompts() -> Dataset:
    """Conversational prompts, TRL's ``prompt`` column."""
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in QUESTIONS]})


def tiny_config(output_dir: str, max_steps: int, seed: int = 0, **overrides) -> DistillationConfig:
    """A CPU, fp32 configuration for the tiny models: short completions, a learning rate that moves them."""
    settings = dict(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        max_completion_length=12, beta=1.0, seed=seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    return DistillationConfig(**{**settings, **overrides})


def build_trainer(trainer_class, output_dir: str, max_steps: int, seed: int = 0, **overrides):
    """``trainer_class`` (TRL's or the fused one) on fresh tiny models and the prompts."""
    tokenizer = build_tokenizer()
    return trainer_class(
        model=build_tiny_model("student", tokenizer, seed), teacher_model=build_tiny_model("teacher", tokenizer, seed + 1),
        args=tiny_config(output_dir, max_steps, seed, **overrides), train_dataset=prompts(), processing_class=tokenizer,
    )


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--output-dir", default="runs/trl_distill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling and loss temperature (TRL's)")
    args = parser.parse_args(argv)
    trainer = build_trainer(FusedReverseKLDistillationTrainer, args.output_dir, args.max_steps, args.seed, temperature=args.temperature)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step, loss in enumerate(losses, 1):
        print(f"step {step}: reverse KL {loss:.6f}")
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
