"""Interleaved rounds of several loss implementations in one process (glibc's default malloc):
medians and per-round ratios at 2,048 x 32,000, D 256/512, fp32, one thread.

    OMP_NUM_THREADS=1 python bench/results/cpu/n2048_default_malloc/interleaved.py floor,vaopd-torch,vaopd-torch-compiled,floor-opd,vaopd-opd-torch,liger-compiled 7
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import torch
torch.set_num_threads(1)
import lossbench
impls = sys.argv[1].split(",")
rounds = int(sys.argv[2])
shape = lossbench.Shape(2048, 32000, 256, 512, "fp32")
inputs = lossbench.make_inputs(shape, "cpu")
runs = {i: lossbench.build(i, inputs, "cpu") for i in impls}
for i in impls:
    runs[i]()  # warm-up (compiles)
t = {i: [] for i in impls}
for r in range(rounds):
    order = impls if r % 2 == 0 else impls[::-1]
    for i in order:
        s = time.perf_counter(); runs[i](); t[i].append(time.perf_counter() - s)
for i in impls:
    print(f"{i:22s} median {statistics.median(t[i])*1e3:7.0f} ms  min {min(t[i])*1e3:7.0f}  rounds {[round(x*1e3) for x in t[i]]}")
def ratio(a, b):
    rs = sorted(x / y for x, y in zip(t[a], t[b]))
    return statistics.median(rs), rs[0], rs[-1]
for a, b in (("vaopd-opd-torch", "floor-opd"), ("liger-compiled", "floor-opd"), ("vaopd-torch", "floor"), ("vaopd-torch-compiled", "floor"), ("vaopd-opd-torch", "liger-compiled")):
    if a in t and b in t:
        m, lo, hi = ratio(a, b)
        print(f"{a} / {b}: median per-round ratio {m:.3f} (range {lo:.3f}-{hi:.3f})")
json.dump(t, open(Path(__file__).with_name("interleaved.json"), "w"))
