"""Scoring one micro-batch padded (SDPA, `train.packed_scoring: false`) against packed (SDPA with its
dense block mask, and FlexAttention for the teacher), at the CPU small preset's shape.

    python bench/packed_scoring.py             # small-teacher / small-student, 2 prompts x 4 responses

A micro-batch of ``--prompts`` sibling groups with responses of lengths drawn from the small
preset's length model (``scale_models.LengthModel``, cap 64). Timed per path: the teacher's two
views (no gradients), and the student's forward plus backward. Each path runs once to warm up
(FlexAttention compiles there), then ``--repeats`` times; the median is reported with the
positions computed per needed one (``vaopd.scoring.scoring_padding``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import LengthModel, build_model, build_tokenizer, synthetic_records  # noqa: E402

from vaopd.packing import pack, packed_hidden, packed_teacher_hidden, use_packed_attention  # noqa: E402
from vaopd.rollout import encode_prompts, response_mask  # noqa: E402
from vaopd.scoring import scoring_inputs, scoring_padding, teacher_hidden  # noqa: E402
from vaopd.tiny import build_image_processor  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--median", type=float, default=10.0)
    p.add_argument("--cap", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "packed_scoring"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    tok = build_tokenizer()
    ip = build_image_processor(32 * 32, 160 * 160)
    records = synthetic_records(args.prompts, (48, 160), seed=0)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip).repeat(args.k)
    lengths = LengthModel(args.median, 0.6, 0.5, seed=0).draw(args.prompts, args.k).clamp(max=args.cap)
    width = int(lengths.max())
    tokens = torch.randint(0, 151_000, (len(prompts), width))
    for row, n in enumerate(lengths.tolist()):
        if n < args.cap:
            tokens[row, n - 1] = tok.eos_token_id
    mask = response_mask(tokens, [tok.eos_token_id])
    ablated = prompts.pixel_values.flip(0)
    lp = prompts.input_ids.shape[1]
    teacher = build_model("small-teacher", torch.device("cpu"), torch.float32, "sdpa", seed=1).eval()
    student = build_model("small-student", torch.device("cpu"), torch.float32, "sdpa", seed=0).train()

    def padded():
        teacher_hidden(teacher, prompts, ablated, tokens, mask)
        student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:].sum().backward()

    packed_batch = pack(prompts, tokens, mask, student.model.get_rope_index)

    def packed():
        packed_teacher_hidden(teacher, packed_batch, ablated)
        packed_hidden(student.model, packed_batch).sum().backward()

    def timed(fn) -> dict:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        student.zero_grad(set_to_none=True)
        return dict(first_s=first, median_s=statistics.median(runs), runs_s=runs)

    computed, needed = scoring_padding(prompts, mask, packed=False)
    rows = [dict(path="padded, SDPA", padding=computed / needed, **timed(padded)),
            dict(path="packed, SDPA (dense block mask)", padding=1.0, **timed(packed))]
    # The teacher only: FlexAttention has no backward on a CPU ("FlexAttention does not support
    # backward on CPU", torch 2.13), so the student stays on SDPA here.
    use_packed_attention(teacher, prefer="flex")
    rows.append(dict(path="packed, teacher FlexAttention, student SDPA", padding=1.0, **timed(packed)))
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, args=vars(args),
                responses=lengths.tolist(), prompt_tokens=prompts.attention_mask.sum(1).tolist(), needed=needed,
                padded_positions=computed, packed_positions=packed_batch.total, rows=rows)
    lines = ["| path | positions per needed one | first call s | median s |", "|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['padding']:.2f} | {r['first_s']:.2f} | {r['median_s']:.3f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_scoring.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    (out / "packed_scoring.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"responses {lengths.tolist()}, prompts {min(info['prompt_tokens'])}-{max(info['prompt_tokens'])} tokens")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
