"""Time of one optimizer step of the tiny default (configs/tiny.yaml), split by phase.

``pytest bench/bench_train_step.py --benchmark`` times it; with ``--benchmark-disable`` (as in CI)
it runs the step once as a plain test. The split (rollout, teacher scoring, student forward, loss
forward+backward, student backward, optimizer) is printed and stored in the benchmark's ``extra_info``.
"""
from pathlib import Path

import pytest
import torch

from vaopd.config import load_config
from vaopd.build import build_setup
from vaopd.models import resolve_device
from vaopd.optim import build_optimizer
from vaopd.step import train_step

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
PHASES = ("rollout", "teacher", "student_forward", "loss", "student_backward", "optimizer")


@pytest.mark.parametrize("method", ["va_opd", "opd"])
def test_train_step(benchmark, method):
    cfg = load_config(CONFIG, [f"loss.method={method}", "data.val=", "log.progress=false"])
    torch.manual_seed(cfg.train.seed)
    setup = build_setup(cfg, resolve_device(cfg))
    optimizer, scheduler = build_optimizer(cfg, setup.student, cfg.train.max_steps)
    records = []

    def step():
        records.append(train_step(cfg, setup, optimizer, scheduler, len(records)))

    rounds = 1 if benchmark.disabled else 5
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0 if benchmark.disabled else 1, iterations=1)
    timed = records[-rounds:]
    split = {p: sum(r[f"time_{p}"] for r in timed) / len(timed) for p in PHASES}
    total = sum(r["time"] for r in timed) / len(timed)
    benchmark.extra_info.update({f"{p}_s": v for p, v in split.items()}, step_s=total,
                                responses=cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt)
    print(f"\n{method} step on {setup.device}: {total * 1e3:.1f} ms = "
          + ", ".join(f"{p} {v * 1e3:.1f} ms ({v / total:.0%})" for p, v in split.items()))
    assert all(v > 0 for v in split.values())
    assert sum(split.values()) <= total * 1.001
    assert not any(r["skipped"] for r in records)
