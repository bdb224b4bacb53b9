"""The paper config follows the method authors' released configuration; eval.subset, keep-all."""
import random
from pathlib import Path

import pytest

from vaopd.checkpoint import _prune
from vaopd.config import ConfigError, load_config
from vaopd.data import DataError, tiny_records
from vaopd.eval import subset_indices, validation_questions

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "qwen3vl_2b_from_8b.yaml"


def test_paper_config_matches_the_authors_recipe():
    cfg = load_config(PAPER)
    assert cfg.data.instruction == ""  # no format prompt
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (262_144, 4_194_304)
    assert (cfg.eval.subset.count, cfg.eval.subset.seed) == (200, 42)
    assert cfg.train.keep_checkpoints is None  # keep every checkpoint
    assert cfg.eval.grader == "first_boxed_mathruler"
    assert (cfg.eval.samples, cfg.eval.temperature, cfg.eval.top_p) == (8, 1.0, 1.0)
    # every validation happens at a checkpoint step, so each one can select the best checkpoint
    assert cfg.eval.every == cfg.train.checkpoint_every == 50
    assert (cfg.rollout.samples_per_prompt, cfg.rollout.temperature, cfg.rollout.top_p) == (4, 0.7, 0.95)
    assert cfg.data.val.endswith("validation.parquet")


def test_paper_config_points_to_files_that_exist():
    text = PAPER.read_text()
    assert "SPEC.md" not in text
    assert "docs/objective.md" in text and (ROOT / "docs" / "objective.md").is_file()


def test_instruction_is_a_plain_config_value():
    assert load_config(PAPER, ["data.instruction= Put the final answer in \\boxed{}."]).data.instruction.endswith("\\boxed{}.")
    assert load_config(None).data.instruction  # the tiny default keeps its boxed-answer instruction


@pytest.mark.parametrize("override, key", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.keep_checkpoints=-2", "train.keep_checkpoints"),
    ("eval.grader=exact", "eval.grader"),
    ("eval.subset.count=-1", "eval.subset.count"),
    ("eval.subset.size=3", "eval.subset.size"),
])
def test_bad_eval_and_keep_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_keep_all_checkpoints(tmp_path):
    assert load_config(None, ["train.keep_checkpoints=null"]).train.keep_checkpoints is None
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:08d}").mkdir()
    _prune(tmp_path, None)
    assert len(list(tmp_path.iterdir())) == 4
    _prune(tmp_path, 1, protect=(2,))  # the newest plus the protected (best) one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]


def test_subset_is_deterministic_and_seeded():
    a = subset_indices(300, 200, 42)
    assert a == subset_indices(300, 200, 42)
    assert len(set(a)) == 200 and a == sorted(a) and 0 <= a[0] and a[-1] < 300
    assert a != subset_indices(300, 200, 43)
    # the draw is Python's random.Random(seed).sample over the indices, so the same file in the
    # same row order gives the same 200 questions wherever that draw is made
    assert a == sorted(random.Random(42).sample(range(300), 200))
    assert subset_indices(5, 0, 42) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="eval.subset.count"):
        subset_indices(5, 6, 42)


def test_validation_questions_subset_then_cap():
    records = tiny_records(10, seed=0)
    cfg = load_config(None, ["eval.subset.count=4", "eval.subset.seed=7"])
    chosen = validation_questions(cfg, records)
    assert [r.id for r in chosen] == [records[i].id for i in subset_indices(10, 4, 7)]
    capped = validation_questions(load_config(None, ["eval.subset.count=4", "eval.subset.seed=7", "eval.max_questions=2"]), records)
    assert [r.id for r in capped] == [r.id for r in chosen[:2]]
    assert validation_questions(load_config(None), records) == records
