"""Validation grading and ``python -m vaopd.eval`` on a checkpoint."""
import json

import pytest

from trainer_utils import tiny_config
from vaopd.eval import grade, main
from vaopd.train import train


@pytest.mark.parametrize("response, answer, ok", [
    ("so the count is \\boxed{3}.", "3", True),
    ("I see 3 squares", "3", True),
    ("the answer is \\boxed{4}", "3", False),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("x = \\boxed{12}", "\\boxed{12}", True),
    ("no idea", "7", False),
])
def test_grade(response, answer, ok):
    assert grade(response, answer) is ok


def test_eval_cli_on_a_checkpoint(tmp_path, capsys):
    result = train(tiny_config(tmp_path, "train.max_steps=1"))
    capsys.readouterr()
    assert main(["--checkpoint", str(result.checkpoint), "--samples", "3", "--set", "eval.max_new_tokens=4",
                 "--set", "data.tiny_val_size=2", "--data", "tiny"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["questions"] == 2 and out["samples"] == 6 and 0 <= out["accuracy"] <= 1


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "not a vaopd checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("grader", ["math_verify", "first_boxed_mathruler"])
def test_evaluate_maps_samples_to_their_questions(monkeypatch, grader):
    import torch

    import vaopd.eval as eval_mod
    from vaopd.data import tiny_records
    from vaopd.rollout import response_mask
    from vaopd.tiny import build_image_processor, build_model, build_tokenizer

    tok = build_tokenizer()
    records = tiny_records(3, seed=0)
    answers = {r.question: r.answer for r in records}

    class Oracle:  # answers right on the first sample of each question, wrong on the second
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, k):
            rows = []
            for i in range(len(prompts)):
                question = tok.decode(prompts.input_ids[i], skip_special_tokens=True)
                gold = next(a for q, a in answers.items() if q in question)
                rows += [f"\\boxed{{{gold}}}<|im_end|>", f"\\boxed{{{int(gold) + 1}}}<|im_end|>"]
            ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]
            width = max(map(len, ids))
            tokens = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
            return tokens, response_mask(tokens, [tok.eos_token_id])

    monkeypatch.setattr(eval_mod, "HFGenerate", Oracle)
    out = eval_mod.evaluate(build_model("student", tok, 0), tok, build_image_processor(), records,
                            eos_ids=[tok.eos_token_id], banned_ids=[], samples=2, temperature=1.0, top_p=1.0,
                            max_new_tokens=4, batch_prompts=2, instruction="", seed=0, grader=grader)
    per_question = out.pop("per_question")
    assert out == {"accuracy": 0.5, "avg@k": 0.5, "k": 2, "questions": 3, "samples": 6}
    assert [q["id"] for q in per_question] == [r.id for r in records]
    assert all(q["correct"] == [True, False] for q in per_question)
