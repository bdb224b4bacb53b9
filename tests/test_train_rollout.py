"""Prompts, rollouts, masks and banned ids, and teacher-forced scoring alignment."""
import torch

from vaopd.data import tiny_records
from vaopd.rollout import HFGenerate, banned_token_ids, encode_prompts, response_mask
from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.scoring import response_hidden

EOS = 7


def test_response_mask_first_eos_included_rest_excluded_truncation_kept():
    tokens = torch.tensor([
        [5, 6, EOS, 0, 0],      # EOS then padding
        [5, EOS, 9, EOS, 0],    # a second EOS is after the first: excluded
        [5, 6, 8, 9, 4],        # truncated: all kept
        [EOS, 0, 0, 0, 0],      # EOS right away: one valid token
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(response_mask(tokens, [EOS]), expected)
    assert torch.equal(response_mask(torch.tensor([[5, 3, 6]]), [3, 6]), torch.tensor([[True, True, False]]))


def setup():
    tok = build_tokenizer()
    return tok, build_image_processor(), build_model("student", tok, seed=0)


def test_banned_ids_cover_head_padding_vision_tokens_and_pad():
    tok, _, model = setup()
    rows = model.lm_head.weight.shape[0]
    banned = set(banned_token_ids(tok, rows, [tok.eos_token_id]))
    assert set(range(len(tok), rows)) <= banned
    for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(t) in banned, t
    assert tok.eos_token_id not in banned and tok.convert_tokens_to_ids("<|im_start|>") not in banned


def test_generation_never_samples_banned_ids_even_when_they_dominate():
    tok, ip, model = setup()
    rows = model.lm_head.weight.shape[0]
    eos = [tok.eos_token_id]
    banned = banned_token_ids(tok, rows, eos)
    with torch.no_grad():  # make every banned id (and nothing else) overwhelmingly likely
        model.lm_head.weight[banned] = model.lm_head.weight[banned] * 0 + 5.0
    records = tiny_records(3, seed=0)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip)
    gen = HFGenerate(model, eos_ids=eos, pad_id=tok.pad_token_id, banned_ids=banned, temperature=1.0, top_p=1.0,
                     max_new_tokens=8, batch_prompts=2)
    tokens, mask = gen.generate(prompts, 3)
    assert tokens.shape[0] == 9 and mask.dtype == torch.bool
    assert not torch.isin(tokens[mask], torch.tensor(banned)).any()
    assert torch.equal(mask, response_mask(tokens, eos))


def test_prompts_expand_image_tokens_and_left_pad():
    tok, ip, _ = setup()
    records = tiny_records(2, seed=0)
    prompts = encode_prompts(["short?", "a much longer question about squares?"], [r.image for r in records], tok, ip)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    per_image = prompts.image_grid_thw.prod(1) // 4
    assert torch.equal((prompts.input_ids == image_pad).sum(1), per_image)
    assert torch.equal(prompts.mm_token_type_ids.sum(1), per_image)
    assert prompts.attention_mask[0, 0] == 0 and prompts.attention_mask[:, -1].all()  # left padding
    rep = prompts.repeat(3)
    assert torch.equal(rep.input_ids[3:6], prompts.input_ids[1:2].expand(3, -1))
    assert rep.pixel_values.shape[0] == 3 * prompts.pixel_values.shape[0]
    assert torch.equal(rep.pixel_values[-per_image[1] * 4:], prompts.pixel_values[-per_image[1] * 4:])


def test_teacher_forced_scoring_matches_generation_log_probs():
    tok, ip, model = setup()
    eos = [tok.eos_token_id]
    banned = banned_token_ids(tok, model.lm_head.weight.shape[0], eos)
    records = tiny_records(2, seed=1)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip).repeat(2)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask,
                             mm_token_type_ids=prompts.mm_token_type_ids, pixel_values=prompts.pixel_values,
                             image_grid_thw=prompts.image_grid_thw, do_sample=True, top_k=0, max_new_tokens=6,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id, suppress_tokens=banned,
                             output_scores=True, return_dict_in_generate=True)
        lp = prompts.input_ids.shape[1]
        tokens = out.sequences[:, lp:]
        mask = response_mask(tokens, eos)
        gen_logp = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, tokens[..., None])[..., 0]
        hidden = response_hidden(model, prompts, tokens, mask)
        logits = hidden @ model.lm_head.weight.T
        logits[..., banned] = -torch.inf
        score_logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(gen_logp[mask], score_logp[mask], atol=1e-4)
