"""Teacher-forced measurements at the digit readings, nucleus sampling, and the paired t-interval."""
import math

import torch

from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.toy.compare import paired_differences, t_quantile
from vaopd.toy.readings import reading_probe, sample_top_p
from vaopd.toy.sft import load_split
from vaopd.toy.task import write_splits


def test_sample_top_p_keeps_the_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = sample_top_p(logp, 1.0, 0.7, 4000, g)
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two most likely tokens
    assert abs(float((draws == 0).double().mean()) - 0.5 / 0.8) < 0.03
    assert set(sample_top_p(logp, 1.0, 0.2, 50, g).flatten().tolist()) == {0}
    # A low temperature sharpens before the cut.
    assert float((sample_top_p(logp, 0.1, 1.0, 2000, g) == 0).double().mean()) > 0.95


def test_reading_probe_against_itself_and_another_model(tmp_path):
    files = write_splits(tmp_path, seed=0, sizes={"test": 12}, template="scaffold")
    records, rows = load_split(files["test"])
    tokenizer, image_processor = build_tokenizer(), build_image_processor(64 * 64, 64 * 64)
    teacher = build_model("teacher", tokenizer, seed=0)
    student = build_model("student", tokenizer, seed=0)
    n_detail = sum(r["kind"] == "detail" for r in rows.values())
    kw = dict(samples=3, temperature=0.7, top_p=0.95, seed=0)
    same = reading_probe(teacher, teacher, tokenizer, image_processor, records, rows, **kw)
    assert same["all"]["positions"] == 2 * n_detail and same["first"]["positions"] == n_detail
    assert abs(same["all"]["kl"]) < 1e-9 and same["all"]["student_va"] == same["all"]["teacher_va"]
    assert same["all"]["draws_correct"] + same["all"]["draws_wrong"] == 3 * 2 * n_detail
    other = reading_probe(student, teacher, tokenizer, image_processor, records, rows, **kw)
    assert other["all"]["kl"] > 0 and other["all"]["teacher_va"] == same["all"]["teacher_va"]
    assert 0.0 <= other["all"]["reading_accuracy"] <= 1.0
    # The KL split by the draws' correctness averages the same per-position KLs.
    a = other["all"]
    if a["draws_correct"] and a["draws_wrong"]:
        pooled = (a["kl_correct"] * a["draws_correct"] + a["kl_wrong"] * a["draws_wrong"]) / (3 * a["positions"])
        assert math.isclose(pooled, a["kl"], rel_tol=1e-9)


def test_t_quantile_and_paired_differences():
    assert abs(t_quantile(0.975, 4) - 2.7764) < 1e-3
    assert abs(t_quantile(0.975, 1) - 12.706) < 1e-2
    assert abs(t_quantile(0.975, 1000) - 1.962) < 1e-2
    runs = []
    for seed, (opd, va) in enumerate([(0.5, 0.6), (0.4, 0.45), (0.7, 0.75)]):
        for method, acc in (("opd", opd), ("va_opd", va)):
            runs.append({"method": method, "seed": seed, "accuracy": {"detail": acc}, "profile": {}, "readings": {}})
    runs.append({"method": "opd", "seed": 9, "accuracy": {"detail": 0.0}, "profile": {}, "readings": {}})  # unpaired
    d = paired_differences(runs)["accuracy.detail"]
    diffs = [0.1, 0.05, 0.05]
    half = t_quantile(0.975, 2) * (sum((x - 0.2 / 3) ** 2 for x in diffs) / 2) ** 0.5 / 3 ** 0.5
    assert d["n"] == 3 and math.isclose(d["mean"], 0.2 / 3)
    assert math.isclose(d["high"] - d["mean"], half, rel_tol=1e-6) and math.isclose(d["mean"] - d["low"], half, rel_tol=1e-6)


def test_loss_weight_probe_on_known_rollouts(tmp_path, monkeypatch):
    """Rollouts fixed to the reference answers, one digit misread in one sibling: OPD's share is
    exact (``1 / (K L)`` per token), and each VA-OPD variant's is the one its loss coefficients give."""
    from vaopd.kernels import va_opd_loss_reference
    from vaopd.rollout import HFGenerate
    from vaopd.toy.digits import reading_positions
    from vaopd.toy.readings import OBJECTIVES, loss_weight_probe, objective_spec
    from vaopd.toy.sft import response_tokens

    files = write_splits(tmp_path, seed=0, sizes={"test": 12}, template="scaffold")
    records, rows = load_split(files["test"])
    detail = [r for r in records if rows[r.id]["kind"] == "detail"][:1]
    tokenizer, image_processor = build_tokenizer(), build_image_processor(64 * 64, 64 * 64)
    teacher = build_model("teacher", tokenizer, seed=0)
    student = build_model("student", tokenizer, seed=1)
    right = rows[detail[0].id]["response"]
    tokens, mask = response_tokens(tokenizer, [right, right])
    pieces = [tokenizer.decode([t]) for t in tokens[0][mask[0]].tolist()]
    first = reading_positions(pieces)[0]
    wrong_digit = str((int(pieces[first].strip()) + 1) % 10)
    tokens[1, first] = tokenizer(" " + wrong_digit if pieces[first].startswith(" ") else wrong_digit, add_special_tokens=False)["input_ids"][0]
    assert tokenizer.decode([int(tokens[1, first])]).strip() == wrong_digit
    monkeypatch.setattr(HFGenerate, "generate", lambda self, prompts, k: (tokens, mask))
    out = loss_weight_probe(student, teacher, tokenizer, image_processor, detail, rows, samples=2, temperature=0.7,
                            top_p=0.95, max_new_tokens=64, seed=0)
    length = int(mask[0].sum())
    assert out["counts"] == {"readings": 4, "wrong_readings": 1, "tokens": 2 * length}
    assert math.isclose(out["opd"]["wrong"], 1 / (2 * length), rel_tol=1e-6)
    assert math.isclose(out["opd"]["right"], 3 / (2 * length), rel_tol=1e-6)
    assert math.isclose(out["opd"]["per_wrong_token"], 1.0, rel_tol=1e-6)
    # The VA-OPD variants: the reference loss's coefficients on the same rollouts.
    from vaopd.ablate import ablate
    from vaopd.rollout import encode_prompts, prompt_pixels
    from vaopd.scoring import scoring_inputs, teacher_hidden

    single = encode_prompts([detail[0].question], [detail[0].image], tokenizer, image_processor)
    prompts = single.repeat(2)
    abl = single.with_pixels(prompt_pixels([ablate(detail[0].image, "pixelate", pixelate_factor=0.1)], image_processor,
                                           single.image_grid_thw)).repeat(2).pixel_values
    with torch.no_grad():
        lp = prompts.input_ids.shape[1]
        s_hidden = student.model(**scoring_inputs(prompts, tokens, mask)).last_hidden_state[:, lp - 1:]
        t_clean, t_abl = teacher_hidden(teacher, prompts, abl, tokens, mask)
    shares = set()
    for label in OBJECTIVES[1:]:
        coef = va_opd_loss_reference(s_hidden, student.get_output_embeddings().weight, t_clean, t_abl,
                                     teacher.get_output_embeddings().weight, tokens, mask, torch.tensor([0, 0]),
                                     spec=objective_spec(label), vocab_size=len(tokenizer))[1]["coef"]
        assert math.isclose(out[label]["wrong"], float(coef[1, first]) / float(coef.sum()), rel_tol=1e-4), label
        shares.add(round(out[label]["wrong"], 6))
    assert len(shares) == 3  # the estimators weigh the misreading differently
