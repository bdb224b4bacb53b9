"""Run safety: one process per run folder (two runs or two resumes started at the same instant:
exactly one proceeds, the other changes nothing) and the lock's own life cycle; a best.json that is
corrupt or leads out of its run, and an export --out that is a file or inside a checkpoint, are
refused; resuming a finished run changes nothing."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchrun_train import sets as rank_sets, torchrun
from trainer_utils import TINY, folder_hash, tiny_cli, validating_config
from vaopd.runs import LOCK_FILE, RunFolderError, lock_run_folder
from vaopd.selection import BEST_FILE
from vaopd.train import main, train

ROOT = Path(__file__).resolve().parent.parent

# Each process imports everything first, then waits until every other one is ready too, so the
# runs start within milliseconds of each other.
_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vaopd.train import main
    barrier, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < n:
        time.sleep(0.001)
    sys.exit(main(sys.argv[4:]))
""")


def race(tmp_path, runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one ``python -m vaopd.train`` per argument list, released together; their results."""
    barrier = tmp_path / f"barrier{len(list(tmp_path.glob('barrier*')))}"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(barrier), str(i), str(len(runs)), *args], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, args in enumerate(runs)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in procs]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def weights_and_metrics(run: Path) -> tuple[dict, list[dict]]:
    """The checkpoints' files (SHA-256; not the config and manifest, which name the folder) and the
    metrics lines without the timing fields."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = ("tokens_per_s", "time", "decode_ms")
    files = {k: v for k, v in folder_hash(run / "checkpoints").items() if Path(k).name not in ("config.yaml", "manifest.json")}
    return files, [{k: v for k, v in r.items() if not any(t in k for t in timing)}
                                              for r in lines]


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder_one_proceeds_the_other_changes_nothing(tmp_path):
    run = tmp_path / "race"
    common = [*TINY, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5", f"train.run_dir={run}"]
    seeds = ["train.seed=1", "train.seed=2"]
    results = race(tmp_path, [sets(*common, seed) for seed in seeds])
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    winner = next(i for i, r in enumerate(results) if r.returncode == 0)
    loser = results[1 - winner]
    assert f"error: {run} is in use by another run (pid " in loser.stderr
    assert loser.stderr.strip().count("\n") == 0  # one line, no traceback
    assert "done: step 4" in results[winner].stdout
    assert f"seed: {winner + 1}" in (run / "config.yaml").read_text()
    assert not (run / LOCK_FILE).exists()
    # The folder is exactly what the winner alone writes: the same run again, in a folder of its own.
    alone = tmp_path / "alone"
    solo = race(tmp_path, [sets(*common, seeds[winner], f"train.run_dir={alone}")])[0]
    assert solo.returncode == 0, solo.stderr[-2000:]
    assert weights_and_metrics(run) == weights_and_metrics(alone)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in alone.iterdir())


@pytest.mark.slow
def test_two_resumes_started_together_write_each_step_once(tmp_path):
    run = tmp_path / "race"
    common = [*TINY, "train.checkpoint_every=2", "train.keep_checkpoints=5", f"train.run_dir={run}"]
    first = race(tmp_path, [sets(*common, "train.max_steps=2")])[0]
    assert first.returncode == 0, first.stderr[-2000:]
    results = race(tmp_path, [["--resume", *sets(*common, "train.max_steps=4")]] * 2)
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-2000:] for r in results]
    loser = next(r for r in results if r.returncode == 2)
    assert f"error: {run} is in use by another run (pid " in loser.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_the_lock_refuses_a_second_holder_names_it_and_leaves_no_trace(tmp_path):
    run = tmp_path / "new" / "run"
    with lock_run_folder(run):
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        before = folder_hash(tmp_path)
        with pytest.raises(RunFolderError, match=rf"{run} is in use by another run \(pid {os.getpid()}\)"):
            with lock_run_folder(run):
                pass
        assert folder_hash(tmp_path) == before
    assert not (tmp_path / "new").exists()  # created for the lock, empty again: removed
    with lock_run_folder(run):
        (run / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # a folder the run wrote into stays


def test_a_dead_holder_never_blocks(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from vaopd.runs import lock_run_folder
        lock = lock_run_folder({str(run)!r})
        lock.__enter__()
        print("held", flush=True)
        os._exit(9)  # dies holding it, its lock file left behind
    """)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert holder.wait(timeout=60) == 9 and (run / LOCK_FILE).exists()
    with lock_run_folder(run):
        assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_run_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunFolderError, match="the run folder is a file"):
        with lock_run_folder(path):
            pass
    assert path.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# Records and outputs that point where they must not


def validated_run(tmp_path, forced_accuracies, *overrides):
    """A 2-step run that validates at step 2 (forced accuracy 0.5) and checkpoints both steps."""
    forced_accuracies([0.5] * 4)
    return train(validating_config(tmp_path, "train.max_steps=2", "eval.every=0", "train.checkpoint_every=1",
                                   "train.keep_checkpoints=5", *overrides)).run_dir


@pytest.mark.parametrize("content, says", [
    ('{"step": 2, "val_accuracy": 0.5, "checkpoint": "checkpoints/step_0000', "not a JSON record"),
    ('[1, 2]', "holds a list, not a record"),
    ('{"step": "2", "val_accuracy": 0.5, "checkpoint": "checkpoints/step_00000002"}', "'step' is missing or not an integer"),
    ('{"step": 2, "val_accuracy": 0.5, "checkpoint": "../other/checkpoints/step_00000002"}',
     "'checkpoint' is '../other/checkpoints/step_00000002', not checkpoints/step_00000002 of this run; refusing to follow it"),
    ('{"step": 1, "val_accuracy": 0.5, "checkpoint": "checkpoints/step_00000002"}', "not checkpoints/step_00000001"),
])
def test_a_corrupt_or_escaping_best_json_is_refused_by_export_eval_and_resume(tmp_path, forced_accuracies, capsys, content, says):
    from vaopd.eval import main as eval_main
    from vaopd.export import main as export_main

    run = validated_run(tmp_path, forced_accuracies)
    (run / BEST_FILE).write_text(content)
    before = folder_hash(run)
    capsys.readouterr()
    assert export_main(["--checkpoint", "best", "--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert eval_main(["--checkpoint", "best", "--run", str(run)]) == 2
    assert main(["--resume", *tiny_cli(tmp_path, "train.max_steps=3", "train.checkpoint_every=1",
                                       "train.keep_checkpoints=5", "data.val=tiny", "data.tiny_val_size=2",
                                       "eval.samples=1", "eval.every=0")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith(f"error: {run / BEST_FILE}: ") and says in line for line in err), err
    assert folder_hash(run) == before and not (tmp_path / "out").exists()


def test_export_out_must_be_a_folder_outside_every_checkpoint(tmp_path, forced_accuracies, capsys):
    from vaopd.export import main as export_main

    run = validated_run(tmp_path, forced_accuracies)
    ckpt = run / "checkpoints" / "step_00000002"
    (tmp_path / "file").write_text("x")
    before = folder_hash(run)
    capsys.readouterr()
    outside = "export to a folder outside every checkpoint"
    for out, says in [(tmp_path / "file", "a file, not a folder; name a new or empty folder"),
                      (ckpt / "exported", f"inside the checkpoint {ckpt}, whose files its manifest.json describes; {outside}"),
                      (ckpt / "model" / "x", f"inside the checkpoint {ckpt}, whose files its manifest.json describes; {outside}"),
                      (run / "checkpoints" / "step_00000009", "inside a run's checkpoints folder; export to a folder outside it")]:
        assert export_main(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"error: --out {out}: {says}\n"
    assert folder_hash(run) == before and (tmp_path / "file").read_text() == "x"
    exported = tmp_path / "exported"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(exported)]) == 0
    # an export folder has a manifest too: nothing is exported into it either
    assert export_main(["--checkpoint", str(ckpt), "--out", str(exported / "again")]) == 2


def test_resuming_a_finished_run_adds_no_line(tmp_path, forced_accuracies, capsys):
    run = validated_run(tmp_path, forced_accuracies)
    lines = (run / "metrics.jsonl").read_text()
    assert [json.loads(line).get("val_accuracy") for line in lines.splitlines()] == [None, None, 0.5]
    before = {k: v for k, v in folder_hash(run).items() if k != "config.yaml"}  # a resume writes its own settings
    for _ in range(2):
        assert main(["--resume", *tiny_cli(tmp_path, "train.max_steps=2", "train.checkpoint_every=1",
                                           "train.keep_checkpoints=5", "data.val=tiny", "data.tiny_val_size=2",
                                           "eval.samples=1", "eval.every=0")]) == 0
    assert (run / "metrics.jsonl").read_text() == lines
    assert {k: v for k, v in folder_hash(run).items() if k != "config.yaml"} == before


def test_the_last_checkpoint_is_written_after_the_last_validation(tmp_path, monkeypatch, forced_accuracies):
    import vaopd.trainer as trainer_mod

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = validating_config(tmp_path, "train.max_steps=2", "eval.every=0", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    monkeypatch.setattr(trainer_mod, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    run = cfg.train.run_dir
    assert sorted(p.name for p in (Path(run) / "checkpoints").iterdir()) == ["step_00000001"]
    forced_accuracies([0.5])
    assert train(cfg, resume=True).step == 2
    assert [json.loads(line).get("val_accuracy") for line in (Path(run) / "metrics.jsonl").read_text().splitlines()] \
        == [None, None, 0.5]


def test_a_full_disk_while_writing_a_run_file_names_it_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    import vaopd.atomic_io as atomic_io
    from vaopd.atomic_io import RunWriteError, atomic_write_text
    from vaopd.metrics import MetricsLogger

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / BEST_FILE
    path.write_text("old\n")
    monkeypatch.setattr(atomic_io.os, "fsync", full)
    with pytest.raises(RunWriteError, match=rf"cannot write {path}: No space left on device; it was left as it was"):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_FILE] and path.read_text() == "old\n"

    logger = MetricsLogger(tmp_path)
    logger.log({"step": 1})

    class FullFile:
        write = flush = staticmethod(full)

    real, logger._file = logger._file, FullFile()
    with pytest.raises(RunWriteError, match=rf"cannot append to {tmp_path / 'metrics.jsonl'}: No space left on device; "
                                            "the checkpoints are intact"):
        logger.log({"step": 2})
    logger._file = real
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.slow
def test_under_torchrun_a_refused_lock_stops_every_rank(tmp_path):
    run = tmp_path / "run"
    with lock_run_folder(run):
        done = torchrun(tmp_path, *rank_sets(f"train.run_dir={run}", "train.max_steps=1"))
    assert done.returncode != 0
    for rank in (0, 1):  # each rank says why at once, none waits for a collective's timeout
        assert f"[rank {rank}] error: {run} is in use by another run (pid {os.getpid()})" in done.stderr, done.stderr[-3000:]
    assert "Timeout" not in done.stderr and "] Traceback" not in done.stderr  # (torchrun adds its own summary)
    assert not run.exists()
