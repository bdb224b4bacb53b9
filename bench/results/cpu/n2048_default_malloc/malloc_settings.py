"""One loss implementation after another in one process under a glibc malloc setting (the
experiment that found why the benchmark's OPD row was slow): MODE contains "mallopt" (every freed
block of 64 KiB or more handed back to the OS, as the benchmark's process used to set) and/or
"mlock" (pages mapped so far locked), or "plain".

    OMP_NUM_THREADS=1 python bench/results/cpu/n2048_default_malloc/malloc_settings.py MODE vaopd-opd-torch,floor-opd,liger-compiled
"""
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import torch
torch.set_num_threads(1)
import lossbench
mode, impls = sys.argv[1], sys.argv[2].split(",")
libc = ctypes.CDLL("libc.so.6")
if "mallopt" in mode:
    libc.mallopt(-3, 65536)
if "mlock" in mode:
    libc.mlockall(1)
shape = lossbench.Shape(int(os.environ.get("N", 2048)), 32000, 256, 512, "fp32")
inputs = lossbench.make_inputs(shape, "cpu")
for impl in impls:
    run = lossbench.build(impl, inputs, "cpu")
    run()
    ts = []
    for _ in range(int(os.environ.get("R", 3))):
        t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
    print(f"{mode:14s} {impl:20s} median {statistics.median(ts)*1e3:8.0f} ms  all {[round(x*1e3) for x in ts]}", flush=True)
