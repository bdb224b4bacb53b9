"""Smoke run of the toy comparison pipeline (tiny sizes, one seed, two steps), the regimes, and the SFT loss."""
import json
from dataclasses import replace

import pytest
import torch
import yaml

from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.config import load_config
from vaopd.toy.compare import CONFIGS, Settings, run, settings_for, sweep
from vaopd.toy.readings import OBJECTIVES
from vaopd.toy.sft import load_split, train_sft
from vaopd.toy.task import write_splits


@pytest.mark.slow
def test_sft_fits_a_small_batch(tmp_path):
    files = write_splits(tmp_path, seed=0, sizes={"train": 8})
    records, rows = load_split(files["train"])
    tokenizer, image_processor = build_tokenizer(), build_image_processor(64 * 64, 64 * 64)
    model = build_model("student", tokenizer, seed=0)
    losses = train_sft(model, tokenizer, image_processor, records, {k: r["response"] for k, r in rows.items()},
                       steps=30, batch_size=8, lr=1e-2, seed=0, instruction="", log_every=0)
    assert losses[-1] < 0.5 * losses[0], losses


def test_regimes():
    assert settings_for("original") == Settings()
    paper = settings_for("paper")
    assert paper.template == "scaffold" and len(paper.seeds) >= 5 and paper.student_steps > Settings().student_steps
    original, paper_cfg = load_config(CONFIGS / "toy.yaml"), load_config(CONFIGS / paper.config)
    assert (paper_cfg.rollout.temperature, paper_cfg.rollout.top_p) == (0.7, 0.95)
    assert paper_cfg.optim.lr <= original.optim.lr / 10
    quick = settings_for("paper", quick=True)
    assert quick.template == "scaffold" and quick.seeds == [0] and quick.distill_steps == 2


@pytest.mark.slow
def test_comparison_pipeline_smoke(tmp_path):
    """The paper regime's path (the original regime runs the same code with other settings)."""
    torch.manual_seed(0)
    quick = replace(settings_for("paper", quick=True), methods=list(OBJECTIVES))
    results = run(tmp_path, quick)
    runs = {(r["method"], r["seed"]) for r in results["runs"]}
    assert runs == {(m, 0) for m in OBJECTIVES}
    for r in results["runs"]:
        # Where each objective puts its weight on the final student's rollouts; the run's own.
        weights = r["weights"]
        assert json.dumps(weights["own"]) == json.dumps(weights[r["method"]]) and weights["counts"]["tokens"] > 0
        for label in OBJECTIVES:
            assert 0 <= weights[label]["wrong"] and 0 <= weights[label]["right"] and weights[label]["wrong"] + weights[label]["right"] <= 1 + 1e-6
        assert set(r["accuracy"]) == {"detail", "coarse"}
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
        assert r["profile"]["detail"]["tokens"] > 0
        readings = r["readings"]["all"]
        assert readings["positions"] > 0 and readings["draws_correct"] + readings["draws_wrong"] == 2 * readings["positions"]
    # The runs start from the same student and differ only in the loss's method and VA estimator.
    names = {"opd": "opd", "va_opd": "va_opd", "va_opd:two_sided": "va_opd_two_sided", "va_opd:distribution": "va_opd_distribution"}
    configs = {m: yaml.safe_load((tmp_path / "runs" / f"{names[m]}_s0" / "config.yaml").read_text()) for m in OBJECTIVES}
    assert [(c["loss"]["method"], c["loss"]["va"]) for c in configs.values()] == [
        ("opd", "sampled"), ("va_opd", "sampled"), ("va_opd", "two_sided"), ("va_opd", "distribution")]
    assert configs["opd"]["model"]["student"] == str(tmp_path / "student")
    for c in configs.values():
        c["loss"].pop("method"), c["loss"].pop("va"), c["train"].pop("run_dir")
    assert all(c == configs["opd"] for c in configs.values())
    assert (configs["opd"]["rollout"]["temperature"], configs["opd"]["rollout"]["top_p"]) == (0.7, 0.95)
    # Scaffolded answers: the short template's are under 60 characters, the scaffold's over 80.
    responses = [json.loads(line)["response"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert min(len(r) for r in responses) > 70
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["va_opd"]["accuracy.detail"]["n"] == 1
    assert set(saved["difference"]) == {"va_opd", "va_opd:two_sided", "va_opd:distribution"}
    assert saved["difference"]["va_opd:distribution"]["readings.all.kl"]["n"] == 1
    assert saved["difference"]["va_opd:two_sided"]["weights.own.wrong"]["mean"] == pytest.approx(
        saved["runs"][2]["weights"]["own"]["wrong"] - saved["runs"][0]["weights"]["own"]["wrong"])
    table = (tmp_path / "results.md").read_text()
    assert "va_opd after (1 seeds)" in table and "teacher (SFT, own rollouts)" in table
    assert "va_opd - opd (paired by seed, n=1" in table and "KL at wrong readings" in table
    assert "va_opd:distribution - opd (paired by seed, n=1" in table and "own weight on wrong readings" in table
    page = (tmp_path / "inspect" / "index.html").read_text()
    assert "va_opd_s0 (va_opd)" in page and "opd_s0 (opd)" in page and 'class="tok high"' in page
    assert "va_opd_distribution_s0 (va_opd:distribution)" in page
    # A rerun reuses the finished runs' measurements (result.json): nothing is trained again.
    again = run(tmp_path, quick)
    assert again["runs"] == saved["runs"]
    assert (tmp_path / "inspect" / "curves.png").is_file()
    # The learning-rate sweep: OPD alone per learning rate, reusing the data, models and starting point.
    swept = sweep(tmp_path, Settings(**{**saved["settings"], "sweep_lrs": [1e-4, 5e-5]}))
    assert [r["lr"] for r in swept["rows"]] == [1e-4, 5e-5] and swept["chosen_lr"] in (1e-4, 5e-5)
    assert {r["method"] for r in swept["runs"]} == {"opd"} and (tmp_path / "sweep" / "opd_lr0.0001_s0").is_dir()
    assert "chosen lr" in (tmp_path / "sweep.md").read_text()
    # A rerun into the folder with another student SFT is refused, and the student stays as it was.
    student = (tmp_path / "student" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="SFT'd with other settings or data \\(steps\\)"):
        run(tmp_path, replace(settings_for("paper", quick=True), student_steps=settings_for("paper", quick=True).student_steps + 1))
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == student
