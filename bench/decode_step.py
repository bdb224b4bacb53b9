"""Milliseconds per decode step of the HF rollout engine, eager (dynamic cache) against compiled
(static cache, ``rollout.hf.compile: on``), on the paper's student at the paper's batch.

    python bench/decode_step.py                       # GPU: Qwen3-VL-2B (random weights), bf16, 16 x 4 rows
    python bench/decode_step.py --arch small-student --prompts 2 --k 2 --steps 8 --caps 32 --device cpu   # dry run

Every response runs ``--steps`` new tokens (its end is forced there, ``scale_models.ForcedLengths``);
the cap (``max_new_tokens``) only sizes the compiled path's static cache, which every decode step
attends over, so each cap is timed apart. The compiled path is timed twice: the first call
includes compiling the decode graph, the second reuses it. Rows go to ``--out`` as JSON and
markdown with the device and date.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import ForcedLengths, LengthModel, build_model, build_tokenizer, synthetic_records  # noqa: E402

from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts  # noqa: E402
from vaopd.tiny import build_image_processor  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen3-vl-2b")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=128, help="new tokens per response")
    p.add_argument("--caps", type=int, nargs="+", default=[4096, 1024], help="max_new_tokens values (static cache sizes)")
    p.add_argument("--side", type=int, nargs=2, default=[200, 700], help="image side range (pixels)")
    p.add_argument("--min-pixels", type=int, default=512 * 512)
    p.add_argument("--max-pixels", type=int, default=2048 * 2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "decode_step"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    tokenizer = build_tokenizer()
    image_processor = build_image_processor(args.min_pixels, args.max_pixels)
    # The rollout replica: inference weights in the rollout dtype.
    model = build_model(args.arch, device, torch.bfloat16 if bf16 else torch.float32, "sdpa", seed=0).eval()
    eos = [tokenizer.eos_token_id]
    banned = banned_token_ids(tokenizer, model.get_output_embeddings().weight.shape[0], eos)
    records = synthetic_records(args.prompts, tuple(args.side), seed=0)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tokenizer, image_processor)
    # All responses exactly `steps` long: log-sigmas 0, median `steps`.
    forced = ForcedLengths(model, LengthModel(float(args.steps), 0.0, 0.0, seed=0), eos, args.k)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = dict(device=device_name, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                args=vars(args), rows_per_batch=args.prompts * args.k,
                prompt_tokens=prompts.attention_mask.sum(1).tolist(), rows=[])
    import transformers
    info["transformers"] = transformers.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run(label: str, engine: HFGenerate, cap: int) -> None:
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        tokens, mask = engine.generate(prompts, args.k)
        wall = time.perf_counter() - start
        st = engine.stats
        row = dict(run=label, cap=cap, wall_s=wall, decode_ms=st["decode_ms"], prefill_s=st["prefill_s"],
                   decode_steps=st["decode_steps"], width=tokens.shape[1], cache_len=st.get("cache_len"),
                   graphs_compiled=st.get("graphs_compiled"),
                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        info["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "decode_step.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    options = dict(eos_ids=eos, pad_id=tokenizer.pad_token_id, banned_ids=banned, temperature=0.7, top_p=0.95)
    for cap in args.caps:
        run("eager", HFGenerate(forced, **options, max_new_tokens=cap, compile="off"), cap)
        compiled = HFGenerate(forced, **options, max_new_tokens=cap, compile="on")
        run("compiled (first call: compiles)", compiled, cap)
        run("compiled", compiled, cap)
    lines = [f"# Decode step: {args.arch}, {args.prompts} x {args.k} rows, {args.steps} new tokens",
             "", f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}, {info['date']}; "
             f"prompts {min(info['prompt_tokens'])} to {max(info['prompt_tokens'])} tokens.", "",
             "| run | cap | ms per decode step | prefill s | wall s | cache positions | graphs compiled | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['run']} | {r['cap']} | {r['decode_ms']:.2f} | {r['prefill_s']:.2f} | {r['wall_s']:.1f} | "
                     f"{r['cache_len'] or 'dynamic'} | {r['graphs_compiled'] if r['graphs_compiled'] is not None else '-'} | "
                     f"{peak} |")
    (out / "decode_step.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
