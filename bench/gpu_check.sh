#!/usr/bin/env bash
# One call on a CUDA machine (about 8 minutes of device time, compile warm-ups included), most
# important first, each phase capped so a slow one cannot eat the next:
#   1. kernel correctness (Triton path against the reference at the paper's shape)      <= 40 s
#   2. ms per decode step, eager against compiled, paper student, 16 x 4 rows          <= 60 s
#   3. packed scoring on FlexAttention (teacher and student, with backward) against     <= 50 s
#      padded SDPA: equal hidden states and gradients, time and peak memory; the
#      steps below score packed on FlexAttention only if this passes (else SDPA)
#   4. one full authors' step at the 4,096 cap (16 x 4): phase table and peak memory   <= 170 s
#   5. one rank's slice of an 8-GPU step (2 prompts x 4 responses on this GPU)         <= 60 s
#   6. the paper-shape loss rows (TRL's where its wheels were carried)                 <= 40 s
#   7. issue 17's A/B timing of two exported commits, if bench/out/ab was carried       <= 90 s
# Results (JSON and markdown tables, each with the card and the date) land in
# $OUT/results/<card>/ (the device tool's folder; bench/out/results/<card>/ without it): copy that
# folder to bench/results/<card>/ and commit it.
#   bash bench/gpu_check.sh
# Needs torch, triton, transformers, pytest, pytest-benchmark; liger-kernel may come as a wheel in
# .whl/ (the GPU machine has no network).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|b200|l40s' | head -1 | tr 'A-Z' 'a-z')
card=${card:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')}
res="$out/results/$card"
mkdir -p "$res"
{ echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"; echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')";
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; cat "$out/device.txt"; } > "$res/device.txt"

timeout -k 5 40 python3 bench/gpu_correctness.py 2>&1 | tee "$res/correctness.txt"
status=${PIPESTATUS[0]}
timeout -k 5 60 python3 bench/decode_step.py --caps 4096 1024 --steps 96 --out "$res/decode_step" 2>&1 | tee "$res/decode_step.txt"
timeout -k 5 50 python3 bench/packed_scoring.py --device cuda --prompts 4 --median 300 --cap 1024 --repeats 2 \
  --out "$res/packed_scoring" 2>&1 | tee "$res/packed_scoring.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] && packed_attention=flex || packed_attention=model
echo "packed scoring attention for the steps below: $packed_attention" | tee -a "$res/packed_scoring.txt"
timeout -k 10 170 python3 bench/scale_step.py --preset paper --compile on --warmup 1 --warmup-tokens 32 --steps 1 \
  --buckets on --packed-attention "$packed_attention" --budget-s 160 --out "$res/scale_step" 2>&1 | tee "$res/scale_step.txt"
timeout -k 10 60 python3 bench/scale_step.py --preset paper --prompts 2 --compile on --warmup 1 --warmup-tokens 32 \
  --steps 1 --buckets on --packed-attention "$packed_attention" --budget-s 50 --calib-tokens 512 \
  --out "$res/scale_step_rank_slice" 2>&1 | tee "$res/scale_step_rank_slice.txt"
VAOPD_BENCH_OUT="$res" timeout -k 5 40 python3 -m pytest bench/bench_loss.py --benchmark -q -p no:cacheprovider \
  -k "N8192_V151936_D2048x4096_bf16 and (vaopd-triton or vaopd-opd-triton or floor or liger-compiled or trl)" "$@" 2>&1 \
  | tee "$res/bench.txt"
# The two trees come from `python bench/ab_commits.py c4da231 fc8189d --export bench/out/ab` (carried).
[ -d bench/out/ab ] && timeout -k 5 90 python3 bench/ab_commits.py bench/out/ab/c4da231 bench/out/ab/fc8189d --rounds 24 \
  --out "$res/ab_opd.json" 2>&1 | tee "$res/ab_opd.txt"
exit $status
