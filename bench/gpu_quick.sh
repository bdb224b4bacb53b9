#!/usr/bin/env bash
# A short device call (about 2 minutes): correctness of the Triton path against the reference, then only
# the paper-shape loss rows (8,192 tokens, V 151,936, D 2048/4096, bf16): VA-OPD and OPD on Triton,
# their product floors, compiled Liger and TRL's divergence. Outputs land in $OUT (the device tool's folder) or bench/out.
#   bash bench/gpu_quick.sh
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout -k 5 50 python3 bench/gpu_correctness.py 2>&1 | tee "$out/correctness.txt"
status=${PIPESTATUS[0]}
timeout -k 5 100 python3 -m pytest bench/bench_loss.py --benchmark -q -p no:cacheprovider \
  -k "N8192_V151936_D2048x4096_bf16 and (vaopd-triton or vaopd-opd-triton or floor or liger-compiled or trl)" 2>&1 | tee "$out/bench.txt"
exit $status
