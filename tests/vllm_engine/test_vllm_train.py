"""Training with ``rollout.engine: vllm`` end to end on tiny models (run in .venv-vllm: README)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from trainer_utils import free_port, max_diff, state, tiny_config  # noqa: E402
from vaopd.train import train  # noqa: E402


def vllm_config(tmp_path, *overrides, name):
    return tiny_config(tmp_path, "rollout.engine=vllm", *overrides, name=name)


def step_metrics(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def check_steps(records, steps):
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert not r["skipped"] and r["time_rollout"] > 0
        assert all(math.isfinite(r[k]) for k in ("loss", "kl", "grad_norm", "response_len"))
        assert r["loss"] > 0 and r["kl"] > 0 and 1 <= r["response_len"] <= 6


def test_va_opd_trains_and_resume_samples_as_the_uninterrupted_run(tmp_path):
    straight = train(vllm_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", name="straight"))
    check_steps(step_metrics(straight.run_dir), 4)
    assert all(r["va"] is not None and math.isfinite(r["va"]) for r in straight.history)
    assert sorted(p.name for p in (straight.run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    cfg = vllm_config(tmp_path, "train.max_steps=4", "train.stop_after=2", name="split")
    first = train(cfg)
    second = train(cfg, resume=True)  # a new engine, built from the checkpoint's model folder
    assert second.step == 4
    assert [r["records"] for r in first.history + second.history] == [r["records"] for r in straight.history]
    # The engine's per-prompt seeds come from the restored RNG: the same responses, so the same steps.
    for a, b in zip(straight.history, first.history + second.history):
        assert a["response_len"] == b["response_len"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert max_diff(state(straight.student), state(second.student)) < 1e-5


def test_opd_trains_with_vllm(tmp_path):
    result = train(vllm_config(tmp_path, "loss.method=opd", name="opd"))
    check_steps(step_metrics(result.run_dir), 2)
    assert all(r["va"] is None for r in result.history)
    assert result.checkpoint.name == "step_00000002" and (result.checkpoint / "model" / "model.safetensors").is_file()


def test_every_rank_runs_its_own_engine_under_torchrun(tmp_path):
    """2 gloo ranks: each builds an engine (vLLM's external launcher inside the job's process
    group) and loads the FSDP2-sharded student's weights, gathered one tensor at a time."""
    run_dir = tmp_path / "two"
    settings = ["rollout.engine=vllm", "train.device=cpu", "train.precision=fp32", "train.prompts_per_step=2",
                "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "data.tiny_train_size=8", "data.val=",
                "log.progress=false", "log.rollouts_every=0", "train.max_steps=2", f"train.run_dir={run_dir}",
                "distributed.timeout_s=120"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "vaopd.train", *[a for o in settings for a in ("--set", o)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    check_steps(step_metrics(run_dir), 2)
    assert (run_dir / "checkpoints" / "step_00000002" / "dcp").is_dir()
