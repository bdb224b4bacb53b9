"""The training loop end to end on tiny models: methods, learning, accumulation, resume, safety."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import vaopd.build as build_mod
import vaopd.optim as optim_mod
import vaopd.step as step_mod
from trainer_utils import assert_adam_close, max_diff, state, tiny_config
from vaopd.checkpoint import CheckpointError, latest_checkpoint, load_trainer_state
from vaopd.data import tiny_records
from vaopd.kernels import LossSpec, va_opd_loss
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts, response_mask
from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.models import VocabularyError
from vaopd.scoring import response_hidden, teacher_hidden
from vaopd.train import TrainingAborted, main, train


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["va_opd", "opd"])
def test_both_methods_end_to_end(tmp_path, method):
    cfg = tiny_config(tmp_path, f"loss.method={method}", "train.max_steps=3", "train.checkpoint_every=2",
                      "data.val=tiny", "data.tiny_val_size=2", "eval.every=2", "eval.samples=2", "eval.max_new_tokens=4")
    before = state(build_model("student", build_tokenizer(), seed=0))
    result = train(cfg)
    assert result.step == 3
    steps = [r for r in metrics(result.run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["loss"] > 0 and r["kl"] > 0 and not r["skipped"] and r["tokens_per_s"] > 0
        assert (r["va"] is not None) == (method == "va_opd")
        assert all(r[f"time_{k}"] > 0 for k in ("rollout", "teacher", "student_forward", "loss", "student_backward", "optimizer"))
    vals = [r for r in metrics(result.run_dir) if "val_accuracy" in r]
    assert [v["step"] for v in vals] == [2, 3] and all(0 <= v["val_accuracy"] <= 1 for v in vals)
    ckpts = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]
    saved = load_file(result.checkpoint / "model" / "model.safetensors")
    assert max_diff(saved, {k: v for k, v in state(result.student).items() if k in saved}) == 0
    assert max_diff(state(result.student), before) > 0  # it trained


def fixed_batch_kl(student, teacher, tokens, mask, prompts) -> float:
    """Mean full-vocabulary KL(student || teacher) over the valid tokens of fixed responses."""
    with torch.no_grad():
        t_hidden, _ = teacher_hidden(teacher, prompts, None, tokens, mask)
        s_hidden = response_hidden(student, prompts, tokens, mask)
        _, stats = va_opd_loss(s_hidden, student.lm_head.weight, t_hidden, None, teacher.lm_head.weight, tokens, mask,
                               torch.arange(tokens.shape[0]), spec=LossSpec(method="opd"), vocab_size=len(build_tokenizer()))
    return float(stats["kl"][mask].mean())


def test_kl_to_the_teacher_goes_down(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=20", "train.prompts_per_step=4", "data.tiny_train_size=16",
                      "rollout.max_new_tokens=8", "rollout.temperature=1.0", "rollout.top_p=1.0", "optim.lr=5e-3")
    # Fixed held-out responses, sampled once from the untrained student on unseen prompts.
    tok, ip = build_tokenizer(), build_image_processor()
    student = build_model("student", tok, seed=0)
    records = tiny_records(4, seed=99)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip)
    eos = [tok.eos_token_id]
    torch.manual_seed(0)
    tokens, mask = HFGenerate(student, eos_ids=eos, pad_id=tok.pad_token_id, temperature=1.0, top_p=1.0, max_new_tokens=8,
                              banned_ids=banned_token_ids(tok, student.lm_head.weight.shape[0], eos)).generate(prompts, 2)
    prompts = prompts.repeat(2)
    teacher = build_model("teacher", tok, seed=1)
    before = fixed_batch_kl(student, teacher, tokens, mask, prompts)

    result = train(cfg)
    after = fixed_batch_kl(result.student, teacher, tokens, mask, prompts)
    assert after < 0.95 * before, (before, after)
    kl = [r["kl"] for r in result.history]  # the on-policy KL of the training steps falls too
    assert sum(kl[-5:]) < sum(kl[:5]), kl


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    common = ("train.prompts_per_step=4", "train.max_steps=2")
    big = train(tiny_config(tmp_path, *common, name="big"))
    small = train(tiny_config(tmp_path, *common, "train.micro_batch_prompts=1", name="acc"))
    for a, b in zip(big.history, small.history):
        assert a["records"] == b["records"]
        # The pre-clipping gradient norm: a wrong normalisation (per micro-batch P) would scale it.
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["va"] == pytest.approx(b["va"], rel=1e-5)
    assert_adam_close(state(big.student), state(small.student))


def _designed_step(tmp_path, monkeypatch, buckets: bool):
    """One step of 4 prompts x 2 responses in micro-batches of 2 prompts, with responses of designed
    lengths (prompts 0 and 2: 10 tokens, 1 and 3: 2 tokens); returns the metrics, the sibling
    groups of each micro-batch (as the loss saw them) and the student after the step."""
    cfg = tiny_config(tmp_path, "train.prompts_per_step=4", "train.micro_batch_prompts=2",
                      f"train.length_buckets={str(buckets).lower()}", "train.packed_scoring=false",
                      name=f"buckets_{buckets}")
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    eos, pad = setup.eos_ids[0], setup.tokenizer.pad_token_id
    lengths = [10, 2, 10, 2]

    class Designed:
        def generate(self, prompts, k):
            rows = [[40] * (lengths[i] - 1) + [eos] + [pad] * (10 - lengths[i]) for i in range(len(prompts)) for _ in range(k)]
            tokens = torch.tensor(rows)
            return tokens, response_mask(tokens, setup.eos_ids)

    setup.rollout = Designed()
    seen = []

    def recording(*args, **kwargs):
        seen.append(sorted(set(args[7].tolist())))  # group_ids: the micro-batch's prompts
        return va_opd_loss(*args, **kwargs)

    monkeypatch.setattr(step_mod, "va_opd_loss", recording)
    optimizer, scheduler = optim_mod.build_optimizer(cfg, setup.student, 1)
    torch.manual_seed(0)
    record = step_mod.train_step(cfg, setup, optimizer, scheduler, 0)
    return record, seen, setup.student


def test_length_buckets_group_by_length_and_keep_the_step(tmp_path, monkeypatch):
    plain, plain_groups, plain_student = _designed_step(tmp_path, monkeypatch, buckets=False)
    bucketed, bucket_groups, bucket_student = _designed_step(tmp_path, monkeypatch, buckets=True)
    assert plain_groups == [[0, 1], [2, 3]]  # step order: each micro-batch pads to 10 tokens
    assert bucket_groups == [[1, 3], [0, 2]]  # by length: the short pair is 2 wide, the long pair 10
    # Response padding: plain 2 x (4 rows x 10) positions for 48 valid tokens; bucketed none.
    assert plain["rollout_padding"] == pytest.approx(8 * 10 / 48)
    assert bucketed["scoring_padding"] < plain["scoring_padding"]
    assert plain["response_len"] == bucketed["response_len"] == 6
    assert plain["loss"] == pytest.approx(bucketed["loss"], rel=1e-5)
    assert plain["grad_norm"] == pytest.approx(bucketed["grad_norm"], rel=1e-4)
    # The micro-batches sum the same gradients in another order; AdamW's first step moves each weight
    # by about lr (1e-3), so a tenth of a step bounds the rounding.
    assert max_diff(state(plain_student), state(bucket_student)) < 1e-4


def test_dropping_unneeded_prompt_padding_keeps_the_hidden_states():
    tok, ip = build_tokenizer(), build_image_processor()
    teacher = build_model("teacher", tok, seed=1).eval()
    records = tiny_records(2, seed=3)
    prompts = encode_prompts(["a short one", records[1].question * 3], [r.image for r in records], tok, ip)
    short = prompts.select([0])  # left-padded to the long prompt's length
    trimmed = step_mod.without_pad_columns(short)
    assert trimmed.input_ids.shape[1] == int(short.attention_mask.sum()) < short.input_ids.shape[1]
    tokens = torch.tensor([[40, 41, 42]])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    full, _ = teacher_hidden(teacher, short, None, tokens, mask)
    cut, _ = teacher_hidden(teacher, trimmed, None, tokens, mask)
    torch.testing.assert_close(cut, full, rtol=1e-4, atol=1e-5)


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_config(tmp_path, "train.max_steps=4", name="straight"))
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.stop_after=2", name="split")
    first = train(cfg)
    assert first.step == 2 and first.checkpoint.name == "step_00000002"
    assert load_trainer_state(first.checkpoint)["data_position"] == 4
    second = train(cfg, resume=True)
    assert second.step == 4
    assert [r["records"] for r in first.history + second.history] == [r["records"] for r in straight.history]
    for a, b in zip(straight.history[2:], second.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert max_diff(state(straight.student), state(second.student)) < 1e-5
    assert [r["step"] for r in metrics(second.run_dir)] == [1, 2, 3, 4]


def test_teacher_is_frozen(tmp_path):
    result = train(tiny_config(tmp_path, "train.max_steps=2"))
    fresh = build_model("teacher", build_tokenizer(), seed=1)  # the run's teacher: seed + 1
    assert not result.teacher.training
    assert not any(p.requires_grad for p in result.teacher.parameters())
    assert max_diff(state(result.teacher), state(fresh)) == 0


def test_mismatched_vocabularies_are_refused(tmp_path):
    other = build_tokenizer()
    other.add_tokens(["<extra_token>"])
    teacher = build_model("teacher", build_tokenizer(), seed=1)
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    other.save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    with pytest.raises(VocabularyError, match="tokenizers differ"):
        train(tiny_config(tmp_path, f"model.teacher={folder}"))


def test_teacher_loads_from_a_model_folder(tmp_path):
    folder = tmp_path / "teacher"
    build_model("teacher", build_tokenizer(), seed=1).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    assert train(tiny_config(tmp_path, f"model.teacher={folder}", "train.max_steps=1")).step == 1


def test_bad_record_and_bad_config_from_the_command_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "q", "answer": "1", "images": ["missing.png"]}) + "\n")
    assert main(["--set", f"data.train={tmp_path / 'd.jsonl'}", "--set", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert "bad record 0" in capsys.readouterr().err
    assert main(["--set", "train.prompts_per_step=0"]) == 2
    assert "train.prompts_per_step: must be > 0" in capsys.readouterr().err


def with_loss_hook(monkeypatch, hook):
    """Wrap the trainer's loss so ``hook(call_index, loss)`` can replace the loss or act."""
    real = step_mod.va_opd_loss
    calls = []

    def wrapped(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return hook(len(calls), loss), stats

    monkeypatch.setattr(step_mod, "va_opd_loss", wrapped)


def test_non_finite_steps_are_skipped_then_abort_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=1", "train.max_bad_steps=2",
                      "train.keep_checkpoints=5")
    with_loss_hook(monkeypatch, lambda n, loss: loss * float("nan") if n >= 3 else loss)
    with pytest.raises(TrainingAborted, match=r"2 non-finite steps in a row .*step_00000002 \(left intact\)"):
        train(cfg)
    run_dir = tmp_path / "run"
    records = metrics(run_dir)
    assert [r["skipped"] for r in records] == [False, False, True, True]
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000002"
    assert load_trainer_state(run_dir / "checkpoints" / "step_00000002")["step"] == 2


def test_skipped_step_leaves_weights_unchanged(tmp_path, monkeypatch):
    clean = train(tiny_config(tmp_path, "train.max_steps=1", name="clean"))
    with_loss_hook(monkeypatch, lambda n, loss: loss * float("inf") if n == 2 else loss)
    result = train(tiny_config(tmp_path, "train.max_steps=2", name="inf"))
    assert [r["skipped"] for r in result.history] == [False, True]
    assert max_diff(state(clean.student), state(result.student)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_zero(tmp_path, monkeypatch, capsys, sig):
    def send(n, loss):
        if n == 1:
            os.kill(os.getpid(), sig)
        return loss

    with_loss_hook(monkeypatch, send)
    previous = signal.getsignal(sig)
    run_dir = tmp_path / "r"
    code = main(["--set", f"train.run_dir={run_dir}", "--set", "train.max_steps=5", "--set", "data.val=",
                 "--set", "train.prompts_per_step=2", "--set", "rollout.samples_per_prompt=2",
                 "--set", "rollout.max_new_tokens=4", "--set", "log.progress=false"])
    assert code == 0
    assert "stopped by signal" in capsys.readouterr().out
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000001"
    assert signal.getsignal(sig) is previous  # the handlers are restored


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    import vaopd.checkpoint as ckpt_mod

    real_save = ckpt_mod.torch.save
    count = []

    def crashing_save(obj, path):
        count.append(1)
        if len(count) == 2:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(CheckpointError, match="step_00000002: OSError: disk full; its temporary folder was removed"):
        train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000001"
    assert not (checkpoints / "step_00000002").exists()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert train(cfg, resume=True).step == 2  # resumes from the intact checkpoint


def test_va_near_zero_warns_loudly(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.max_steps=1", "log.va_warn_threshold=1e9"))
    assert "visual advantage is ~0 on every token" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    plain = train(tiny_config(tmp_path, "train.max_steps=1", name="plain"))
    ckpt = train(tiny_config(tmp_path, "train.max_steps=1", "model.gradient_checkpointing=true", name="gc"))
    assert plain.history[0]["grad_norm"] == pytest.approx(ckpt.history[0]["grad_norm"], rel=1e-5)
    assert max_diff(state(plain.student), state(ckpt.student)) < 1e-6


def test_a_rollout_backend_plugs_in_and_only_valid_tokens_count(tmp_path):
    cfg = tiny_config(tmp_path)
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    eos, pad = setup.eos_ids[0], setup.tokenizer.pad_token_id

    class Fixed:  # every response: two tokens, EOS, then padding (which must not count)
        def generate(self, prompts, k):
            tokens = torch.tensor([[40, 41, eos, pad, pad]]).repeat(len(prompts) * k, 1)
            return tokens, response_mask(tokens, setup.eos_ids)

    setup.rollout = Fixed()
    optimizer, scheduler = optim_mod.build_optimizer(cfg, setup.student, 2)
    record = step_mod.train_step(cfg, setup, optimizer, scheduler, 0)
    assert record["response_len"] == 3 and record["truncated"] == 0 and not record["skipped"]
