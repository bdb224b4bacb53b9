"""The trainer with packed scoring and the compiled HF engine: the same step as the padded path,
the config fields, the decode figures in each step's record, and ``--dry-run``'s plan."""
import pytest
import torch
import yaml

import vaopd.build as build_mod
import vaopd.optim as optim_mod
import vaopd.step as step_mod
from tests.trainer_utils import tiny_config
from vaopd.config import ConfigError, load_config, resume_changes, to_dict
from vaopd.packing import FLEX, PackedAttention, PackedScorer
from vaopd.plan import build_plan
from vaopd.rollout import response_mask
from vaopd.scoring import Scorer


def _step(tmp_path, packed: bool):
    """One step of 2 prompts x 3 responses of designed lengths (6, 2, 5 / 1, 6, 3 tokens, EOS
    inside or truncated) with packed or padded scoring; returns the record and the gradients the
    step clipped (before the optimizer moved anything)."""
    cfg = tiny_config(tmp_path, "rollout.samples_per_prompt=3", f"train.packed_scoring={str(packed).lower()}",
                      name=f"packed_{packed}")
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    assert isinstance(setup.scorer, PackedScorer) == packed and isinstance(setup.scorer, Scorer)
    eos, pad = setup.eos_ids[0], setup.tokenizer.pad_token_id
    lengths = [6, 2, 5, 1, 6, 3]

    class Designed:
        def generate(self, prompts, k):
            g = torch.Generator().manual_seed(0)
            rows = []
            for i in range(len(prompts) * k):
                body = torch.randint(20, 200, (lengths[i],), generator=g).tolist()
                if i != 0:  # row 0 runs to the cap without an EOS
                    body[-1] = eos
                rows.append(body + [pad] * (6 - lengths[i]))
            tokens = torch.tensor(rows)
            return tokens, response_mask(tokens, setup.eos_ids)

    setup.rollout = Designed()
    grads = {}
    clip = setup.strategy.clip_grad_norm

    def recording(params, max_norm):
        grads.update({n: p.grad.clone() for n, p in setup.student.named_parameters() if p.grad is not None})
        return clip(params, max_norm)

    setup.strategy.clip_grad_norm = recording
    optimizer, scheduler = optim_mod.build_optimizer(cfg, setup.student, 1)
    record = step_mod.train_step(cfg, setup, optimizer, scheduler, 0)
    return record, grads


def test_packed_scoring_step_equals_the_padded_step(tmp_path):
    padded, padded_grads = _step(tmp_path, packed=False)
    packed, packed_grads = _step(tmp_path, packed=True)
    assert not padded["skipped"] and not packed["skipped"]
    assert packed["response_len"] == padded["response_len"] == 23 / 6
    for key in ("loss", "kl", "va", "grad_norm"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 10
    for name, g in padded_grads.items():
        scale = float(g.abs().max()) or 1.0
        assert float((packed_grads[name] - g).abs().max()) <= 1e-4 * scale, name
    assert any(float(g.abs().max()) > 0 for n, g in padded_grads.items() if "visual" in n)  # through the image too
    # Packed passes compute only the needed positions; padded ones pad responses to 6 tokens.
    assert packed["scoring_padding"] == 1.0 and padded["scoring_padding"] > 1.05
    assert packed["decode_ms"] is None and packed["graphs_compiled"] is None  # this engine measures nothing


def test_flex_packed_attention_switches_the_trained_models_not_the_replica(tmp_path, monkeypatch):
    # FlexAttention runs on CUDA only (its CPU kernels have no backward), so here the choice is
    # forced: build_setup switches the teacher's and the student's text models, and the rollout
    # replica, copied before, keeps SDPA for generating with a KV cache.
    monkeypatch.setattr(build_mod, "packed_attention", lambda cfg, device: PackedAttention("flex", "flex"))
    setup = build_mod.build_setup(tiny_config(tmp_path, "train.packed_scoring=true"), torch.device("cpu"))
    for model in (setup.teacher, setup.student):
        assert model.config.text_config._attn_implementation == FLEX
        assert model.config.vision_config._attn_implementation == "sdpa"
    assert setup.strategy.sampling_model().config.text_config._attn_implementation == "sdpa"
    # Without packed scoring nothing is switched, whatever the choice would be.
    setup = build_mod.build_setup(tiny_config(tmp_path, name="padded"), torch.device("cpu"))
    assert setup.teacher.config.text_config._attn_implementation == "sdpa"


def test_flex_on_a_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.packed_attention: flex needs CUDA"):
        build_mod.build_setup(tiny_config(tmp_path, "train.packed_scoring=true", "train.packed_attention=flex"),
                              torch.device("cpu"))


def test_decode_figures_in_each_step_record(tmp_path):
    cfg = tiny_config(tmp_path, "rollout.hf.compile=off", name="eager")
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    assert setup.rollout.static is None
    optimizer, scheduler = optim_mod.build_optimizer(cfg, setup.student, 2)
    record = step_mod.train_step(cfg, setup, optimizer, scheduler, 0)
    assert record["decode_ms"] == setup.rollout.stats["decode_ms"] and record["decode_ms"] > 0
    assert record["graphs_compiled"] is None  # no compiled decode


def test_compiled_engine_reserves_one_cache_and_logs_its_graphs(tmp_path):
    cfg = tiny_config(tmp_path, "rollout.hf.compile=on", "rollout.hf.cache_multiple=64", name="compiled")
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    bound = build_mod.longest_prompt_bound(cfg, setup.train_data, setup.tokenizer, setup.image_processor)
    reserved = setup.rollout.static.cache_len
    assert reserved == -(-(bound + cfg.rollout.max_new_tokens) // 64) * 64  # reserved at build
    optimizer, scheduler = optim_mod.build_optimizer(cfg, setup.student, 2)
    first = step_mod.train_step(cfg, setup, optimizer, scheduler, 0)
    second = step_mod.train_step(cfg, setup, optimizer, scheduler, 1)
    assert first["graphs_compiled"] >= 1 and second["graphs_compiled"] == 0  # the second step reuses the graph
    assert first["decode_ms"] > 0 and second["decode_ms"] > 0 and not second["skipped"]
    assert setup.rollout.static.cache_len == reserved  # no prompt outgrew the bound


def test_prompt_bound_covers_every_encoded_prompt(tmp_path):
    from vaopd.rollout import encode_prompts

    cfg = tiny_config(tmp_path, "data.tiny_train_size=16")
    setup = build_mod.build_setup(cfg, torch.device("cpu"))
    records = setup.train_data.records
    encoded = encode_prompts([r.question + cfg.data.instruction for r in records], [r.image for r in records],
                             setup.tokenizer, setup.image_processor)
    longest = int(encoded.attention_mask.sum(1).max())
    bound = build_mod.longest_prompt_bound(cfg, setup.train_data, setup.tokenizer, setup.image_processor)
    image_cap = cfg.data.max_pixels // (setup.image_processor.patch_size * setup.image_processor.merge_size) ** 2
    assert longest <= bound <= longest + image_cap


def test_engine_and_scoring_fields(tmp_path):
    cfg = load_config(None, [])
    assert (cfg.rollout.hf.compile, cfg.rollout.hf.cache_multiple, cfg.train.packed_scoring) == ("auto", 256, False)
    assert cfg.train.packed_attention == "auto"
    with pytest.raises(ConfigError, match=r"^train\.packed_attention: must be one of"):
        load_config(None, ["train.packed_attention=dense"])
    with pytest.raises(ConfigError, match=r"^rollout\.hf\.compile: must be one of"):
        load_config(None, ["rollout.hf.compile=fast"])
    with pytest.raises(ConfigError, match=r"^rollout\.hf\.cache_multiple: must be > 0"):
        load_config(None, ["rollout.hf.cache_multiple=0"])
    with pytest.raises(ConfigError, match=r"^train\.packed_scoring"):
        load_config(None, ["train.packed_scoring=2"])
    # YAML 1.1 reads a bare on / off as a bool: both spellings mean the same.
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  hf:\n    compile: on\n")
    assert load_config(path, []).rollout.hf.compile == "on"
    path.write_text("rollout:\n  hf:\n    compile: off\n")
    assert load_config(path, []).rollout.hf.compile == "off"
    # None of them changes the optimisation: --resume may change them.
    saved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    changed = load_config(None, ["rollout.hf.compile=on", "rollout.hf.cache_multiple=128", "train.packed_scoring=true",
                                 "train.packed_attention=flex"])
    refused, allowed = resume_changes(saved, changed)
    assert refused == [] and len(allowed) == 4


def test_dry_run_names_the_decode_and_scoring_modes(tmp_path):
    plan = build_plan(tiny_config(tmp_path))
    assert "decode: eager, dynamic KV cache (rollout.hf.compile: auto)" in plan  # auto is off on a CPU
    assert "scoring: padded (train.packed_scoring)" in plan  # off by default
    plan = build_plan(tiny_config(tmp_path, "rollout.hf.compile=on", "rollout.hf.cache_multiple=64",
                                  "train.packed_scoring=true"))
    assert "decode: compiled, static KV cache of " in plan and "(rollout.hf.compile: on)" in plan
    assert ("scoring: packed (valid positions only; attention: teacher sdpa with a dense block mask, student sdpa with a "
            "dense block mask) (train.packed_scoring, train.packed_attention)") in plan  # auto on a CPU
    with pytest.raises(ConfigError, match=r"^train\.packed_attention: flex needs CUDA"):
        build_plan(tiny_config(tmp_path, "train.packed_scoring=true", "train.packed_attention=flex"))
