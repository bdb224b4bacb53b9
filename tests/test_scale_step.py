"""bench/scale_step.py: the embedded architectures are the published ones, the tokenizer has Qwen's
layout, and a minimal preset runs one real trainer step with the drawn response lengths."""
import json

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

from scale_models import QWEN_TOKENS, build_tokenizer, model_config
from scale_step import PHASES, main


def test_paper_architectures_have_the_published_parameter_counts():
    # The totals Hugging Face reports for Qwen/Qwen3-VL-2B-Instruct and Qwen/Qwen3-VL-8B-Instruct.
    for arch, params, tied in (("qwen3-vl-2b", 2_127_532_032, True), ("qwen3-vl-8b", 8_767_123_696, False)):
        with torch.device("meta"):
            model = Qwen3VLForConditionalGeneration._from_config(model_config(arch))
        assert sum(p.numel() for p in model.parameters()) == params
        assert model.get_output_embeddings().weight.shape[0] == 151_936
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_tokenizer_has_qwens_layout():
    tok = build_tokenizer()
    assert len(tok) == 151_669
    assert [tok.convert_tokens_to_ids(name) for name, _ in QWEN_TOKENS] == list(range(151_643, 151_669))
    assert (tok.eos_token_id, tok.pad_token_id) == (151_645, 151_643)
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>" in text and text.endswith("assistant\n")


@pytest.mark.slow
def test_one_step_of_the_smoke_preset(tmp_path):
    assert main(["--preset", "smoke", "--steps", "1", "--warmup", "0", "--buckets", "on", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "smoke.json").read_text())
    [row] = info["rows"]
    assert "error" not in row and not row["skipped"]
    assert all(row[f"time_{k}"] > 0 for k in PHASES)
    assert row["response_len"] == row["drawn_mean"]  # every response ended at its drawn length (or the cap)
    assert row["rollout_padding"] >= 1 and row["scoring_padding"] >= 1
    assert (tmp_path / "smoke.md").read_text().count("| measured |") == 1
    assert row["decode_ms"] > 0 and info["engine"] == "hf"
    assert info["sampling"] == "inference copy (float32)"  # as the trainer: not the master weights (fp32 on a CPU)
    assert info["packed_attention"] == "teacher sdpa with a dense block mask, student sdpa with a dense block mask"


def test_compiled_engine_step_samples_the_drawn_lengths(tmp_path):
    # The static-cache compiled decode under a real trainer step: the responses end where the
    # length model says, and the second step reuses the first step's graph.
    assert main(["--preset", "smoke", "--steps", "1", "--warmup", "1", "--warmup-tokens", "8", "--buckets", "on",
                 "--compile", "on", "--out", str(tmp_path)]) == 0
    warm, row = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert "error" not in row and row["response_len"] == row["drawn_mean"]
    assert warm["graphs_compiled"] >= 1 and row["graphs_compiled"] == 0 and row["cache_len"] == warm["cache_len"]


def test_simulate_only_prints_the_expected_padding_without_models(tmp_path, capsys):
    assert main(["--preset", "smoke", "--simulate-only", "--out", str(tmp_path)]) == 0
    pad = json.loads((tmp_path / "smoke_padding.json").read_text())
    assert pad["packed"] == 1.0  # packed passes compute the needed positions only
    assert pad["before"] >= pad["trim"] >= 1.0 and pad["after"] >= 1.0
    assert pad["prompt_tokens"][0] <= pad["prompt_tokens"][1] <= pad["prompt_tokens"][2]
    assert "packed 1.00." in capsys.readouterr().out
