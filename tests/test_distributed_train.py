"""The trainer under torchrun (2 gloo ranks on 127.0.0.1): sharded checkpoints that resume on another
number of ranks and continue as an uninterrupted run, export, and a failing rank ending the job
(the ranks run ``torchrun_train.py``)."""
import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForImageTextToText

import vaopd.train as train_mod
from torchrun_train import SETTINGS, sets, torchrun
from trainer_utils import assert_adam_close, max_diff, state, tiny_config
from vaopd.checkpoint import is_sharded_checkpoint, latest_checkpoint
from vaopd.distributed import init_distributed
from vaopd.export import main as export_main


def step_losses(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def exported(tmp_path, checkpoint, name):
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / name)]) == 0
    return state(AutoModelForImageTextToText.from_pretrained(tmp_path / name))


@pytest.mark.slow
def test_resume_across_world_sizes_continues_identically(tmp_path, scripted_rollouts):
    # Reference: one plain process, 4 steps, single-process checkpoints at 2 and 4.
    ref = train_mod.train(tiny_config(tmp_path, *SETTINGS, "train.max_steps=4", "train.checkpoint_every=2",
                                      "log.rollouts_every=1", name="ref"))
    ref_weights, ref_losses = state(ref.student), step_losses(ref.run_dir)

    # 2 ranks for steps 1-2 (sharded checkpoint), then one plain process for steps 3-4.
    two = tmp_path / "two_then_one"
    done = torchrun(tmp_path, *sets(f"train.run_dir={two}", "train.max_steps=4", "train.stop_after=2",
                                    "log.rollouts_every=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 logged its rows (slots 0-1: prompt 0's responses) with the numbers one process gets.
    logged = [json.loads(line) for line in (two / "rollouts.jsonl").read_text().splitlines()]
    ref_logged = [json.loads(line) for line in (ref.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["row"], r["prompt"]) for r in logged] == [(1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)]
    for r in logged:
        (same,) = [x for x in ref_logged if (x["step"], x["row"]) == (r["step"], r["row"])]
        assert r["tokens"] == same["tokens"] and r["high"] == same["high"]
        for key in ("teacher_logp", "teacher_ablated_logp", "student_logp", "student_ablated_logp"):
            assert max(abs(a - b) for a, b in zip(r[key], same[key])) < 1e-4, key
    ckpt = latest_checkpoint(two / "checkpoints")
    assert ckpt.name == "step_00000002" and is_sharded_checkpoint(ckpt)
    assert json.loads((ckpt / "meta.json").read_text())["world_size"] == 2
    one = train_mod.train(tiny_config(tmp_path, *SETTINGS, "train.max_steps=4", f"train.run_dir={two}"), resume=True)
    assert one.step == 4
    assert max_diff(state(one.student), ref_weights) < 1e-5
    for s, loss in step_losses(two).items():
        assert abs(loss - ref_losses[s]) < 1e-5 * abs(ref_losses[s]), (s, loss, ref_losses[s])

    # The reverse: the reference's single-process step-2 checkpoint, resumed on 2 ranks to step 4.
    back = tmp_path / "one_then_two"
    (back / "checkpoints").mkdir(parents=True)
    os.rename(ref.run_dir / "checkpoints" / "step_00000002", back / "checkpoints" / "step_00000002")
    done = torchrun(tmp_path, "--resume", *sets(f"train.run_dir={back}", "train.max_steps=4"))
    assert done.returncode == 0, done.stderr[-3000:]
    final = latest_checkpoint(back / "checkpoints")
    assert final.name == "step_00000004" and is_sharded_checkpoint(final)
    assert max_diff(exported(tmp_path, final, "export"), ref_weights) < 1e-5
    assert all(abs(step_losses(back)[s] - ref_losses[s]) < 1e-5 * abs(ref_losses[s]) for s in (3, 4))


def test_export_of_a_single_process_checkpoint_is_its_model(tmp_path, scripted_rollouts):
    result = train_mod.train(tiny_config(tmp_path, *SETTINGS, "train.max_steps=1"))
    assert max_diff(exported(tmp_path, result.checkpoint, "export"), state(result.student)) == 0


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    start = time.perf_counter()
    # Rank 1's loss raises in step 3 (its 3rd micro-batch); checkpoints after every step.
    done = torchrun(tmp_path, "--fault", "raise", "1", "3",
                    *sets(f"train.run_dir={run}", "train.max_steps=4", "train.checkpoint_every=1"))
    assert done.returncode != 0
    assert time.perf_counter() - start < 120  # no hang until the collective timeout (60 s) and beyond
    assert "[rank 1]" in done.stderr and "injected failure" in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step_00000001",
                                                                                                     "step_00000002"]
    # The newest complete checkpoint is intact: it exports and resumes.
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_00000002"
    exported(tmp_path, ckpt, "export")
    assert [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()][-1].startswith('{"step": 2,')


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_after_the_same_step_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    # SIGTERM reaches rank 1 only, during step 2: both ranks finish step 2, save it together, exit 0.
    done = torchrun(tmp_path, "--fault", "sigterm", "1", "2", *sets(f"train.run_dir={run}", "train.max_steps=6"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(stopped by signal)" in done.stdout
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_00000002"]
    assert sorted(step_losses(run)) == [1, 2]


@pytest.mark.slow
def test_non_finite_teacher_on_one_rank_skips_the_step_on_all_ranks(tmp_path):
    run = tmp_path / "run"
    # Rank 1's teacher gives NaN in step 2 (one micro-batch per step): both ranks skip step 2 and go on.
    done = torchrun(tmp_path, "--nan-teacher", "1", "2", *sets(f"train.run_dir={run}", "train.max_steps=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["non_finite"]) for r in lines] == [(1, False, None), (2, True, "teacher"),
                                                                            (3, False, None)]
    assert "step 2: non-finite teacher: update skipped" in done.stdout


@pytest.mark.slow
def test_packed_scoring_on_two_ranks_matches_one_process(tmp_path, scripted_rollouts):
    # Packed scoring with the teacher sharded too: each rank packs its own rows; the weights match
    # one process's run.
    packed = ["train.packed_scoring=true", "train.max_steps=2"]
    ref = train_mod.train(tiny_config(tmp_path, *SETTINGS, *packed, name="ref"))
    run = tmp_path / "two"
    done = torchrun(tmp_path, *sets(f"train.run_dir={run}", "distributed.teacher=fsdp", *packed), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt.name == "step_00000002" and is_sharded_checkpoint(ckpt)
    assert_adam_close(exported(tmp_path, ckpt, "export"), state(ref.student))
    ref_losses, losses = step_losses(ref.run_dir), step_losses(run)
    assert sorted(losses) == [1, 2]
    assert all(abs(losses[s] - ref_losses[s]) < 1e-5 * abs(ref_losses[s]) for s in losses), (losses, ref_losses)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["scoring_padding"] for r in records if "loss" in r] == [1.0, 1.0]


def test_process_group_is_gloo_on_cpu_with_the_configured_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: seen.update(backend=backend, **kwargs))
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    env = init_distributed("cpu", 7.5)
    assert (env.rank, env.world_size, env.local_rank, env.device, env.is_main) == (1, 2, 1, torch.device("cpu"), False)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=7.5)
