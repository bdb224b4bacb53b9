"""Fixtures shared by the test modules; plain helper functions live in ``helpers.py`` (loss inputs),
``trainer_utils.py`` (tiny runs), ``torchrun_train.py`` (multi-process runs) and
``fake_torchvision.py``, imported by module name (``pytest.ini`` puts ``tests`` on the path).

Tests marked ``slow`` (what the marker covers: ``pytest.ini``) are left out by ``pytest -m "not slow"``."""
import pytest

import vaopd.build as build_mod
import vaopd.trainer as trainer_mod
from torchrun_train import ScriptedRollout


@pytest.fixture
def scripted_rollouts(monkeypatch):
    """The trainer samples ``ScriptedRollout``'s fixed responses instead of generating."""
    monkeypatch.setattr(build_mod, "HFGenerate", ScriptedRollout)


@pytest.fixture
def forced_accuracies(monkeypatch):
    """``forced_accuracies(accuracies)``: validation reports these accuracies in turn instead of
    generating and grading (one per validation); returns the queue of those not yet reported."""

    def force(accuracies):
        queue = list(accuracies)

        def fake_evaluate(model, tokenizer, image_processor, records, **kwargs):
            return {"accuracy": queue.pop(0), "samples": len(records) * kwargs["samples"], "questions": len(records)}

        monkeypatch.setattr(trainer_mod, "evaluate", fake_evaluate)
        return queue

    return force
