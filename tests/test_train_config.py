"""Config: YAML, dotted overrides, errors that name the key, shipped configs, --dry-run."""
from pathlib import Path

import pytest

import yaml

from trainer_utils import OLD_UNSET, flatten, unflatten
from vaopd.config import Config, ConfigError, load_config, resume_changes, to_dict, to_yaml
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


# --- null for "not set", the older spellings, resume policy --------------------------------------

def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("key", sorted(OLD_UNSET))
def test_old_unset_spellings_read_as_null(key):
    keep = [] if key != "train.max_steps" else ["train.epochs=1"]
    keep = keep if key != "train.epochs" else ["train.max_steps=5"]
    old = OLD_UNSET[key]
    assert _get(load_config(None, [f"{key}={old}", *keep]), key) is None
    assert _get(load_config(None, [f"{key}=null", *keep]), key) is None


def test_every_null_field_has_an_old_spelling():
    """A field that can be null and lost its older spelling would break configs written before."""
    everything_null = [f"{k}=null" for k in OLD_UNSET if k != "train.epochs"]
    nulls = {k for k, v in flatten(to_dict(load_config(None, everything_null))).items() if v is None}
    assert nulls == set(OLD_UNSET) - {"train.epochs"}
    assert load_config(None, ["train.max_steps=3", "train.epochs=null"]).train.epochs is None


def test_zero_is_not_null_where_it_is_a_value_and_bools_are_not_numbers():
    cfg = load_config(None, ["optim.weight_decay=0", "optim.min_lr_ratio=0", "loss.blur_radius=0", "train.seed=0"])
    assert (cfg.optim.weight_decay, cfg.optim.min_lr_ratio, cfg.loss.blur_radius, cfg.train.seed) == (0, 0, 0, 0)
    with pytest.raises(ConfigError, match=r"^loss\.chunk_size: must be an integer, got False"):
        load_config(None, ["loss.chunk_size=false"])
    with pytest.raises(ConfigError, match=r"^loss\.chunk_size: must be > 0 \(or null: not set\), got -3"):
        load_config(None, ["loss.chunk_size=-3"])


def test_yaml_round_trip_writes_null(tmp_path):
    cfg = load_config(None, ["loss.chunk_size=512", "train.keep_checkpoints=-1", "data.val="])
    text = to_yaml(cfg)
    assert "keep_checkpoints: null" in text and "chunk_size: 512" in text and "val: null" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg


def test_a_config_written_before_null_loads_and_resumes_without_changes(tmp_path):
    cfg = load_config(None, [f"{k}=null" for k in OLD_UNSET if k not in ("train.epochs", "train.max_steps")])
    old = flatten(to_dict(cfg)) | {k: v for k, v in OLD_UNSET.items() if k not in ("train.epochs", "train.max_steps")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(unflatten(old)))
    assert load_config(tmp_path / "config.yaml") == cfg
    assert resume_changes(unflatten(old), cfg) == ([], [])
    # a real change still shows, in the new spelling
    refused, allowed = resume_changes(unflatten(old), load_config(None, ["loss.chunk_size=512", "eval.every=5"]))
    assert "loss.chunk_size: null -> 512" in refused and "eval.every: null -> 5" in allowed


# The fields --resume may change (they do not change the optimisation being continued).
RESUME_SAFE = {
    "data.val", "data.tiny_val_size", "model.attn_implementation", "model.gradient_checkpointing",
    "rollout.engine", "rollout.vllm.gpu_memory_utilization", "rollout.vllm.sleep_mode", "rollout.vllm.enforce_eager",
    "rollout.vllm.kv_cache_gib", "rollout.vllm.max_model_len", "rollout.hf.compile", "rollout.hf.cache_multiple",
    "train.packed_scoring", "train.packed_attention", "train.name", "train.run_dir", "train.device", "train.max_steps", "train.epochs", "train.stop_after",
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps",
}


def test_resume_policy_of_every_field():
    cfg = Config()
    flat = flatten(to_dict(cfg))
    refused, allowed = resume_changes(unflatten({k: "(before)" for k in flat}), cfg)
    safe = {line.split(":")[0] for line in allowed}
    expected = RESUME_SAFE | {k for k in flat if k.split(".")[0] in ("eval", "log", "distributed")}
    assert safe == expected
    assert {line.split(":")[0] for line in refused} == set(flat) - expected


# --- bad input: one clear line naming the key or the file (issue 20) ----------------------------

@pytest.mark.parametrize("override, message", [
    ("data.tiny_train_size=0", r"^data\.tiny_train_size: must be > 0, got 0$"),
    ("data.tiny_val_size=0", r"^data\.tiny_val_size: must be > 0, got 0$"),
    ("eval.batch_prompts=0", r"^eval\.batch_prompts: must be > 0, got 0$"),
    ("train.max_bad_steps=0", r"^train\.max_bad_steps: must be > 0, got 0$"),
    ("log.rollouts_per_log=0", r"^log\.rollouts_per_log: must be > 0, got 0$"),
    ("model.lora.target_modules=[]", r"^model\.lora\.target_modules: must have at least 1 item"),
    ("model.lora.dropout=1", r"^model\.lora\.dropout: must be in \[0, 1\), got 1$"),
    ("data.train=", r"^data\.train: must not be empty"),
    ("model.student=", r"^model\.student: must not be empty"),
    ("train.device=cudax", r"^train\.device: must be auto, cpu or cuda\[:N\]"),
    ("rollout.temperature=.inf", r"^rollout\.temperature: must be a finite number, got inf$"),
    ("optim.lr=.nan", r"^optim\.lr: must be a finite number, got nan$"),
    ("eval.temperature=-.inf", r"^eval\.temperature: must be a finite number"),
    ("optim.betas=[.nan, 0.9]", r"^optim\.betas\[0\]: must be a finite number"),
    ("distributed.timeout_s=.inf", r"^distributed\.timeout_s: must be a finite number"),
    ("loss.method=dpo", r"^loss\.method: must be one of \['va_opd', 'opd'\], got 'dpo'$"),
])
def test_degenerate_and_non_finite_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_suggests_the_close_one_and_every_problem_is_listed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.prompts_per_stp=3", "optim.lr=-1"])
    first, second = str(e.value).splitlines()  # in the order of the sections
    assert first == "optim.lr: must be > 0, got -1"
    assert second.startswith("train.prompts_per_stp: unknown config key (did you mean train.prompts_per_step?")


def test_yaml_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    with pytest.raises(ConfigError, match=r"^train\.name: the value .* is not valid YAML .*constructor for the tag"):
        load_config(None, [f"train.name={tag}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  name: {tag}\n")
    with pytest.raises(ConfigError, match=rf"^config file {path} is not valid YAML \(line 2, column 9\): .*constructor"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"optim:\n  lr: 0.5 \xff\xfe\n", r" is not UTF-8 text \(byte 17\); save it as UTF-8$"),
    (b"optim:\n  lr: [0.5\n", r" is not valid YAML \(line 3, column 1\)"),
    (b"- optim\n- train\n", r": must hold a mapping of sections .*got list$"),
])
def test_bad_config_files_are_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^config file {path}" + message):
        load_config(path)
    assert main(["--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {path}") and err.count("\n") == 1


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for run_dir in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError, match=rf"^train\.run_dir: the run folder {run_dir} cannot be created: "
                                               rf"{tmp_path / 'f'} is a file"):
            load_config(None, [f"train.run_dir={run_dir}"])
    assert main(["--set", f"train.run_dir={tmp_path / 'f'}", "--set", "train.max_steps=1"]) == 2
    assert "train.run_dir: the run folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_tiny_train_size_zero_is_a_config_error_not_a_crash(capsys):
    assert main(["--set", "data.tiny_train_size=0", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: data.tiny_train_size: must be > 0, got 0\n"
