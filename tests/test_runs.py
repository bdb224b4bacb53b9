"""Run folders: a new run never lands on an old one, resume rolls back cleanly and refuses
optimisation changes, stale temporaries go, and names and YAML errors are checked."""
import json
import os
import subprocess
import sys

import pytest

from trainer_utils import TINY, folder_hash, tiny_config
from vaopd.checkpoint import remove_stale_temporaries, step_checkpoints, verify_checkpoint
from vaopd.config import ConfigError, load_config
from vaopd.metrics import JsonlError
from vaopd.runs import RunFolderError
from vaopd.train import main, train

def cli(run_dir, *args):
    return main([*args, *[a for o in [*TINY, f"train.run_dir={run_dir}"] for a in ("--set", o)]])


def steps_logged(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_second_run_into_the_same_folder_is_refused_then_overwrite_replaces_it(tmp_path, capsys):
    run = tmp_path / "tiny"
    assert cli(run) == 0  # the README's first command
    before = folder_hash(run)
    assert cli(run, "--method", "opd") == 2  # its second one, into the same folder
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert folder_hash(run) == before
    assert cli(run, "--method", "opd", "--overwrite") == 0
    out = capsys.readouterr().out
    assert "--overwrite: removed the previous run's checkpoints, metrics.jsonl, config.yaml" in out
    assert "checkpoint " + str(run / "checkpoints" / "step_00000002") in out
    assert "method: opd" in (run / "config.yaml").read_text()
    assert steps_logged(run) == [1, 2]
    verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert "method: opd" in (run / "checkpoints" / "step_00000002" / "config.yaml").read_text()


def test_rollback_resume_removes_later_steps_and_truncates_metrics(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    run = train(cfg).run_dir
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002", "step_00000003"]
    capsys.readouterr()
    result = train(tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                               "train.stop_after=1"), resume=str(run / "checkpoints" / "step_00000001"))
    out = capsys.readouterr().out
    assert "resuming from" in out and "(step 1)" in out
    assert "removed step_00000002, step_00000003" in out
    assert result.step == 2
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]
    assert steps_logged(run) == [1, 2]
    verify_checkpoint(run / "checkpoints" / "step_00000002")


def test_resume_from_another_runs_checkpoint_needs_a_folder_of_its_own(tmp_path, capsys):
    a = train(tiny_config(tmp_path, "train.max_steps=1", name="a")).run_dir
    b = train(tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                          name="b")).run_dir
    before = folder_hash(b)
    with pytest.raises(RunFolderError, match="belongs to another run folder"):
        train(tiny_config(tmp_path, "train.max_steps=2", name="b"), resume=str(a / "checkpoints" / "step_00000001"))
    assert folder_hash(b) == before  # b's later checkpoints and metrics untouched
    fork = train(tiny_config(tmp_path, "train.max_steps=2", name="fork"), resume=str(a / "checkpoints" / "step_00000001"))
    assert fork.step == 2 and steps_logged(fork.run_dir) == [2]


def test_a_damaged_log_line_stops_a_rollback_before_anything_changes(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    run = train(cfg).run_dir
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]  # damage inside the file, not a torn last line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = folder_hash(run)
    with pytest.raises(JsonlError, match="metrics.jsonl: line 2"):
        train(cfg, resume=str(run / "checkpoints" / "step_00000001"))
    assert folder_hash(run) == before  # no checkpoint removed, no config rewritten


def test_resume_refuses_optimisation_changes_allows_safe_ones_and_drops_a_torn_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=3", "train.stop_after=2")
    run = train(cfg).run_dir
    before = folder_hash(run)
    changed = tiny_config(tmp_path, "train.max_steps=3", "optim.lr=0.5", "loss.method=opd")
    with pytest.raises(RunFolderError) as refused:
        train(changed, resume=True)
    message = str(refused.value)
    assert "optim.lr: 0.001 -> 0.5" in message and "loss.method: 'va_opd' -> 'opd'" in message
    assert folder_hash(run) == before
    # The same refusal from the command line: exit 2, the key named, nothing written.
    assert main(["--resume", "--set", f"train.run_dir={run}", "--set", "optim.lr=0.5"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert folder_hash(run) == before

    # A crash mid-write left half a line, and a killed save left a temporary folder.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')
    stale = run / "checkpoints" / ".tmp_step_00000003_999999999"
    (stale / "model").mkdir(parents=True)
    result = train(tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "eval.every=5"), resume=True)
    out = capsys.readouterr().out
    assert result.step == 3
    assert "resuming from" in out and "step_00000002 (step 2)" in out
    assert "changed settings (allowed)" in out and "train.checkpoint_every: null -> 1" in out and "eval.every: null -> 5" in out
    assert "train.stop_after: 2 -> null" in out
    assert "torn last line" in out and not stale.exists()
    assert steps_logged(run) == [1, 2, 3]


def test_stale_temporaries_of_dead_processes_go_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".tmp_step_00000004_{dead.pid}", f".tmp_step_00000004_{live.pid}", f".tmp_step_00000005_{os.getpid()}",
                     ".tmp_step_00000006", "step_00000002"):
            (tmp_path / name).mkdir()
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(p.name for p in removed) == sorted([f".tmp_step_00000004_{dead.pid}", f".tmp_step_00000005_{os.getpid()}",
                                                          ".tmp_step_00000006"])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".tmp_step_00000004_{live.pid}", "step_00000002"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "", "/abs"])
def test_train_name_is_a_plain_name(tmp_path, monkeypatch, capsys, name):
    with pytest.raises(ConfigError, match="train.name: must be a plain folder name"):
        load_config(None, [f"train.name={name}"])
    monkeypatch.chdir(tmp_path)
    assert main(["--set", f"train.name={name}"]) == 2
    assert "train.name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert load_config(None, ["train.name=qwen3vl-2b_v1.0"]).train.name == "qwen3vl-2b_v1.0"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{bad} is not valid YAML \(line \d+, column \d+\)"):
        load_config(bad)


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(RunFolderError, match="pass one of them"):
        train(tiny_config(tmp_path), resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()
