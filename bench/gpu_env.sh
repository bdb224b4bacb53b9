# Sourced (not run) by bench/gpu_check.sh and bench/gpu_quick.sh on a CUDA machine: goes to the
# repository root, sets $out (the device tool's $OUT, or bench/out), makes vaopd.kernels and any
# wheels in .whl/ importable offline (the GPU machine has no network), and records the device.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
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
