"""Config: YAML, dotted overrides, errors that name the key, shipped configs, --dry-run."""
from pathlib import Path

import pytest

from vaopd.config import ConfigError, load_config
from vaopd.train import main

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\nrollout:\n  samples_per_prompt: 8\n")
    cfg = load_config(path, ["optim.lr=1e-5", "loss.method=opd", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.rollout.samples_per_prompt == 8
    assert cfg.loss.method == "opd"
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.train.max_bad_steps == 3  # untouched default


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nosection.x=1", "nosection"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("rollout.samples_per_prompt=2.5", "rollout.samples_per_prompt"),
    ("loss.method=dpo", "loss.method"),
    ("loss.ablation=sepia", "loss.ablation"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("train.micro_batch_prompts=3", "train.micro_batch_prompts"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("log.tensorboard=maybe", "log.tensorboard"),
    ("optim=3", "optim"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  prompts_per_stp: 4\n")
    with pytest.raises(ConfigError, match=r"^train\.prompts_per_stp: unknown config key"):
        load_config(path)


def test_shipped_configs_load():
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert tiny.model.student == "tiny:student" and tiny.data.train == "tiny"
    paper = load_config(ROOT / "configs" / "qwen3vl_2b_from_8b.yaml")
    assert paper.model.student == "Qwen/Qwen3-VL-2B-Instruct" and paper.model.teacher == "Qwen/Qwen3-VL-8B-Instruct"
    assert (paper.train.prompts_per_step, paper.rollout.samples_per_prompt) == (16, 4)
    assert paper.optim.lr == 1e-6 and paper.optim.betas == [0.9, 0.95] and paper.optim.weight_decay == 0.1
    assert paper.optim.warmup_ratio == 0.05 and paper.optim.grad_clip == 1.0 and paper.train.precision == "bf16"
    assert (paper.rollout.temperature, paper.rollout.top_p, paper.rollout.max_new_tokens) == (0.7, 0.95, 4096)
    assert (paper.eval.samples, paper.eval.temperature) == (8, 1.0) and paper.train.epochs == 5
    assert not paper.model.freeze_vision


def test_dry_run_prints_config_and_plan(tmp_path, capsys):
    assert main(["--dry-run", "--set", f"train.run_dir={tmp_path / 'r'}", "--method", "opd"]) == 0
    out = capsys.readouterr().out
    assert "method: opd" in out  # the resolved YAML
    for text in ("student: tiny:student", "teacher: tiny:teacher", "params", "trainable", "train records", "steps: 300",
                 "memory estimate", "vocabulary: 384 tokens"):
        assert text in out, text
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_cli_reports_config_errors(capsys):
    assert main(["--set", "optim.lr=0", "--dry-run"]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err


def test_dry_run_with_model_folders_and_lora(tmp_path, capsys):
    from vaopd.tiny import build_image_processor, build_model, build_tokenizer

    folder = tmp_path / "teacher"
    build_model("teacher", build_tokenizer(), seed=1).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    assert main(["--dry-run", "--set", f"model.teacher={folder}", "--set", "model.lora.enabled=true",
                 "--set", "model.lora.r=2"]) == 0
    out = capsys.readouterr().out
    assert f"teacher: {folder} (Qwen3VLForConditionalGeneration): 595,920 params" in out
    assert "(LoRA r=2)" in out and "241,088 trainable" not in out


def test_unloadable_model_names_the_key(tmp_path, capsys):
    assert main(["--dry-run", "--set", f"model.teacher={tmp_path / 'no_such_model'}"]) == 2
    assert capsys.readouterr().err.startswith("error: model.teacher: cannot load")
    assert main(["--set", f"model.student={tmp_path / 'no_such_model'}", "--set", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert capsys.readouterr().err.startswith("error: model.student: cannot load")
