"""The trainer under torchrun, for the multi-process tests: ``torchrun()`` launches this file on local
gloo ranks (127.0.0.1); ``SETTINGS`` and ``sets()`` are its tiny settings as ``--set`` arguments.

Run as a script, this module is the torchrun entry point: ``python -m vaopd.train`` with the
scripted rollouts below and, with ``--fault raise|sigterm R N``, a loss that raises (or sends
SIGTERM to its own process) on rank R at its N-th call; with ``--nan-teacher R N``, a teacher whose
states are NaN on rank R at its N-th micro-batch.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import vaopd.build as build_mod
import vaopd.step as step_mod
import vaopd.train as train_mod
from trainer_utils import free_port
from vaopd.rollout import response_mask

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["train.device=cpu", "train.precision=fp32", "train.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6", "data.tiny_train_size=8", "data.val=", "log.progress=false",
            "optim.lr=1e-3", "optim.warmup_ratio=0", "distributed.timeout_s=60"]


class ScriptedRollout:
    """Deterministic responses of unequal lengths that depend only on the prompt and the sample
    index, never on the RNG or the rank: runs on different numbers of ranks see the same data."""

    def __init__(self, model, *, eos_ids, pad_id, banned_ids, **_):
        self.eos, self.pad = eos_ids[0], pad_id
        self.allowed = torch.tensor([i for i in range(10, 300) if i not in banned_ids and i not in eos_ids])

    def generate(self, prompts, k):
        rows = []
        for i in range(len(prompts)):
            key = int(prompts.input_ids[i].sum())
            for j in range(k):
                g = torch.Generator().manual_seed(key * 31 + j)
                row = self.allowed[torch.randint(len(self.allowed), (6,), generator=g)]
                length = 2 + (key + 3 * j) % 5
                row[length - 1] = self.eos
                row[length:] = self.pad
                rows.append(row)
        tokens = torch.stack(rows)
        return tokens, response_mask(tokens, [self.eos])


def torchrun(tmp_path, *args, nproc=2, timeout=180):
    """``torchrun`` this module on ``nproc`` local ranks; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def sets(*overrides):
    """``SETTINGS`` then ``overrides`` as ``--set`` arguments."""
    return [a for o in [*SETTINGS, *overrides] for a in ("--set", o)]


def _script(argv: list[str]) -> int:
    """torchrun entry: ``vaopd.train.main`` with scripted rollouts and an optional injected fault."""
    build_mod.HFGenerate = ScriptedRollout
    if "--nan-teacher" in argv:  # rank R's teacher states are NaN at its N-th micro-batch
        at = argv.index("--nan-teacher")
        fault_rank, fault_call = int(argv[at + 1]), int(argv[at + 2])
        argv = argv[:at] + argv[at + 3:]
        real_build, teacher_calls = build_mod.build_scorer, []

        def faulty_scorer(cfg, strategy):  # the scorer the run builds (packed or padded)
            scorer = real_build(cfg, strategy)
            real_teacher = scorer.teacher

            def nan_teacher(*args):
                clean, ablated, weight = real_teacher(*args)
                teacher_calls.append(1)
                if int(os.environ["RANK"]) == fault_rank and len(teacher_calls) == fault_call:
                    clean = clean * float("nan")
                return clean, ablated, weight

            scorer.teacher = nan_teacher
            return scorer

        build_mod.build_scorer = faulty_scorer
    if "--fault" in argv:
        at = argv.index("--fault")
        kind, fault_rank, fault_call = argv[at + 1], int(argv[at + 2]), int(argv[at + 3])
        argv = argv[:at] + argv[at + 4:]
        real, calls = step_mod.va_opd_loss, []

        def faulty(*args, **kwargs):
            calls.append(1)
            if int(os.environ["RANK"]) == fault_rank and len(calls) == fault_call:
                if kind == "raise":
                    raise RuntimeError("injected failure")
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        step_mod.va_opd_loss = faulty
    return train_mod.main(argv)


if __name__ == "__main__":
    sys.exit(_script(sys.argv[1:]))
