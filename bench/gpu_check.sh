#!/usr/bin/env bash
# One call on a CUDA machine: correctness of the Triton path against the reference at the paper's
# shape, then the GPU benchmark grid. Outputs land in $OUT (the device tool's folder) or bench/out.
#   bash bench/gpu_check.sh                 # correctness + full GPU grid
#   bash bench/gpu_check.sh -k "bf16"       # extra pytest args narrow the grid
# Needs torch, triton, transformers, pytest, pytest-benchmark; liger-kernel may come as a wheel in
# .whl/ (the GPU machine has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vaopd-site .whl/*.whl && export PYTHONPATH="/tmp/vaopd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# kernels/ is importable as vaopd.kernels once the project is installed (setup.py maps it); install
# in place, offline and without dependencies, or link it into the package on this disposable copy.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
python3 -c "import vaopd.kernels" 2>/dev/null || ln -sfn ../kernels vaopd/kernels
export PYTHONUNBUFFERED=1 VAOPD_BENCH_OUT="$out" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# Each phase has its own time cap so the whole script fits one ~9-minute device call; the most
# important output (correctness, then the loss table) runs first.
timeout -k 5 80 python3 bench/gpu_correctness.py 2>&1 | tee "$out/correctness.txt"
status=${PIPESTATUS[0]}
timeout -k 5 220 python3 -m pytest bench/bench_loss.py bench/bench_objective.py --benchmark -q -p no:cacheprovider "$@" 2>&1 | tee "$out/bench.txt"
timeout -k 10 185 python3 bench/scale_step.py --preset paper --warmup 1 --steps 1 --buckets on --budget-s 170 --out "$out/scale_step" 2>&1 | tee "$out/scale_step.txt"
timeout -k 5 45 python3 bench/gpu_tune.py ${VAOPD_TUNE_KERNELS:+--kernels} 2>&1 | tee "$out/tune.txt"
exit $status
