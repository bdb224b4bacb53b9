"""The HF engine's static-cache and compiled decode paths against eager ``generate``.

Greedy decoding through the engine is sampling with ``top_k=1``. One compiled engine serves the
module (the first compile takes seconds on a CPU). Weight updates are in place, as the trainer's
optimizer and replica refresh make them: a compiled graph that kept the old weights would sample
the old tokens.
"""
import pytest
import torch

from vaopd.data import tiny_records
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts, response_mask
from vaopd.rollout.decode import StaticDecode, compile_enabled
from vaopd.tiny import build_image_processor, build_model, build_tokenizer

NEW_TOKENS = 12
SIZES = ((64, 48), (96, 80), (40, 64))  # different images: different numbers of image tokens


@pytest.fixture(scope="module")
def parts():
    tok = build_tokenizer()
    ip = build_image_processor(32 * 32, 96 * 96)
    model = build_model("student", tok, seed=0)
    eos = [tok.eos_token_id]
    banned = banned_token_ids(tok, model.lm_head.weight.shape[0], eos)
    return tok, ip, model, eos, banned


def prompts(tok, ip, sizes=SIZES, seed=0):
    records = tiny_records(len(sizes), seed=seed)
    return encode_prompts([r.question for r in records], [r.image.resize(s) for r, s in zip(records, sizes)], tok, ip)


def engine(parts, compile="off", top_k=1, temperature=1.0):
    tok, _, model, eos, banned = parts
    return HFGenerate(model, eos_ids=eos, pad_id=tok.pad_token_id, banned_ids=banned, temperature=temperature, top_p=1.0,
                      top_k=top_k, max_new_tokens=NEW_TOKENS, compile=compile, cache_multiple=64)


def eager_greedy(parts, p, k):
    tok, _, model, eos, banned = parts
    p = p.repeat(k)
    with torch.no_grad():
        out = model.eval().generate(input_ids=p.input_ids, attention_mask=p.attention_mask,
                                    mm_token_type_ids=p.mm_token_type_ids, pixel_values=p.pixel_values,
                                    image_grid_thw=p.image_grid_thw, do_sample=False, max_new_tokens=NEW_TOKENS,
                                    eos_token_id=eos, pad_token_id=tok.pad_token_id, suppress_tokens=banned)
    tokens = out[:, p.input_ids.shape[1]:]
    return tokens, response_mask(tokens, eos)


def same(a, b):
    """Equal valid tokens (padding after the first EOS may differ in width)."""
    (ta, ma), (tb, mb) = a, b
    w = max(ta.shape[1], tb.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[1]))  # noqa: E731
    return torch.equal(pad(ma), pad(mb)) and torch.equal(pad(ta) * pad(ma), pad(tb) * pad(mb))


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # in place: same storage


def test_compile_modes_resolve_per_device():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="rollout.hf.compile: 'yes'"):
        compile_enabled("yes", torch.device("cpu"))


def test_cache_length_is_fixed_per_cap_and_only_grows_by_multiples():
    d = StaticDecode(compile=False, cache_multiple=64)
    assert d.options(torch.device("cpu"), 30, 12)["max_cache_len"] == 64
    assert d.options(torch.device("cpu"), 40, 12)["max_cache_len"] == 64  # another prompt length: same cache
    assert d.options(torch.device("cpu"), 60, 12)["max_cache_len"] == 128
    assert d.options(torch.device("cpu"), 10, 12)["max_cache_len"] == 128  # never shrinks: no new graph
    assert "compile_config" not in d.options(torch.device("cpu"), 10, 12)
    c = StaticDecode(compile=True).options(torch.device("cpu"), 10, 12)["compile_config"]
    assert c._compile_all_devices and c.mode == "default" and c.dynamic is False


def test_static_cache_greedy_equals_eager_before_and_after_weight_updates(parts):
    model = parts[2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        gen = engine(parts)
        gen.static = StaticDecode(compile=False, cache_multiple=64)
        p = prompts(parts[0], parts[1])
        before = eager_greedy(parts, p, 2)
        assert same(gen.generate(p, 2), before)
        perturb(model, 1)
        after = eager_greedy(parts, p, 2)
        assert not same(after, before)  # the update changes the greedy tokens, so the check below can fail
        assert same(gen.generate(p, 2), after)
        assert gen.stats["cache_len"] == 64 and gen.stats["decode_ms"] > 0
    finally:
        model.load_state_dict(state)


def test_compiled_decode_equals_eager_follows_in_place_updates_and_reuses_its_graph(parts):
    model = parts[2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        gen = engine(parts, compile="on")
        assert gen.static is not None and gen.static.compile
        p = prompts(parts[0], parts[1])
        before = eager_greedy(parts, p, 2)
        assert same(gen.generate(p, 2), before)
        assert gen.stats["graphs_compiled"] >= 1
        perturb(model, 2)
        after = eager_greedy(parts, p, 2)
        assert not same(after, before)
        assert same(gen.generate(p, 2), after)  # a graph holding the old weights would give `before`
        assert gen.stats["graphs_compiled"] == 0  # same batch and cache: no recompile
        # Other prompts (other image sizes, another prompt length), same batch size: the same graph.
        other = prompts(parts[0], parts[1], sizes=((32, 32), (48, 40), (96, 96)), seed=5)
        assert other.input_ids.shape[1] != p.input_ids.shape[1]
        assert same(gen.generate(other, 2), eager_greedy(parts, other, 2))
        assert gen.stats["graphs_compiled"] == 0 and gen.stats["decode_steps"] >= 1
        # Seeded sampling reproduces, compiled or not (the step seeds torch before each rollout).
        sampled = engine(parts, compile="on", top_k=0, temperature=1.0)
        eager = engine(parts, compile="off", top_k=0, temperature=1.0)
        torch.manual_seed(7)
        first = sampled.generate(p, 2)
        torch.manual_seed(7)
        assert same(sampled.generate(p, 2), first)
        torch.manual_seed(7)
        assert same(eager.generate(p, 2), first)
        torch.manual_seed(8)
        assert not same(sampled.generate(p, 2), first)
    finally:
        model.load_state_dict(state)
