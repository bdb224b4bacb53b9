"""The vLLM rollout engine against transformers on the same weights (run in .venv-vllm: README).

One engine for the whole module (start-up takes seconds). Every test first loads the weights it
samples with, as the trainer does before every rollout.
"""
import copy

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vaopd.data import tiny_records  # noqa: E402
from vaopd.rollout import banned_token_ids, encode_prompts, response_mask  # noqa: E402
from vaopd.rollout.vllm import VLLMGenerate  # noqa: E402
from vaopd.tiny import build_image_processor, build_model, build_tokenizer  # noqa: E402

MAX_PIXELS = 256 * 256
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = build_tokenizer()
    ip = build_image_processor(32 * 32, MAX_PIXELS)
    model = build_model("student", tok, seed=0).eval()
    folder = tmp_path_factory.mktemp("student")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    eos = [tok.eos_token_id]
    banned = banned_token_ids(tok, model.lm_head.weight.shape[0], eos)
    engine = VLLMGenerate(
        folder, device=torch.device("cpu"), dtype=torch.float32, eos_ids=eos, pad_id=tok.pad_token_id,
        image_pad_id=tok.convert_tokens_to_ids("<|image_pad|>"), banned_ids=banned, lm_head_rows=model.lm_head.weight.shape[0],
        temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=NEW_TOKENS, gpu_memory_utilization=0.3, sleep_mode=False,
        kv_cache_gib=1, max_model_len=None, enforce_eager=True, seed=0,
        image_size={"shortest_edge": 32 * 32, "longest_edge": MAX_PIXELS})
    return tok, ip, model, engine, eos, banned


def long_prompts(tok, ip, sizes=((256, 224), (160, 192), (224, 256))):
    """Prompts longer than one 128-token KV block: large images and a long question."""
    records = tiny_records(len(sizes), seed=3)
    questions = [" ".join([r.question] * 12) for r in records]
    return encode_prompts(questions, [r.image.resize(s) for r, s in zip(records, sizes)], tok, ip)


def hf_greedy(model, prompts, eos, pad, banned):
    with torch.no_grad():
        out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                             mm_token_type_ids=prompts.mm_token_type_ids, pixel_values=prompts.pixel_values,
                             image_grid_thw=prompts.image_grid_thw, do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=eos, pad_token_id=pad, suppress_tokens=banned)
    tokens = out[:, prompts.input_ids.shape[1]:]
    return tokens, response_mask(tokens, eos)


def greedy(engine, prompts):
    engine.temperature, before = 0.0, engine.temperature
    try:
        return engine.generate(prompts, 1)
    finally:
        engine.temperature = before


def test_greedy_equals_transformers_before_and_after_weight_updates(parts):
    tok, ip, model, engine, eos, banned = parts
    model = copy.deepcopy(model)
    prompts = long_prompts(tok, ip)
    assert int(prompts.attention_mask.sum(1).min()) > 128  # the prefix cache's stale-block bug needs this
    g = torch.Generator().manual_seed(0)
    for update in range(4):
        if update:  # perturb every weight, the vision tower's too, and hand them over in memory
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std().clamp_min(1e-2))
        engine.load_weights(model.state_dict().items())
        tokens, mask = greedy(engine, prompts)
        expected, expected_mask = hf_greedy(model, prompts, eos, tok.pad_token_id, banned)
        assert torch.equal(mask, expected_mask), update
        assert torch.equal(tokens[mask], expected[expected_mask]), update
        assert (tokens[~mask] == tok.pad_token_id).all()


def test_layout_seeding_and_banned_ids(parts):
    tok, ip, model, engine, eos, banned = parts
    model = copy.deepcopy(model)
    engine.load_weights(model.state_dict().items())
    prompts = long_prompts(tok, ip)
    # Seeded from torch's generator: the same seed samples the same; siblings differ.
    torch.manual_seed(7)
    a, mask = engine.generate(prompts, 3)
    torch.manual_seed(7)
    b, _ = engine.generate(prompts, 3)
    c, _ = engine.generate(prompts, 3)
    assert a.shape[0] == 9 and a.shape[1] <= NEW_TOKENS and a.dtype == torch.int64 and mask.dtype == torch.bool
    assert torch.equal(mask, response_mask(a, eos)) and (a[~mask] == tok.pad_token_id).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) == 9
    # Prompt-major rows: one seed per prompt, drawn in prompt order, so the first two prompts
    # sampled alone with the same seed give the first 2 x 3 rows.
    torch.manual_seed(7)
    first, first_mask = engine.generate(prompts.select([0, 1]), 3)
    assert torch.equal(first_mask, mask[:6, :first.shape[1]]) and torch.equal(first[first_mask], a[:6][mask[:6]])
    # Banned ids (vision tokens, pad, LM-head padding rows) never come out, even when they dominate.
    with torch.no_grad():
        model.lm_head.weight[banned] = model.lm_head.weight[banned] * 0 + 5.0
    engine.load_weights(model.state_dict().items())
    tokens, mask = engine.generate(prompts, 3)
    assert not torch.isin(tokens[mask], torch.tensor(banned)).any()


def test_prompt_ids_are_the_trainers_or_an_error(parts):
    tok, ip, model, engine, eos, banned = parts
    engine.load_weights(model.state_dict().items())
    prompts = long_prompts(tok, ip)
    engine.generate(prompts, 1)  # checks each request's expanded ids against prompts.input_ids
    # Ids encoded with other pixel bounds than the engine's image processor use: refused, not sampled.
    other = long_prompts(tok, build_image_processor(32 * 32, 128 * 128))
    assert other.input_ids.shape[1] != prompts.input_ids.shape[1]
    with pytest.raises(RuntimeError, match="trainer's"):
        engine.generate(other, 1)
