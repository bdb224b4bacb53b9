"""The single-process strategy: sampling from an inference copy refreshed in place, and the
non-finite policy of the step (rollout, teacher, loss, gradient) for both methods."""
import math

import pytest
import torch

import vaopd.optim as optim_mod
import vaopd.step as step_mod
import vaopd.trainer as trainer_mod
from trainer_utils import max_diff, state, tiny_config
from vaopd.build import build_setup
from vaopd.data import tiny_records
from vaopd.rollout import HFGenerate, encode_prompts
from vaopd.train import TrainingAborted, main, train


def _prompts(setup, n=2):
    records = tiny_records(n, seed=5)
    return encode_prompts([r.question for r in records], [r.image for r in records], setup.tokenizer,
                          setup.image_processor)


def _greedy(model, prompts, eos_ids, pad_id):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                              mm_token_type_ids=prompts.mm_token_type_ids, pixel_values=prompts.pixel_values,
                              image_grid_thw=prompts.image_grid_thw, do_sample=False, max_new_tokens=8,
                              eos_token_id=eos_ids, pad_token_id=pad_id)


def test_rollouts_come_from_a_replica_refreshed_in_place(tmp_path):
    s = build_setup(tiny_config(tmp_path), torch.device("cpu"))
    replica = s.strategy.replica
    assert replica is not None and replica is not s.student and s.rollout.model is replica
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in replica.parameters())  # fp32 run: fp32 copy
    prompts = _prompts(s)
    with torch.no_grad():  # a weight update large enough to change what the student says
        for p in s.student.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    student_tokens = _greedy(s.student, prompts, s.eos_ids, s.tokenizer.pad_token_id)
    s.student.train()
    assert not torch.equal(_greedy(replica, prompts, s.eos_ids, s.tokenizer.pad_token_id), student_tokens)  # stale
    storage = [p.data_ptr() for p in replica.parameters()]
    s.strategy.refresh_rollout(s.rollout)
    assert [p.data_ptr() for p in replica.parameters()] == storage  # copied into the same tensors
    assert max_diff(state(replica), state(s.student)) == 0
    assert torch.equal(_greedy(replica, prompts, s.eos_ids, s.tokenizer.pad_token_id), student_tokens)
    # The step's own sampling refreshes first: seeded samples equal the student's own.
    with torch.no_grad():
        for p in s.student.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    torch.manual_seed(3)
    sampled = s.strategy.sample(s.rollout, prompts, k=2, micro_prompts=2, step=0, seed=0, length_buckets=False)
    own = HFGenerate(s.student, eos_ids=s.eos_ids, pad_id=s.tokenizer.pad_token_id, banned_ids=s.banned_ids,
                     temperature=0.7, top_p=0.95, max_new_tokens=6)
    torch.manual_seed(3)
    tokens, mask = own.generate(prompts, 2)
    assert torch.equal(sampled.tokens, tokens) and torch.equal(sampled.mask, mask)


def test_bf16_training_samples_from_a_bf16_copy_and_lora_from_the_student(tmp_path):
    s = build_setup(tiny_config(tmp_path, "train.precision=bf16"), torch.device("cpu"))
    assert {p.dtype for p in s.strategy.replica.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in s.student.parameters()} == {torch.float32}
    with torch.no_grad():
        for p in s.student.parameters():
            p.add_(0.01)
    s.strategy.refresh_rollout(s.rollout)
    student = state(s.student)
    assert all(torch.equal(v, student[k].to(torch.bfloat16)) for k, v in state(s.strategy.replica).items())
    lora = build_setup(tiny_config(tmp_path, "model.lora.enabled=true", name="lora"), torch.device("cpu"))
    assert lora.strategy.replica is None and lora.rollout.model is lora.student


def _poison(phase: str):
    """Make one phase of the step non-finite (applied to a built setup)."""
    def apply(s):
        with torch.no_grad():
            if phase == "rollout":  # the sampling weights (refreshed from the student's) hold NaNs
                s.student.model.language_model.norm.weight.fill_(math.nan)
            elif phase == "teacher":
                s.teacher.model.language_model.norm.weight.fill_(math.nan)
        if phase == "gradient":  # finite loss, infinite gradient
            s.student.lm_head.weight.register_hook(lambda g: g * math.inf)
    return apply


@pytest.mark.parametrize("method", ["va_opd", "opd"])
@pytest.mark.parametrize("phase", ["rollout", "teacher", "loss", "gradient"])
def test_a_non_finite_phase_skips_the_step_for_both_methods(tmp_path, monkeypatch, method, phase):
    cfg = tiny_config(tmp_path, f"loss.method={method}")
    s = build_setup(cfg, torch.device("cpu"))
    _poison(phase)(s)
    if phase == "loss":
        real = step_mod.va_opd_loss
        monkeypatch.setattr(step_mod, "va_opd_loss", lambda *a, **k: (lambda out: (out[0] * math.nan, out[1]))(real(*a, **k)))
    optimizer, scheduler = optim_mod.build_optimizer(cfg, s.student, 4)
    trainable = {n: p.detach().clone() for n, p in s.student.named_parameters()}
    lr_before = scheduler.get_last_lr()
    record = step_mod.train_step(cfg, s, optimizer, scheduler, 0)
    assert record["skipped"] and record["non_finite"] == phase
    assert not math.isfinite(record["grad_norm"])  # NaN when no gradient was formed
    # No update: the weights are as they were (NaN where poisoned), no gradient is left, the schedule moved on.
    for n, p in s.student.named_parameters():
        assert torch.equal(p, trainable[n]) or (p.isnan() == trainable[n].isnan()).all(), n
        assert p.grad is None
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr() != lr_before or cfg.optim.warmup_ratio == 0


def test_clean_step_is_not_flagged(tmp_path):
    cfg = tiny_config(tmp_path)
    s = build_setup(cfg, torch.device("cpu"))
    optimizer, scheduler = optim_mod.build_optimizer(cfg, s.student, 2)
    record = step_mod.train_step(cfg, s, optimizer, scheduler, 0)
    assert not record["skipped"] and record["non_finite"] is None and math.isfinite(record["loss"])


@pytest.mark.parametrize("method", ["va_opd", "opd"])
def test_a_nan_teacher_aborts_cleanly_after_max_bad_steps(tmp_path, monkeypatch, method):
    real = trainer_mod.build_setup

    def poisoned(*args, **kwargs):
        s = real(*args, **kwargs)
        _poison("teacher")(s)
        return s

    monkeypatch.setattr(trainer_mod, "build_setup", poisoned)
    cfg = tiny_config(tmp_path, f"loss.method={method}", "train.max_steps=5", "train.max_bad_steps=2")
    with pytest.raises(TrainingAborted, match=r"2 non-finite steps in a row \(steps 1\.\.2\).*Last good checkpoint: none"):
        train(cfg)


def test_blown_up_weights_abort_from_the_command_line(tmp_path, capsys):
    # optim.lr=1e12: the first real update makes the logits non-finite, so sampling fails.
    run = tmp_path / "run"
    code = main(["--set", f"train.run_dir={run}", "--set", "optim.lr=1e12", "--set", "optim.warmup_ratio=0",
                 "--set", "train.max_steps=6", "--set", "train.checkpoint_every=1", "--set", "train.max_bad_steps=2",
                 "--set", "data.val=", "--set", "train.prompts_per_step=2", "--set", "rollout.samples_per_prompt=2",
                 "--set", "rollout.max_new_tokens=4", "--set", "log.progress=false", "--set", "log.rollouts_every=0"])
    out, err = capsys.readouterr()
    assert code == 1, err[-2000:]
    assert "step 2: non-finite rollout: update skipped" in out
    assert "aborted: 2 non-finite steps in a row (steps 2..3)" in err and "step_00000001 (left intact)" in err


def test_dry_run_counts_the_rollout_replica(tmp_path, capsys):
    from vaopd.tiny import build_model, build_tokenizer

    params = sum(p.numel() for p in build_model("student", build_tokenizer(), seed=0).parameters())
    assert main(["--dry-run", "--set", f"train.run_dir={tmp_path / 'r'}", "--set", "train.device=cpu",
                 "--set", "train.precision=fp32"]) == 0
    assert f"rollout replica (fp32): {params * 4 / 1024 ** 3:.3f}" in capsys.readouterr().out
    assert main(["--dry-run", "--set", f"train.run_dir={tmp_path / 'r'}", "--set", "model.lora.enabled=true"]) == 0
    assert "rollout replica" not in capsys.readouterr().out


def test_the_rollout_log_is_skipped_under_torchrun_only_where_rank_0_cannot_keep_it(tmp_path):
    from vaopd.rollout_log import rollout_log_unavailable

    replica = tiny_config(tmp_path, "log.rollouts_every=1")
    assert rollout_log_unavailable(replica, distributed=False) is None
    assert rollout_log_unavailable(replica, distributed=True) is None
    for setting in ("distributed.teacher=fsdp", "rollout.engine=vllm"):
        cfg = tiny_config(tmp_path, "log.rollouts_every=1", setting)
        assert rollout_log_unavailable(cfg, distributed=False) is None
        assert "distributed.teacher: replica and rollout.engine: hf" in rollout_log_unavailable(cfg, distributed=True)
