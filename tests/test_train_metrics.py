"""Step metrics: JSONL lines, TensorBoard mirror, resume truncation, the VA summary numbers."""
import json

import pytest
import torch

from vaopd.metrics import MetricsLogger, token_stats


def test_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log({"step": 1, "loss": 0.5, "kl": float("nan"), "records": ["a"]})
    logger.log({"step": 2, "loss": 0.25})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "kl": None, "records": ["a"]}, {"step": 2, "loss": 0.25}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_drops_lines_after_the_checkpoint_and_fresh_run_starts_over(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log({"step": step})
    logger.close()
    logger = MetricsLogger(tmp_path, resume_step=2)
    logger.log({"step": 3, "redo": True})
    logger.close()
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "redo": True}]
    MetricsLogger(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_token_stats_high_share():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    va = torch.tensor([[0.0, 4.0, 1.0, 1.0, 2.0, 0.0], [1.0, 3.0, 0, 0, 0, 0]])
    kl = torch.ones(2, 6)
    out = token_stats({"va": va, "kl": kl}, mask, high_fraction=0.2)
    # high groups: ceil(0.2*5)=1 token (4.0) and ceil(0.2*2)=1 token (3.0)
    assert out == pytest.approx({"tokens": 7, "kl_sum": 7, "va_sum": 12, "va_high": 7, "va_max": 4, "responses": 2})


def test_wandb_mirror_with_a_stand_in_module(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", scalars, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda project, config, dir: calls.append(("init", project, config)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, wandb_project="p", config={"a": 1})
    logger.log({"step": 3, "loss": 0.5, "skipped": False, "records": ["x"]})
    logger.close()
    assert calls == [("init", "p", {"a": 1}), ("log", {"loss": 0.5}, 3), ("finish",)]


def test_missing_logger_package_is_an_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(RuntimeError, match="wandb is not installed"):
        MetricsLogger(tmp_path, wandb_project="p")
