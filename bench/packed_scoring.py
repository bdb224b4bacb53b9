"""Scoring one micro-batch padded (``train.packed_scoring: false``) against packed, with the models'
own attention (SDPA: a dense block mask per packed row) and with FlexAttention (a block mask).

    python bench/packed_scoring.py                        # CPU: small-teacher / small-student, 2 prompts x 4 responses
    python bench/packed_scoring.py --device cuda --prompts 4 --median 300 --cap 1024    # GPU check

A micro-batch of ``--prompts`` sibling groups with responses of lengths drawn from the length
model (``scale_models.LengthModel``, median ``--median``, capped at ``--cap``). Timed per path: the
teacher's two views (no gradients), and the student's forward plus backward of the sum of its
response hidden states. Each path runs once to warm up (FlexAttention compiles there), then
``--repeats`` times; reported: the median, the first call, the positions computed per needed one
(``vaopd.scoring.scoring_padding``) and, on CUDA, the peak memory above the models.

FlexAttention runs the teacher's passes everywhere and the student's where its backward exists
(CUDA; "FlexAttention does not support backward on CPU", torch 2.13). The student's response
hidden states and parameter gradients of each packed path are compared with the padded path's
(fp32): the exit status is 1 when a path differs by more than ``--tolerance`` of the largest
value (``bench/gpu_check.sh`` scores the full step with FlexAttention only when this passes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import LengthModel, build_model, build_tokenizer, synthetic_records  # noqa: E402

from vaopd.packing import pack, packed_hidden, packed_teacher_hidden, use_flex_attention  # noqa: E402
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
    p.add_argument("--device", default="auto")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest difference from the padded path, relative")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "packed_scoring"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.manual_seed(0)
    tok = build_tokenizer()
    ip = build_image_processor(32 * 32, 160 * 160)
    records = synthetic_records(args.prompts, (48, 160), seed=0)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip).repeat(args.k).to(device)
    lengths = LengthModel(args.median, 0.6, 0.5, seed=0).draw(args.prompts, args.k).clamp(max=args.cap)
    tokens = torch.randint(0, 151_000, (len(prompts), int(lengths.max())))
    for row, n in enumerate(lengths.tolist()):
        if n < args.cap:
            tokens[row, n - 1] = tok.eos_token_id
    tokens = tokens.to(device)
    mask = response_mask(tokens, [tok.eos_token_id])
    ablated = prompts.pixel_values.flip(0)
    lp = prompts.input_ids.shape[1]
    teacher = build_model("small-teacher", device, torch.float32, "sdpa", seed=1).eval()
    student = build_model("small-student", device, torch.float32, "sdpa", seed=0).train()

    def padded(mask):
        def run():
            teacher_hidden(teacher, prompts, ablated, tokens, mask)
            hidden = student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:]
            hidden = torch.where(mask.unsqueeze(-1), hidden, 0)  # the valid positions, as the loss masks them
            hidden.sum().backward()
            return hidden.detach()
        return run

    def packed(batch):
        def run():
            packed_teacher_hidden(teacher, batch, ablated)
            hidden = packed_hidden(student.model, batch)
            hidden.sum().backward()
            return hidden.detach()
        return run

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> tuple[dict, torch.Tensor, dict]:
        """(timings and peak memory, the student's response states, its parameter gradients)."""
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        start = time.perf_counter()
        hidden = fn()
        sync()
        first = time.perf_counter() - start
        grads = {n: q.grad.clone() for n, q in student.named_parameters() if q.grad is not None}
        runs = []
        for _ in range(args.repeats):
            student.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - start)
        student.zero_grad(set_to_none=True)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
        return dict(first_s=first, median_s=statistics.median(runs), runs_s=runs, peak_mib=peak), hidden, grads

    def packed_row(path: str, mask) -> dict:
        """A packed path's row, compared with the padded path on the same responses."""
        _, ref_hidden, ref_grads = timed(padded(mask))
        row, hidden, grads = timed(packed(pack(prompts, tokens, mask, student.model.get_rope_index)))
        scale = max(float(ref_hidden.abs().max()), 1e-6)
        hidden_diff = float((hidden - ref_hidden).abs().max()) / scale
        grad_diff = max(float((grads[n] - g).abs().max()) / max(float(g.abs().max()), 1e-6) for n, g in ref_grads.items())
        return dict(path=path, padding=1.0, **row, hidden_diff=hidden_diff, grad_diff=grad_diff,
                    ok=grads.keys() == ref_grads.keys() and max(hidden_diff, grad_diff) <= args.tolerance)

    computed, needed = scoring_padding(prompts, mask, packed=False)
    row, _, _ = timed(padded(mask))
    rows = [dict(path="padded, SDPA", padding=computed / needed, **row), packed_row("packed, SDPA (dense block mask)", mask)]
    use_flex_attention(teacher)
    if device.type == "cuda":
        use_flex_attention(student)
        rows.append(packed_row("packed, FlexAttention (teacher and student)", mask))
        # Another packed length, as the next micro-batch brings: the kernels recompile for dynamic
        # shapes (torch.compile's automatic dynamic shapes), the build that fails on a CPU.
        shorter = mask.clone()
        shorter[-1, max(int(mask[-1].sum()) - 7, 1):] = False
        rows.append(packed_row("packed, FlexAttention, another packed length (recompiles once)", shorter))
    else:
        rows.append(packed_row("packed, teacher FlexAttention, student SDPA (no FlexAttention backward on a CPU)", mask))
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__, args=vars(args),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                responses=lengths.tolist(), prompt_tokens=prompts.attention_mask.sum(1).tolist(), needed=needed,
                padded_positions=computed, packed_positions=needed, rows=rows)
    lines = [f"{info['device']}, torch {torch.__version__}, {info['date']}: {len(prompts)} responses of "
             f"{min(info['responses'])} to {max(info['responses'])} tokens, prompts of {min(info['prompt_tokens'])} to "
             f"{max(info['prompt_tokens'])} tokens; {needed} needed positions", "",
             "| path | positions per needed one | first call s | median s | peak MiB | max diff hidden / grads | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        diff = f"{r['hidden_diff']:.1e} / {r['grad_diff']:.1e}" if "ok" in r else "-"
        lines.append(f"| {r['path']} | {r['padding']:.2f} | {r['first_s']:.2f} | {r['median_s']:.3f} | {peak} | {diff} | "
                     f"{'-' if 'ok' not in r else 'yes' if r['ok'] else 'NO'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed_scoring.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    (out / "packed_scoring.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
