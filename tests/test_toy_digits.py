"""Teacher VA on the student's digit readings, split into correct and wrong readings."""
import json

import yaml

from vaopd.toy.digits import digit_token_stats, reading_positions


def test_reading_positions():
    tokens = ["The", " digits", " are", " 3", " and", " 8", ".", " The", " larger", " is", " 8"]
    assert reading_positions(tokens) == [3, 5]
    assert reading_positions(["I", " see", " 3"]) == []


def test_digit_token_stats_splits_correct_and_wrong(tmp_path):
    run = tmp_path / "va_opd_s0"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"loss": {"method": "va_opd"}}))
    (run / "metrics.jsonl").write_text("")
    tokens = ["The", " digits", " are", " 3", " and", " 5", "."]
    rollout = {"id": "train-00001", "tokens": tokens, "teacher_va": [0, 0, 0, 4.0, 0, 0.5, 0],
               "high": [False, False, False, True, False, False, False]}
    coarse = {**rollout, "id": "train-00002"}
    (run / "rollouts.jsonl").write_text(json.dumps(rollout) + "\n" + json.dumps(coarse) + "\n")
    rows = {"train-00001": {"kind": "detail", "response": "The digits are 3 and 8. The larger is \\boxed{8}."},
            "train-00002": {"kind": "coarse", "response": "I see 3 squares. The answer is \\boxed{3}."}}
    stats = digit_token_stats([run], rows)["va_opd"]
    assert stats["correct"] == {"tokens": 1, "mean_va": 4.0, "high_rate": 1.0}
    assert stats["wrong"] == {"tokens": 1, "mean_va": 0.5, "high_rate": 0.0}
