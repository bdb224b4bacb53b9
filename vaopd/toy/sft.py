"""Supervised fine-tuning of the toy teacher and student, saved as ``save_pretrained`` folders.

Both start from the random tiny Qwen3-VL presets of ``vaopd.tiny`` (same tokenizer, so the
trainer's vocabulary check passes): the teacher (``tiny:teacher``, 0.57 M parameters) is trained
until it reads the digits; the student (``tiny:student``, 0.24 M) only briefly, so it has the
answer format but reads detail poorly. A saved folder holds the model, tokenizer and image
processor, which is what ``vaopd.train.load_pretrained`` loads from ``model.student`` /
``model.teacher``.

``python -m vaopd.toy.sft --data DIR --preset teacher --steps N --out DIR``
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from vaopd.data import Record, load_records
from vaopd.kernels import fused_linear_logprobs
from vaopd.rollout import encode_prompts
from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.scoring import response_hidden

__all__ = ["load_split", "response_tokens", "sft_loss", "train_sft", "reinitialise", "save_model", "sft_model", "main"]


def load_split(path: str | Path) -> tuple[list[Record], dict[str, dict]]:
    """The records of a toy split (ids from the file) and its raw rows by id (kind, response)."""
    path = Path(path)
    rows = {r["id"]: r for r in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())}
    return load_records(path, id_key="id").records, rows


def response_tokens(tokenizer, responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` response ids ending in the EOS, and their valid mask."""
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    width = max(len(i) for i in ids)
    tokens = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = True
    return tokens, mask


def sft_loss(model, tokenizer, image_processor, records: list[Record], responses: list[str], instruction: str) -> torch.Tensor:
    """Mean token cross-entropy of ``responses`` given the records' images and questions.

    Uses the trainer's teacher-forcing layout (``scoring_inputs``), so SFT sees exactly the
    prompts that rollouts and distillation will see. The softmax stops at the tokenizer's
    vocabulary (the LM head's padding rows are never targets), and no logits are kept.
    """
    prompts = encode_prompts([r.question + instruction for r in records], [r.image for r in records], tokenizer, image_processor)
    tokens, mask = response_tokens(tokenizer, responses)
    hidden = response_hidden(model, prompts, tokens, mask)
    weight = model.lm_head.weight
    return -fused_linear_logprobs(hidden[mask].to(weight.dtype), weight, tokens[mask], len(tokenizer))[0].mean()


def train_sft(model, tokenizer, image_processor, records: list[Record], responses: dict[str, str], *, steps: int,
              batch_size: int, lr: float, seed: int, instruction: str, log_every: int = 50, log=print) -> list[float]:
    """AdamW with a short warmup and cosine decay for ``steps`` batches; returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        batch = rng.sample(records, batch_size)
        loss = sft_loss(model, tokenizer, image_processor, batch, [responses[r.id] for r in batch], instruction)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            log(f"  sft step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses


def reinitialise(model, std: float, seed: int) -> None:
    """Redraw every weight matrix (linear, embedding, patch convolution) from ``N(0, std)``, biases 0.

    The tiny presets use ``initializer_range`` 0.02 for the student; at that scale it does not
    learn to read the digits within a CPU budget (the patch features of a small digit are a tiny
    perturbation), whereas at the teacher's 0.2 it does after a few hundred SFT steps. Norm
    weights keep their built value (1).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d)):
                torch.nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    torch.nn.init.zeros_(module.bias)
    model.config.text_config.initializer_range = std
    model.config.vision_config.initializer_range = std


def save_model(model, tokenizer, image_processor, out: str | Path) -> Path:
    """``save_pretrained`` the model, tokenizer and image processor into ``out``."""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def sft_model(preset: str, train_file: str | Path, out: str | Path, *, steps: int, batch_size: int, lr: float, seed: int,
              instruction: str, min_pixels: int, max_pixels: int, init_range: float | None = None, log=print) -> list[float]:
    """Build ``tiny:<preset>`` (re-initialised at ``init_range`` if given), fine-tune it on ``train_file``, save it to ``out``."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    image_processor = build_image_processor(min_pixels, max_pixels)
    model = build_model(preset, tokenizer, seed)
    if init_range is not None:
        reinitialise(model, init_range, seed)
    records, rows = load_split(train_file)
    losses = train_sft(model, tokenizer, image_processor, records, {k: r["response"] for k, r in rows.items()},
                       steps=steps, batch_size=batch_size, lr=lr, seed=seed, instruction=instruction, log=log)
    save_model(model, tokenizer, image_processor, out)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.toy.sft", description="SFT a tiny toy teacher or student.")
    parser.add_argument("--data", required=True, help="folder with train.jsonl (python -m vaopd.toy.task)")
    parser.add_argument("--preset", choices=["teacher", "student"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-range", type=float, default=None, help="re-initialise the weights at this std first")
    args = parser.parse_args(argv)
    # One thread: these models are too small for intra-op threads to help, and on a loaded 2-core
    # machine two spinning threads made SFT ~25 times slower (measured: 6 s instead of 0.22 s a step).
    torch.set_num_threads(1)
    sft_model(args.preset, Path(args.data) / "train.jsonl", args.out, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, instruction="", min_pixels=64 * 64, max_pixels=64 * 64, init_range=args.init_range)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
