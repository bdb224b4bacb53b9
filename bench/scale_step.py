"""Real trainer steps (``vaopd.step.train_step``) at the paper's scale, timed phase by phase.

    python bench/scale_step.py --preset paper    # GPU: 2B student, 8B teacher, 16 x 4 up to 4,096 tokens, bf16
    python bench/scale_step.py --preset small    # CPU: small models of the same families, shorter responses
    python bench/scale_step.py --preset small --engine vllm    # the same step with vLLM sampling (.venv-vllm)

The models are the paper's architectures with random weights (``bench/scale_models.py``: the
published configurations, Qwen's vocabulary and token ids), built directly on the device. Prompts
are synthetic image+question records. A random model's answers have no natural end, so every
response ends at a length drawn from a log-normal model (``LengthModel``: median ``--median``
tokens, siblings correlated, a long right tail; lengths past ``max_new_tokens`` end truncated); the
real ``generate`` loop still runs every decode step, so the rollout costs what it would.

``--engine``: ``hf`` (transformers ``generate``; ``--compile auto|on|off`` is its static-cache
compiled decode, ``rollout.hf.compile``) or ``vllm`` (an in-process vLLM engine from a folder of
the random student; one request per response with ``max_tokens`` from the same drawn length and
``ignore_eos``). Both engines see the same prompts and the same drawn lengths. ``--scoring``:
``packed`` (``train.packed_scoring: true``; this benchmark's default) or ``padded`` teacher and student passes;
``--packed-attention`` is ``train.packed_attention`` (auto: FlexAttention on CUDA). As in the
trainer, the hf engine samples from an inference copy of the student in the rollout dtype (bf16
on a GPU), refreshed in place before each rollout. ``decode_ms``: ms
per decode step (every row advances one token): measured inside ``generate`` for hf, the rollout
time over the longest response for vLLM (its steps are scheduled internally).

Printed and written to ``--out`` (``bench/out/scale_step``) as JSON and markdown: time per step
and its phases (rollout, teacher scoring, student forward, the fused loss forward+backward,
student backward, optimizer, other), valid response tokens per second, padding (positions computed
per valid token in the rollout, per needed position in the scoring passes), peak memory, and the
scoring padding expected at the preset's shape padded with and without length buckets, and packed
(simulated from the length model).

``--budget-s`` bounds the whole run: after the warm-up and a calibration step at
``--calib-tokens``, each measured step runs at the largest ``max_new_tokens`` (halving from the
preset's) predicted to fit what is left, and says when it capped; an alarm stops a step that
overruns. An out-of-memory error or the alarm ends the run with the phase it hit and the results
so far.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import (ForcedLengths, LengthModel, build_model, build_tokenizer, forced_lengths_vllm,  # noqa: E402
                          synthetic_records)

from vaopd.build import (Setup, apply_packed_attention, build_rollout, build_scorer, longest_prompt_bound,  # noqa: E402
                         packed_attention)
from vaopd.config import load_config  # noqa: E402
from vaopd.data import Dataset  # noqa: E402
from vaopd.models import (attn_implementation, check_vocabularies, enable_gradient_checkpointing,  # noqa: E402
                          eos_token_ids, use_bf16)
from vaopd.optim import build_optimizer  # noqa: E402
from vaopd.rollout import banned_token_ids, encode_prompts  # noqa: E402
from vaopd.step import Timer, train_step  # noqa: E402
from vaopd.strategy import SingleProcess, inference_copy, rollout_dtype  # noqa: E402
from vaopd.tiny import build_image_processor  # noqa: E402

PRESETS = {
    # The paper recipe (configs/qwen3vl_2b_from_8b.yaml): 16 prompts x 4 responses, up to 4,096 new
    # tokens, micro-batches of 2 groups, gradient checkpointing, bf16, pixel bounds 512^2..2048^2.
    "paper": dict(student="qwen3-vl-2b", teacher="qwen3-vl-8b", prompts=16, k=4, max_new_tokens=4096, micro=2,
                  checkpointing=True, precision="bf16", side=(200, 700), min_pixels=512 * 512, max_pixels=2048 * 2048,
                  median=600.0, top_p=0.95),
    # CPU size: same families and shape ratios, the real vocabulary, responses scaled down with the
    # cap (median 600/4096 of it). top-p 1: a CPU spends seconds per decode step sorting 151,936
    # logits per row (a GPU, about a millisecond), which would drown everything else.
    "small": dict(student="small-student", teacher="small-teacher", prompts=4, k=4, max_new_tokens=64, micro=2,
                  checkpointing=False, precision="fp32", side=(48, 160), min_pixels=32 * 32, max_pixels=160 * 160,
                  median=10.0, top_p=1.0),
    # The test's: one step in seconds.
    "smoke": dict(student="small-student", teacher="small-teacher", prompts=2, k=2, max_new_tokens=8, micro=1,
                  checkpointing=False, precision="fp32", side=(32, 64), min_pixels=32 * 32, max_pixels=64 * 64,
                  median=3.0, top_p=1.0),
}
PHASES = ("rollout", "teacher", "student_forward", "loss", "student_backward", "optimizer")
PROMPT_SIGMA, SAMPLE_SIGMA = 0.6, 0.5


class Deadline(Exception):
    """The run's time budget ran out."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--steps", type=int, default=2, help="measured steps (per bucket setting)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps at --warmup-tokens (not reported as measured)")
    p.add_argument("--warmup-tokens", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=256, help="with --budget-s: a calibration step at this cap")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the preset's")
    p.add_argument("--micro-batch-prompts", type=int, default=0, help="0: the preset's")
    p.add_argument("--prompts", type=int, default=0,
                   help="prompts per step; 0: the preset's (2 at the paper preset: one rank's slice of an 8-GPU step)")
    p.add_argument("--median", type=float, default=0.0, help="median response length; 0: the preset's")
    p.add_argument("--buckets", choices=["on", "off", "both"], default="both",
                   help="train.length_buckets; both: each measured step runs off, then on, on the same data and lengths")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollout engine (vllm: from .venv-vllm)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="hf engine: static KV cache and compiled decode step (auto: on for CUDA)")
    p.add_argument("--scoring", choices=["packed", "padded"], default="packed", help="train.packed_scoring")
    p.add_argument("--packed-attention", choices=["auto", "flex", "model"], default="auto",
                   help="train.packed_attention (auto: FlexAttention on CUDA without flash-attn, the models' own on a CPU)")
    p.add_argument("--simulate-only", action="store_true",
                   help="print the expected scoring padding at the preset's shape and exit (no model is built)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2", "eager"])
    p.add_argument("--budget-s", type=float, default=0.0, help="stop before this many seconds (0: no limit)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "scale_step"))
    return p.parse_args(argv)


def build(args, preset: dict, lengths: LengthModel):
    """The trainer's config and ``Setup`` for the preset's random-weight models."""
    overrides = [f"train.device={args.device}", f"train.precision={preset['precision']}",
                 f"train.prompts_per_step={preset['prompts']}", f"train.micro_batch_prompts={preset['micro']}",
                 f"rollout.samples_per_prompt={preset['k']}", f"rollout.max_new_tokens={preset['max_new_tokens']}",
                 f"rollout.top_p={preset['top_p']}",
                 f"model.gradient_checkpointing={str(preset['checkpointing']).lower()}",
                 f"model.attn_implementation={args.attn}", f"data.min_pixels={preset['min_pixels']}",
                 f"data.max_pixels={preset['max_pixels']}", "data.val=", "log.progress=false", f"train.seed={args.seed}",
                 f"train.run_dir={Path(args.out) / 'run'}", "data.instruction=", "optim.lr=1e-6", "optim.warmup_ratio=0",
                 f"rollout.hf.compile={args.compile}", f"train.packed_scoring={str(args.scoring == 'packed').lower()}",
                 f"train.packed_attention={args.packed_attention}"]
    cfg = load_config(None, overrides)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    bf16 = use_bf16(cfg, device)
    impl = attn_implementation(cfg)
    tokenizer = build_tokenizer()
    image_processor = build_image_processor(cfg.data.min_pixels, cfg.data.max_pixels)
    # As the trainer loads them: a trainable student in fp32 (bf16 autocast computes), a bf16 teacher.
    student = build_model(preset["student"], device, torch.float32, impl, seed=args.seed)
    teacher = build_model(preset["teacher"], device, torch.bfloat16 if bf16 else torch.float32, impl, seed=args.seed + 1)
    teacher.eval().requires_grad_(False)
    rows = student.get_output_embeddings().weight.shape[0]
    vocab = check_vocabularies(tokenizer, tokenizer, rows, teacher.get_output_embeddings().weight.shape[0])
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    student.train()
    eos = eos_token_ids(student, tokenizer)
    banned = banned_token_ids(tokenizer, rows, eos)
    r = cfg.rollout
    if args.engine == "vllm":
        folder = Path(args.out) / "rollout_model"  # vLLM reads a model folder; its weights follow the student's
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        forced = rollout = forced_lengths_vllm(
            lengths, model_dir=folder, device=device, dtype=torch.bfloat16 if bf16 else torch.float32, eos_ids=eos,
            pad_id=tokenizer.pad_token_id, image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            banned_ids=banned, lm_head_rows=rows, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, gpu_memory_utilization=r.vllm.gpu_memory_utilization, sleep_mode=False,
            kv_cache_gib=r.vllm.kv_cache_gib, max_model_len=r.max_new_tokens + 2048, enforce_eager=r.vllm.enforce_eager,
            seed=args.seed, image_size={"shortest_edge": cfg.data.min_pixels, "longest_edge": cfg.data.max_pixels})
        replica = None
    else:  # as the trainer: sampling from an inference copy in the rollout dtype, refreshed before each rollout
        replica = inference_copy(student, rollout_dtype(bf16))
        forced = ForcedLengths(replica, lengths, eos, r.samples_per_prompt)
        rollout = build_rollout(cfg, forced, eos, tokenizer.pad_token_id, banned)
    data = Dataset(synthetic_records(cfg.train.prompts_per_step * 8, preset["side"], seed=args.seed), source="synthetic")
    if getattr(rollout, "static", None) is not None:  # one cache shape (one compiled decode graph) for the run
        rollout.static.reserve(longest_prompt_bound(cfg, data, tokenizer, image_processor), r.max_new_tokens)
    apply_packed_attention(cfg, device, student, teacher)
    strategy = SingleProcess(student, teacher, replica, device)
    s = Setup(student, teacher, tokenizer, image_processor, vocab, eos, banned, data, None, device, bf16, rollout, strategy,
              build_scorer(cfg, strategy))
    return cfg, s, forced, impl


def simulate_padding(lengths: LengthModel, K: int, mb: int, cap: int, prompt_lens: list[int], buckets: bool,
                     trim: bool, packed: bool = False, steps: int = 200) -> float:
    """Expected scored positions per needed one of a step's micro-batches (``vaopd.scoring.scoring_padding``:
    a row needs its prompt and its first ``n - 1`` response tokens), over ``steps`` draws of the
    length model with the step's prompt lengths ``prompt_lens``.

    ``buckets``: groups ordered by their longest response (``train.length_buckets``); ``trim``:
    prompts padded to the micro-batch's longest instead of the step's (``without_pad_columns``);
    ``packed``: the packed passes (``train.packed_scoring``), which compute the needed positions only.
    """
    sim = LengthModel(lengths.median, lengths.prompt_sigma, lengths.sample_sigma, seed=999)
    P = len(prompt_lens)
    prompt = torch.tensor(prompt_lens, dtype=torch.float64)
    computed = valid = 0.0
    for _ in range(steps):
        n = sim.draw(P, K).clamp(max=cap).view(P, K).double()
        order = sorted(range(P), key=lambda g: float(n[g].max())) if buckets and mb < P else list(range(P))
        for first in range(0, P, mb):
            groups = order[first:first + mb]
            needed = K * float(prompt[groups].sum()) + float(n[groups].sum()) - len(groups) * K
            width = float(prompt[groups].max() if trim else prompt.max()) + float(n[groups].max()) - 1
            computed += needed if packed else len(groups) * K * width
            valid += needed
    return computed / valid


def expected_padding(lengths: LengthModel, K: int, mb: int, cap: int, prompt_lens: list[int]) -> dict:
    """``simulate_padding`` padded (step-wide prompts, trimmed, trimmed with buckets) and packed."""
    return {"before": simulate_padding(lengths, K, mb, cap, prompt_lens, buckets=False, trim=False),
            "trim": simulate_padding(lengths, K, mb, cap, prompt_lens, buckets=False, trim=True),
            "after": simulate_padding(lengths, K, mb, cap, prompt_lens, buckets=True, trim=True),
            "packed": simulate_padding(lengths, K, mb, cap, prompt_lens, buckets=True, trim=True, packed=True),
            "prompt_tokens": [min(prompt_lens), sum(prompt_lens) / len(prompt_lens), max(prompt_lens)],
            "mean_response_tokens": lengths.mean(cap)}


def simulate_only(args, preset: dict, lengths: LengthModel) -> int:
    """``--simulate-only``: the expected scoring padding at the preset's shape, from its prompts'
    real token counts (tokenizer and image processor only: no model is built)."""
    tokenizer = build_tokenizer()
    image_processor = build_image_processor(preset["min_pixels"], preset["max_pixels"])
    records = synthetic_records(preset["prompts"] * 8, preset["side"], seed=args.seed)[:preset["prompts"]]
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tokenizer, image_processor)
    pad = expected_padding(lengths, preset["k"], preset["micro"], preset["max_new_tokens"],
                           prompts.attention_mask.sum(1).tolist())
    print(padding_line(pad))
    (Path(args.out) / f"{args.preset}_padding.json").write_text(json.dumps(dict(settings=preset, **pad), indent=1) + "\n")
    return 0


def padding_line(pad: dict) -> str:
    lo, mean, hi = pad["prompt_tokens"]
    return (f"Expected scoring padding at this shape (200 simulated steps of the length model, mean response "
            f"{pad['mean_response_tokens']:.0f} tokens, prompts {lo:.0f}/{mean:.0f}/{hi:.0f} min/mean/max): "
            f"step-wide prompt padding, no buckets {pad['before']:.2f}; prompts trimmed per micro-batch "
            f"{pad['trim']:.2f}; trimmed and length buckets {pad['after']:.2f}; packed {pad['packed']:.2f}.")


def peak_gib(timer: Timer, device: torch.device) -> float:
    if device.type == "cuda":
        return max(timer.peaks.values(), default=0) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)


def run_one(cfg, s, optimizer, scheduler, forced: ForcedLengths, step: int, label: str, cap: int, buckets: bool,
            seed: int) -> dict:
    """One real trainer step; the row of the table (``error`` and partial times if it failed)."""
    s.rollout.max_new_tokens = cap
    cfg.train.length_buckets = buckets
    torch.manual_seed(seed * 7919 + step)  # the same step index samples the same tokens and lengths
    forced.lengths.reseed(step)
    forced.drawn.clear()
    timer = Timer(s.device)
    row = dict(run=label, step=step + 1, cap=cap, buckets=buckets)
    start = time.perf_counter()
    try:
        m = train_step(cfg, s, optimizer, scheduler, step, timer=timer)
    except (torch.OutOfMemoryError, Deadline, RuntimeError) as e:
        optimizer.zero_grad(set_to_none=True)
        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
        row.update(error=f"{kind} in the {timer.failed or 'setup'} phase: {str(e).splitlines()[0][:200]}",
                   time=time.perf_counter() - start, **{f"time_{k}": v for k, v in timer.times.items()})
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        drawn = torch.cat(forced.drawn) if forced.drawn else torch.zeros(1)
        row.update({k: m[k] for k in ("time", "tokens_per_s", "response_len", "truncated", "rollout_padding",
                                      "scoring_padding", "loss", "grad_norm", "skipped")},
                   **{f"time_{k}": m.get(f"time_{k}", 0.0) for k in PHASES},
                   tokens=m["response_len"] * cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt,
                   longest=int(drawn.clamp(max=cap).max()), drawn_mean=float(drawn.clamp(max=cap).float().mean()))
        row["time_other"] = row["time"] - sum(row[f"time_{k}"] for k in PHASES)
        row["rollout_tokens_per_s"] = row["tokens"] / max(row["time_rollout"], 1e-9)
        stats = getattr(s.rollout, "stats", None) or {}
        row["decode_ms"] = stats.get("decode_ms") or 1000 * row["time_rollout"] / max(row["longest"], 1)
        if "graphs_compiled" in stats:
            row.update(graphs_compiled=stats["graphs_compiled"], cache_len=stats["cache_len"])
    row["peak_gib"] = peak_gib(timer, s.device)
    row["phase_peak_gib"] = {k: v / 2**30 for k, v in timer.peaks.items()}
    return row


def predict_s(cal: dict, cap: int, lengths: LengthModel, prompt_len: float) -> float:
    """Predicted time of a step at ``cap`` from the calibration step ``cal`` (conservative).

    Rollout: decode positions scale with the batch's longest response (~ the cap), and a decode
    step costs more as the KV cache grows (assumed factor ``1 + L / 4096``: reading and re-copying
    the cache). Scoring: positions scale with the prompt plus the mean response; attention adds ~20%.
    """
    cal_len = cal["longest"]
    rollout = cal["time_rollout"] / cal_len * cap * (1 + cap / 4096) / (1 + cal_len / 4096)
    scoring = sum(cal[f"time_{k}"] for k in ("teacher", "student_forward", "loss", "student_backward"))
    scoring *= (prompt_len + lengths.mean(cap)) / (prompt_len + cal["response_len"]) * 1.2
    return 1.15 * (rollout + scoring + cal["time_optimizer"] + max(cal["time_other"], 0.0))


def fmt_row(r: dict) -> str:
    if "error" in r:
        done = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in r.items() if k.startswith("time_"))
        return f"| {r['run']} | {r['cap']} | {'on' if r['buckets'] else 'off'} | FAILED: {r['error']} ({done}) |"
    t = r["time"]
    shares = " | ".join(f"{r[f'time_{k}']:.2f} ({r[f'time_{k}'] / t:.0%})" for k in (*PHASES, "other"))
    return (f"| {r['run']} | {r['cap']} | {'on' if r['buckets'] else 'off'} | {t:.2f} | {r['decode_ms']:.1f} | {shares} | "
            f"{r['response_len']:.0f} / "
            f"{r['longest']} | {r['truncated']:.0%} | {r['tokens_per_s']:.3g} | {r['rollout_tokens_per_s']:.3g} | "
            f"{r['rollout_padding']:.2f} | {r['scoring_padding']:.2f} | {r['peak_gib']:.1f} |")


HEADER = ("| run | max new | buckets | step s | decode ms/step | rollout s | teacher s | student fwd s | loss fwd+bwd s | student bwd s | "
          "optimizer s | other s | mean / longest response | truncated | tokens/s | rollout tokens/s | rollout padding | "
          "scoring padding | peak GiB |\n|" + "---|" * 19)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = dict(PRESETS[args.preset])
    for key, value in (("max_new_tokens", args.max_new_tokens), ("micro", args.micro_batch_prompts),
                       ("median", args.median), ("prompts", args.prompts)):
        if value:
            preset[key] = value
    t0 = time.perf_counter()
    if args.budget_s:
        def on_alarm(signum, frame):
            raise Deadline(f"the {args.budget_s:.0f} s budget ran out")
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = LengthModel(preset["median"], PROMPT_SIGMA, SAMPLE_SIGMA, seed=args.seed)
    if args.simulate_only:
        return simulate_only(args, preset, lengths)
    rows: list[dict] = []
    notes: list[str] = []
    info: dict = dict(preset=args.preset, engine=args.engine, args=vars(args), settings=preset,
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        cfg, s, forced, impl = build(args, preset, lengths)
        info.update(device=torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else
                    f"CPU ({os.cpu_count()} cores)", torch=torch.__version__, attn=impl, bf16=s.bf16,
                    build_s=time.perf_counter() - t0,
                    params={"student": sum(p.numel() for p in s.student.parameters()),
                            "teacher": sum(p.numel() for p in s.teacher.parameters())})
        import transformers
        info["transformers"] = transformers.__version__
        replica = s.strategy.replica
        info["sampling"] = (f"inference copy ({str(next(replica.parameters()).dtype).removeprefix('torch.')})"
                            if replica is not None else "vLLM's own weights")
        info["packed_attention"] = (packed_attention(cfg, s.device).describe(impl) if cfg.train.packed_scoring else None)
        print(f"built {preset['student']} ({info['params']['student']:,} params, fp32 master weights) and "
              f"{preset['teacher']} ({info['params']['teacher']:,}, {'bf16' if s.bf16 else 'fp32'}) on {info['device']} "
              f"in {info['build_s']:.1f} s; attention {impl}; sampling from {info['sampling']}; packed attention: "
              f"{info['packed_attention']}", flush=True)
        P, K, mb = cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.train.micro_batch_prompts
        optimizer, scheduler = build_optimizer(cfg, s.student, 1000)
        first = encode_prompts([r.question for r in s.train_data.records[:P]], [r.image for r in s.train_data.records[:P]],
                               s.tokenizer, s.image_processor)
        prompt_lens = first.attention_mask.sum(1).tolist()
        prompt_len = sum(prompt_lens) / len(prompt_lens)
        cap = preset["max_new_tokens"]
        if getattr(s.rollout, "static", None) is not None:
            info["cache_len"] = s.rollout.static.cache_len
        info["expected_scoring_padding"] = expected_padding(lengths, K, mb, cap, prompt_lens)
        step, ok = 0, True

        def go(label: str, at_cap: int, buckets: bool) -> bool:
            rows.append(run_one(cfg, s, optimizer, scheduler, forced, step, label, at_cap, buckets, args.seed))
            print(fmt_row(rows[-1]), flush=True)
            return "error" not in rows[-1]

        for _ in range(args.warmup):
            ok = go("warm-up", min(args.warmup_tokens, cap), True)
            step += 1
            if not ok:
                break
        cal = None
        if ok and args.budget_s and args.calib_tokens < cap:
            ok = go("calibration", args.calib_tokens, True)
            cal = rows[-1] if ok else None
            step += 1
        settings = {"on": [True], "off": [False], "both": [False, True]}[args.buckets]
        for _ in range(args.steps if ok else 0):
            run_cap = cap if cal is None else choose_cap(cal, cap, args, lengths, prompt_len, len(settings), t0, notes)
            if run_cap is None:
                break
            for buckets in settings:
                ok = go("measured", run_cap, buckets)
                if not ok:
                    break
            step += 1
            if not ok:
                break
    except Deadline as e:
        notes.append(f"stopped early: {e}")
    except torch.OutOfMemoryError as e:
        notes.append(f"out of memory outside a step: {str(e).splitlines()[0][:200]}")
    finally:
        if args.budget_s:
            signal.setitimer(signal.ITIMER_REAL, 0)
    info.update(total_s=time.perf_counter() - t0, notes=notes, rows=rows)
    report(info, out)
    return 0 if any(r["run"] == "measured" and "error" not in r for r in rows) else 1


def choose_cap(cal: dict, cap: int, args, lengths: LengthModel, prompt_len: float, runs: int, t0: float,
               notes: list[str]) -> int | None:
    """The largest cap (halving from ``cap``) whose ``runs`` steps are predicted to fit the budget."""
    left = args.budget_s - (time.perf_counter() - t0) - 10

    def need(c: int) -> float:
        return runs * predict_s(cal, c, lengths, prompt_len)

    run_cap = cap
    while run_cap > args.calib_tokens and need(run_cap) > left:
        run_cap //= 2
    if need(run_cap) > left:
        notes.append(f"stopped: {runs} step(s) at {run_cap} new tokens are predicted to take {need(run_cap):.0f} s, "
                     f"{left:.0f} s are left")
        print(notes[-1], flush=True)
        return None
    if run_cap < cap:
        notes.append(f"capped max_new_tokens {cap} -> {run_cap} to fit the {args.budget_s:.0f} s budget "
                     f"(predicted {need(run_cap):.0f} s, {left:.0f} s left)")
        print(notes[-1], flush=True)
    return run_cap


def report(info: dict, out: Path) -> None:
    name = (info["preset"] + ("" if info["engine"] == "hf" else f"_{info['engine']}")
            + ("" if info["args"]["scoring"] == "packed" else "_padded"))
    engine = "vLLM" if info["engine"] == "vllm" else f"HF generate (compile {info['args']['compile']})"
    lines = [f"# Scale step: preset {info['preset']}, rollout engine {engine}, {info['args']['scoring']} scoring", "",
             f"{info.get('device', '?')}, torch {info.get('torch', '?')}, transformers {info.get('transformers', '?')}, "
             f"attention {info.get('attn', '?')}; build {info.get('build_s', 0):.1f} s, run {info['total_s']:.1f} s.",
             f"Settings: {json.dumps(info['settings'])}", "", HEADER]
    lines += [fmt_row(r) for r in info["rows"]]
    pad = info.get("expected_scoring_padding")
    if pad:
        lines += ["", padding_line(pad)]
    lines += [f"Note: {n}" for n in info["notes"]]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"written to {out}/{name}.md and .json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
