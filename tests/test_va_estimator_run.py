"""A run's VA estimator (``loss.va``) is visible in its plan, config.yaml, metrics and the inspect
tools, reaches the loss, and ``--resume`` refuses to change it (it changes the objective)."""
import json

import pytest
import yaml

import vaopd.step
from tests.test_runs import folder_hash
from tests.trainer_utils import tiny_cli, tiny_config
from vaopd.inspect import run_method
from vaopd.runs import RunFolderError
from vaopd.train import main, train


def test_dry_run_names_the_estimator(tmp_path, capsys):
    assert main(["--dry-run", *tiny_cli(tmp_path, "loss.va=two_sided")]) == 0
    assert "method: va_opd (kl full, va two_sided, ablation pixelate)" in capsys.readouterr().out
    assert main(["--dry-run", *tiny_cli(tmp_path, "loss.method=opd")]) == 0
    assert "method: opd (kl full, ablation none)" in capsys.readouterr().out


def test_a_run_records_its_estimator_and_resume_refuses_another(tmp_path, monkeypatch):
    specs = []
    real = vaopd.step.va_opd_loss

    def spy(*args, **kwargs):
        specs.append(kwargs["spec"])
        return real(*args, **kwargs)

    monkeypatch.setattr(vaopd.step, "va_opd_loss", spy)
    run = train(tiny_config(tmp_path, "loss.va=distribution", "train.max_steps=2", "train.stop_after=1")).run_dir
    assert specs and {s.va for s in specs} == {"distribution"}
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["va"] == "distribution"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["va_estimator"] for r in records if "loss" in r] == ["distribution"]
    assert run_method(run) == "va_opd:distribution"

    before = folder_hash(run)
    with pytest.raises(RunFolderError) as refused:
        train(tiny_config(tmp_path, "loss.va=sampled", "train.max_steps=2"), resume=True)
    assert "loss.va: 'distribution' -> 'sampled'" in str(refused.value)
    assert folder_hash(run) == before
    # The same estimator resumes.
    assert train(tiny_config(tmp_path, "loss.va=distribution", "train.max_steps=2"), resume=True).step == 2
