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
