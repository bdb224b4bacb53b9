"""Validation and offline benchmarks: sample k answers per question, grade them, report avg@k.

``python -m vaopd.eval --checkpoint DIR|best [--run RUN_DIR] [--data FILE] [--samples K]
[--output FILE] [--set key=value ...]`` evaluates a checkpoint written by ``vaopd.train`` (its
``model/`` and ``config.yaml``; ``best`` is the run's best checkpoint, ``vaopd.selection``) on the
run's validation questions (``data.val`` and ``eval.subset``), or on every record of ``--data``.
It prints one JSON line: ``avg@k`` (per question, the fraction of its k samples graded correct,
averaged over questions) and ``accuracy`` (correct samples over all samples; the two are equal
when every question has k samples), with the grader and sampling settings. ``--output`` writes
one JSON line per question: its id, gold answer, the k responses and which were correct.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from vaopd.checkpoint import check_finite_weights, is_sharded_checkpoint, verify_checkpoint
from vaopd.config import Config, ConfigError, load_config
from vaopd.manifest import MANIFEST
from vaopd.data import DataError, Record, load_dataset
from vaopd.grading import grade
from vaopd.models import eos_token_ids, load_pretrained
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts
from vaopd.selection import resolve_checkpoint

__all__ = ["grade", "subset_indices", "validation_questions", "evaluate", "main"]


def subset_indices(n: int, count: int, seed: int) -> list[int]:
    """``count`` of the indices ``0..n-1`` drawn without replacement by ``random.Random(seed)``,
    in increasing order; all of them when ``count`` is 0. A pure function of its arguments."""
    if not count:
        return list(range(n))
    if count > n:
        raise DataError(f"eval.subset.count: {count} questions asked for, the validation data has {n}")
    return sorted(random.Random(seed).sample(range(n), count))


def validation_questions(cfg: Config, records: list[Record]) -> list[Record]:
    """The records validation runs on: the ``eval.subset`` draw, then the first ``eval.max_questions``."""
    chosen = [records[i] for i in subset_indices(len(records), cfg.eval.subset.count, cfg.eval.subset.seed)]
    return chosen[:cfg.eval.max_questions or None]


@torch.no_grad()
def evaluate(model, tokenizer, image_processor, records, *, eos_ids, banned_ids, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, batch_prompts: int, instruction: str, seed: int,
             grader: str = "math_verify") -> dict:
    """Grade ``samples`` (k) sampled answers per record with ``grader`` (``vaopd.grading``).

    Returns ``accuracy`` (correct over all samples), ``avg@k`` (mean over records of each one's
    fraction correct), ``k``, ``questions``, ``samples`` and ``per_question``: one dict per record
    with ``id``, ``answer``, ``responses`` and ``correct`` (k booleans). Runs under its own seeded
    RNG (forked), so validation never changes the training RNG stream.
    """
    backend = HFGenerate(model, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, banned_ids=banned_ids,
                         temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    per_question = [{"id": r.id, "answer": r.answer, "responses": [], "correct": []} for r in records]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch_prompts):
            chunk = records[start:start + batch_prompts]
            prompts = encode_prompts([r.question + instruction for r in chunk], [r.image for r in chunk], tokenizer, image_processor)
            tokens, mask = backend.generate(prompts, samples)
            for row in range(tokens.shape[0]):
                text = tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True)
                q = per_question[start + row // samples]
                q["responses"].append(text)
                q["correct"].append(grade(text, q["answer"], grader))
    correct = sum(sum(q["correct"]) for q in per_question)
    total = sum(len(q["correct"]) for q in per_question)
    avg_at_k = sum(sum(q["correct"]) / len(q["correct"]) for q in per_question) / max(len(records), 1)
    return {"accuracy": correct / max(total, 1), "avg@k": avg_at_k, "k": samples, "questions": len(records),
            "samples": total, "per_question": per_question}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a step_* folder written by vaopd.train, a vaopd.export folder, or 'best' (with --run)")
    parser.add_argument("--run", default=None, help="the run folder whose best checkpoint --checkpoint best names")
    parser.add_argument("--data", default=None,
                        help="a JSONL/JSON/parquet file, every record evaluated (default: the run's data.val and eval.subset)")
    parser.add_argument("--samples", type=int, default=None, help="samples per question, k (default: eval.samples)")
    parser.add_argument("--output", default=None, help="write one JSON line per question (responses, which were correct)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. data.question_key=question, eval.grader=math_verify)")
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint, args.run)
        # A trainer checkpoint keeps the model in model/; a vaopd.export folder is the model itself.
        model_dir = ckpt / "model" if (ckpt / "model").is_dir() else ckpt
        has_model = any((model_dir / name).is_file() for name in ("config.json", "adapter_config.json"))
        if not has_model or not (ckpt / "config.yaml").is_file():
            raise ConfigError(f"--checkpoint: {ckpt} is not a vaopd checkpoint (model/ and config.yaml) or a "
                              "vaopd.export folder (config.json and config.yaml)")
        if (ckpt / MANIFEST).is_file() or (ckpt / "trainer_state.pt").exists():
            verify_checkpoint(ckpt)
        else:  # a model folder without a manifest: its weights must still be finite
            check_finite_weights(model_dir)
        if is_sharded_checkpoint(ckpt):
            raise ConfigError(f"--checkpoint: {ckpt} is sharded (written under torchrun): "
                              f"python -m vaopd.export --checkpoint {ckpt} --out DIR, then evaluate DIR")
        overrides = []
        if args.data is not None:
            # A benchmark file is evaluated whole: the run's validation subset does not apply to it.
            overrides += [f"data.val={args.data}", "eval.subset.count=0"]
        if args.samples is not None:
            overrides.append(f"eval.samples={args.samples}")
        cfg = load_config(ckpt / "config.yaml", overrides + list(args.set))
        if not cfg.data.val:
            raise ConfigError("data.val: no validation data (pass --data FILE)")
        records = validation_questions(cfg, load_dataset(cfg, cfg.data.val, split_seed=1).records)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model, tokenizer, image_processor = load_pretrained(cfg, str(model_dir), device, trainable=False, seed=cfg.train.seed)
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    result = evaluate(
        model, tokenizer, image_processor, records, eos_ids=eos,
        banned_ids=banned_token_ids(tokenizer, model.get_output_embeddings().weight.shape[0], eos),
        samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
        max_new_tokens=cfg.eval.max_new_tokens, batch_prompts=cfg.eval.batch_prompts,
        instruction=cfg.data.instruction, seed=cfg.train.seed, grader=cfg.eval.grader,
    )
    per_question = result.pop("per_question")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            for q in per_question:
                fh.write(json.dumps({**q, "num_correct": sum(q["correct"])}) + "\n")
    print(json.dumps({"checkpoint": str(ckpt), "data": cfg.data.val, "grader": cfg.eval.grader,
                      "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
