"""Validation: sample answers, grade them with math-verify, report accuracy.

``python -m vaopd.eval --checkpoint DIR [--data FILE] [--samples N] [--set key=value ...]``
evaluates a checkpoint written by ``vaopd.train`` (its ``model/`` and ``config.yaml``) on the
run's validation data, or on ``--data``. Prints one JSON line with the accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from math_verify import parse, verify

from vaopd.config import ConfigError, load_config
from vaopd.data import DataError, load_dataset
from vaopd.models import eos_token_ids, load_pretrained
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts

__all__ = ["grade", "evaluate", "main"]


def grade(response: str, answer: str) -> bool:
    """True when math-verify finds ``response``'s final answer equal to the gold ``answer``."""
    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    if not gold:
        return False
    return bool(verify(gold, parse(response)))


@torch.no_grad()
def evaluate(model, tokenizer, image_processor, records, *, eos_ids, banned_ids, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, batch_prompts: int, instruction: str, seed: int) -> dict:
    """Accuracy of ``samples`` sampled answers per record (mean over all samples).

    Runs under its own seeded RNG (forked), so validation never changes the training RNG stream.
    """
    backend = HFGenerate(model, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, banned_ids=banned_ids,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    correct = total = 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_prompts):
            chunk = records[start:start + batch_prompts]
            prompts = encode_prompts([r.question + instruction for r in chunk], [r.image for r in chunk], tokenizer, image_processor)
            tokens, mask = backend.generate(prompts, samples)
            for row in range(tokens.shape[0]):
                text = tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True)
                correct += grade(text, chunk[row // samples].answer)
                total += 1
    return {"accuracy": correct / max(total, 1), "questions": len(records), "samples": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a step_* folder written by vaopd.train")
    parser.add_argument("--data", default=None, help="validation file (default: the run's data.val)")
    parser.add_argument("--samples", type=int, default=None, help="samples per question (default: eval.samples)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    try:
        if not (ckpt / "model").is_dir() or not (ckpt / "config.yaml").is_file():
            raise ConfigError(f"--checkpoint: {ckpt} is not a vaopd checkpoint (needs model/ and config.yaml)")
        overrides = list(args.set)
        if args.data is not None:
            overrides.append(f"data.val={args.data}")
        if args.samples is not None:
            overrides.append(f"eval.samples={args.samples}")
        cfg = load_config(ckpt / "config.yaml", overrides)
        if not cfg.data.val:
            raise ConfigError("data.val: no validation data (pass --data FILE)")
        records = load_dataset(cfg, cfg.data.val, split_seed=1).records
        if cfg.eval.max_questions:
            records = records[:cfg.eval.max_questions]
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model, tokenizer, image_processor = load_pretrained(cfg, str(ckpt / "model"), device, trainable=False, seed=cfg.train.seed)
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    result = evaluate(
        model, tokenizer, image_processor, records, eos_ids=eos,
        banned_ids=banned_token_ids(tokenizer, model.get_output_embeddings().weight.shape[0], eos),
        samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
        max_new_tokens=cfg.eval.max_new_tokens, batch_prompts=cfg.eval.batch_prompts,
        instruction=cfg.data.instruction, seed=cfg.train.seed,
    )
    print(json.dumps({"checkpoint": str(ckpt), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
