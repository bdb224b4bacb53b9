"""The best checkpoint (highest validation accuracy, earliest on ties) is recorded and resolvable;
``vaopd.eval`` reports avg@k on a tiny checkpoint, on the run's subset or a local benchmark file."""
import io
import json

import pytest
from safetensors.torch import load_file

import vaopd.train as train_mod
from trainer_utils import tiny_config, validating_config
from vaopd.export import main as export_main
from vaopd.eval import main as eval_main
from vaopd.selection import read_best


def test_best_checkpoint_earliest_wins_ties_and_is_never_pruned(tmp_path, forced_accuracies, capsys):
    queue = forced_accuracies([0.25, 0.5, 0.5])
    cfg = validating_config(tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=1")
    result = train_mod.train(cfg)
    assert not queue
    best = read_best(result.run_dir)
    assert best == result.best
    assert (best["step"], best["val_accuracy"], best["checkpoint"]) == (2, 0.5, "checkpoints/step_00000002")
    assert best["val_questions"] == 2 and best["grader"] == cfg.eval.grader
    # keep_checkpoints=1 keeps the newest (3) and the best (2)
    assert sorted(p.name for p in (result.run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]

    out = tmp_path / "exported"
    assert export_main(["--checkpoint", "best", "--run", str(result.run_dir), "--out", str(out)]) == 0
    assert "step_00000002" in capsys.readouterr().out
    exported = load_file(out / "model.safetensors")
    saved = load_file(result.run_dir / "checkpoints" / "step_00000002" / "model" / "model.safetensors")
    assert exported.keys() == saved.keys() and all((exported[k] == saved[k]).all() for k in saved)

    assert export_main(["--checkpoint", "best", "--out", str(tmp_path / "x")]) == 2
    assert "--run" in capsys.readouterr().err
    assert export_main(["--checkpoint", "best", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "best.json" in capsys.readouterr().err


def test_validation_without_a_checkpoint_is_no_candidate(tmp_path, forced_accuracies):
    # step 1 validates best of all, but no checkpoint is saved there (checkpoint_every=2)
    forced_accuracies([0.9, 0.2, 0.5])
    result = train_mod.train(validating_config(tmp_path, "train.checkpoint_every=2"))
    assert [r["val_accuracy"] for r in result.history if "val_accuracy" in r] == [0.9, 0.2, 0.5]
    assert (result.best["step"], result.best["val_accuracy"]) == (3, 0.5)


def test_best_survives_a_resume_and_is_in_the_summary_line(tmp_path, forced_accuracies, capsys):
    forced_accuracies([0.5, 0.75, 0.25])
    args = [f"--config={tmp_path / 'empty.yaml'}"]
    (tmp_path / "empty.yaml").write_text("{}\n")
    cfg = validating_config(tmp_path, "train.checkpoint_every=1")
    overrides = [f"--set={key}={value}" for key, value in [
        ("train.device", "cpu"), ("train.precision", "fp32"), ("train.run_dir", cfg.train.run_dir),
        ("train.prompts_per_step", 2), ("train.max_steps", 3), ("train.checkpoint_every", 1),
        ("rollout.samples_per_prompt", 2), ("rollout.max_new_tokens", 6), ("data.tiny_train_size", 8),
        ("data.tiny_val_size", 2), ("eval.samples", 1), ("eval.every", 1), ("log.progress", "false")]]
    assert train_mod.main(args + overrides + ["--set=train.stop_after=2"]) == 0
    assert "best checkpoint step 2 (val accuracy 0.7500)" in capsys.readouterr().out
    assert train_mod.main(args + overrides + ["--resume"]) == 0
    assert "best checkpoint step 2 (val accuracy 0.7500)" in capsys.readouterr().out
    assert read_best(cfg.train.run_dir)["step"] == 2


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_avg_at_k_and_per_question_file(tmp_path, capsys):
    result = train_mod.train(tiny_config(tmp_path, "train.max_steps=1", "data.val=tiny", "data.tiny_val_size=4",
                                         "eval.subset.count=3", "eval.max_new_tokens=3", "eval.every=0"))
    capsys.readouterr()
    per_question = tmp_path / "per_question.jsonl"
    # the run's validation questions: its 3-question subset of data.val
    assert eval_main(["--checkpoint", str(result.checkpoint), "--samples", "3", "--output", str(per_question),
                      "--set", "eval.grader=first_boxed_mathruler"]) == 0
    out = _last_json(capsys)
    assert (out["k"], out["questions"], out["samples"], out["grader"]) == (3, 3, 9, "first_boxed_mathruler")
    rows = [json.loads(line) for line in per_question.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == len(r["correct"]) == 3 for r in rows)
    assert all(r["num_correct"] == sum(r["correct"]) for r in rows)
    assert out["avg@k"] == pytest.approx(sum(r["num_correct"] / 3 for r in rows) / 3)
    assert out["accuracy"] == pytest.approx(sum(r["num_correct"] for r in rows) / 9)
    # `--checkpoint best` works here too
    assert eval_main(["--checkpoint", "best", "--run", str(result.run_dir), "--samples", "2"]) == 0
    assert _last_json(capsys)["questions"] == 3


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_eval_on_a_local_benchmark_file_with_other_keys(tmp_path, capsys, fmt):
    """A MathVerse/WeMath-style file: other field names (mapped with --set), image as a relative path
    (JSONL) or embedded bytes (parquet); the run's validation subset does not apply to it."""
    from vaopd.data import tiny_records

    result = train_mod.train(tiny_config(tmp_path, "train.max_steps=1", "eval.subset.count=1"))
    capsys.readouterr()
    bench = tmp_path / "bench"
    (bench / "images").mkdir(parents=True)
    rows = []
    for i, r in enumerate(tiny_records(3, seed=5)):
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        if fmt == "jsonl":
            (bench / "images" / f"{i}.png").write_bytes(buf.getvalue())
            image = f"images/{i}.png"
        else:
            image = {"bytes": buf.getvalue(), "path": None}
        rows.append({"sample_index": f"q{i}", "query": r.question, "gt": r.answer, "image": image})
    if fmt == "jsonl":
        path = bench / "testmini.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = bench / "testmini.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    per_question = tmp_path / "out.jsonl"
    assert eval_main(["--checkpoint", str(result.checkpoint), "--data", str(path), "--samples", "2",
                      "--output", str(per_question), "--set", "eval.max_new_tokens=3",
                      "--set", "data.question_key=query", "--set", "data.answer_key=gt", "--set", "data.image_key=image",
                      "--set", "data.id_key=sample_index"]) == 0
    out = _last_json(capsys)
    assert out["questions"] == 3 and out["samples"] == 6 and out["data"] == str(path)
    assert [json.loads(line)["id"] for line in per_question.read_text().splitlines()] == ["q0", "q1", "q2"]
