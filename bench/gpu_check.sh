#!/usr/bin/env bash
# One call on a CUDA machine: correctness of the Triton path against the reference at the paper's
# shape, then the GPU benchmark grid. Outputs land in $OUT (the device tool's folder) or bench/out.
#   bash bench/gpu_check.sh                 # correctness + full GPU grid
#   bash bench/gpu_check.sh -k "bf16"       # extra pytest args narrow the grid
# Needs torch, triton, transformers, pytest, pytest-benchmark; liger-kernel may come as a wheel in
# .whl/ (the GPU machine has no network).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
# Each phase has its own time cap so the whole script fits one ~9-minute device call; the most
# important output (correctness, then the loss table) runs first.
timeout -k 5 80 python3 bench/gpu_correctness.py 2>&1 | tee "$out/correctness.txt"
status=${PIPESTATUS[0]}
timeout -k 5 220 python3 -m pytest bench/bench_loss.py bench/bench_objective.py --benchmark -q -p no:cacheprovider "$@" 2>&1 | tee "$out/bench.txt"
timeout -k 10 185 python3 bench/scale_step.py --preset paper --warmup 1 --steps 1 --buckets on --budget-s 170 --out "$out/scale_step" 2>&1 | tee "$out/scale_step.txt"
timeout -k 5 45 python3 bench/gpu_tune.py ${VAOPD_TUNE_KERNELS:+--kernels} 2>&1 | tee "$out/tune.txt"
exit $status
