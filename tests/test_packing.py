"""Packed scoring equals the padded path: per-token hidden states (student, teacher clean and
ablated) and the fused loss's gradient w.r.t. the student's parameters (fp32, tiny models, prompts
with images of different sizes, responses of different lengths)."""
import pytest
import torch

from vaopd.data import tiny_records
from vaopd.kernels import va_opd_loss
from vaopd.packing import FLEX, choose_packed_attention, pack, packed_hidden, packed_teacher_hidden, use_flex_attention
from vaopd.rollout import encode_prompts, response_mask
from vaopd.scoring import scoring_inputs, scoring_padding, teacher_hidden
from vaopd.tiny import build_image_processor, build_model, build_tokenizer

SIZES = ((64, 48), (96, 80), (40, 64))
K = 2


def batch(seed=0):
    tok = build_tokenizer()
    ip = build_image_processor(32 * 32, 96 * 96)
    records = tiny_records(len(SIZES), seed=seed)
    prompts = encode_prompts([r.question * (i + 1) for i, r in enumerate(records)],  # prompt lengths differ too
                             [r.image.resize(s) for r, s in zip(records, SIZES)], tok, ip).repeat(K)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 300, (len(prompts), 9), generator=g)
    eos = tok.eos_token_id
    for row, end in enumerate([9, 4, 1, 6, 2, 9]):  # valid lengths: full, EOS at 4, EOS first, ...
        if end < 9 or row == 5:
            tokens[row, end - 1] = eos
            tokens[row, end:] = tok.pad_token_id
    ablated = prompts.pixel_values.flip(0)  # another image of the same grids
    return tok, ip, prompts, tokens, response_mask(tokens, [eos]), ablated


def test_packed_positions_and_padding_count():
    tok, _, prompts, tokens, mask, _ = batch()
    student = build_model("student", tok, seed=0)
    p = pack(prompts, tokens, mask, student.model.get_rope_index)
    n, lp = mask.sum(1), prompts.attention_mask.sum(1)
    assert p.total == int((lp + n - 1).sum())
    # Text positions restart at 0 for each row, and count up through its prompt and response inputs.
    text = p.inputs["position_ids"][0, 0]
    starts = (text == 0).nonzero().flatten().tolist()
    assert starts == (torch.cumsum(lp + n - 1, 0) - (lp + n - 1)).tolist()
    computed, needed = scoring_padding(prompts, mask, packed=False)
    assert needed == p.total and scoring_padding(prompts, mask, packed=True) == (needed, needed)
    assert computed == len(prompts) * (int(lp.max()) + int(n.max()) - 1) and computed > needed


def test_packed_hidden_states_equal_the_padded_path_student_and_teacher_views():
    tok, _, prompts, tokens, mask, ablated = batch()
    student = build_model("student", tok, seed=0).eval()
    teacher = build_model("teacher", tok, seed=1).eval()
    lp = prompts.input_ids.shape[1]
    p = pack(prompts, tokens, mask, student.model.get_rope_index)
    with torch.no_grad():
        padded = student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:]
        packed = packed_hidden(student.model, p)
    assert packed.shape == padded.shape
    assert torch.allclose(packed[mask], padded[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed[~mask], torch.zeros_like(packed[~mask]))
    t_clean, t_abl = teacher_hidden(teacher, prompts, ablated, tokens, mask)
    p_clean, p_abl = packed_teacher_hidden(teacher, p, ablated)
    assert torch.allclose(p_clean[mask], t_clean[mask], atol=1e-5, rtol=1e-5)
    assert torch.allclose(p_abl[mask], t_abl[mask], atol=1e-5, rtol=1e-5)
    assert (p_clean[mask] - p_abl[mask]).abs().max() > 1e-3  # the views differ: the ablated row got its own pixels


def test_fused_loss_gradient_of_packed_scoring_equals_the_padded_path():
    tok, _, prompts, tokens, mask, ablated = batch(seed=1)
    teacher = build_model("teacher", tok, seed=1).eval()
    lp = prompts.input_ids.shape[1]
    groups = torch.arange(len(prompts)) // K
    vocab = len(tok)

    def grads(packed: bool):
        student = build_model("student", tok, seed=0)
        student.train()
        if packed:
            p = pack(prompts, tokens, mask, student.model.get_rope_index)
            hidden = packed_hidden(student.model, p)
            t_clean, t_abl = packed_teacher_hidden(teacher, p, ablated)
        else:
            hidden = student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:]
            t_clean, t_abl = teacher_hidden(teacher, prompts, ablated, tokens, mask)
        loss, _ = va_opd_loss(hidden, student.lm_head.weight, t_clean, t_abl, teacher.lm_head.weight, tokens, mask, groups,
                              vocab_size=vocab, num_prompts=len(SIZES), backend="torch")
        loss.backward()
        return float(loss.detach()), {k: v.grad.clone() for k, v in student.named_parameters() if v.grad is not None}

    loss_padded, padded = grads(False)
    loss_packed, packed = grads(True)
    assert abs(loss_packed - loss_padded) <= 1e-5 * abs(loss_padded)
    assert padded.keys() == packed.keys() and len(padded) > 10
    for name in padded:
        scale = padded[name].abs().max().clamp(min=1e-6)
        assert (packed[name] - padded[name]).abs().max() <= 1e-4 * scale, name
    assert any(float(g.abs().max()) > 0 for n, g in padded.items() if "visual" in n)  # the image path is covered


def test_flex_attention_packed_scoring_equals_padded_sdpa():
    tok, _, prompts, tokens, mask, _ = batch()
    student = build_model("student", tok, seed=0).eval()
    lp = prompts.input_ids.shape[1]
    with torch.no_grad():
        padded = student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:]
    use_flex_attention(student)
    assert student.config.text_config._attn_implementation == FLEX
    assert student.config.vision_config._attn_implementation == "sdpa"
    p = pack(prompts, tokens, mask, student.model.get_rope_index)
    with torch.no_grad():
        packed = packed_hidden(student.model, p)
    assert torch.allclose(packed[mask], padded[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting, attention, device, samples, expected", [
    ("auto", "sdpa", "cuda", False, ("flex", "flex", "")),
    ("auto", "flash_attention_2", "cuda", False, ("model", "model", "")),  # varlen already bounds it
    ("auto", "sdpa", "cpu", False, ("model", "model", "")),  # the dense mask is small at a CPU's sizes
    ("flex", "flash_attention_2", "cuda", False, ("flex", "flex", "")),
    ("auto", "sdpa", "cuda", True, ("flex", "model", "the student also samples the rollouts with a KV cache")),
    ("model", "sdpa", "cuda", False, ("model", "model", "")),
    ("model", "sdpa", "cpu", False, ("model", "model", "")),
])
def test_packed_attention_choice(setting, attention, device, samples, expected):
    chosen = choose_packed_attention(setting, attention, torch.device(device), student_samples=samples)
    assert (chosen.teacher, chosen.student, chosen.why) == expected
    with pytest.raises(ValueError, match="not one of auto, flex, model"):
        choose_packed_attention("dense", attention, torch.device(device), student_samples=samples)


def test_flex_is_refused_off_cuda():
    with pytest.raises(ValueError, match=r"flex needs CUDA \(this run is on cpu\): on a CPU FlexAttention has no backward"):
        choose_packed_attention("flex", "sdpa", torch.device("cpu"), student_samples=False)
