"""The torchvision stand-ins (``vaopd.torchvision_ops``) are defined before the trainer imports
transformers, peft or vLLM, and only then (``tests/test_kernels_standalone.py``: not by the loss).

Three checks that together fail if the call is dropped anywhere: importing ``vaopd.torchvision_ops``
defines the stand-ins where an installed torchvision cannot load its ops (a stand-in for the vLLM
environment's, ``fake_torchvision``); each command-line entry point imports that module, before
transformers where it imports it (``sys.modules`` keeps import order; fresh interpreters); and
every trainer module that imports one of those libraries, at its top or in a function, imports
``vaopd.torchvision_ops`` at its top, above that import.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fake_torchvision import fake_torchvision_env

PACKAGE = Path(__file__).resolve().parents[1] / "vaopd"
NEEDS_STAND_INS = ("transformers", "peft", "vllm")
GATE = "vaopd.torchvision_ops"

# The command-line entry points (python -m ...) that load transformers.
ENTRY_POINTS = ["vaopd.train", "vaopd.eval", "vaopd.export", "vaopd.toy.compare", "vaopd.toy.sft"]

PROBE = textwrap.dedent("""
    import importlib, json, sys
    importlib.import_module({module!r})
    order = list(sys.modules)
    print(json.dumps({{"gate_at": order.index({gate!r}) if {gate!r} in order else None,
                      "libraries": {{m: order.index(m) for m in {libraries!r} if m in order}}}}))
""")


def start(module, env):
    """A fresh interpreter importing ``module`` and reporting where the gate and the libraries came."""
    code = PROBE.format(module=module, gate=GATE, libraries=list(NEEDS_STAND_INS))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc, module):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{module}: {stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


def gate_first(found) -> bool:
    return found["gate_at"] is not None and all(found["gate_at"] < at for at in found["libraries"].values())


def test_importing_the_gate_defines_the_stand_ins_where_torchvision_cannot_load(tmp_path):
    env = fake_torchvision_env(tmp_path)
    code = "import torchvision"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "operator torchvision::nms does not exist" in failed.stderr
    code = f"import {GATE} as gate, torch, torchvision; assert gate.stand_ins_defined(); print(torch.ops.torchvision.nms.default)"
    ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr


@pytest.fixture(scope="module")
def probes():
    procs = {module: start(module, dict(os.environ)) for module in ENTRY_POINTS}  # in parallel: each imports transformers
    return {module: result(proc, module) for module, proc in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_import_the_gate_before_transformers(probes, module):
    found = probes[module]
    assert found["gate_at"] is not None, f"importing {module} did not import {GATE}"
    assert gate_first(found), f"{module} imported {sorted(found['libraries'])} before {GATE}"


def test_the_probe_sees_transformers_imported_without_the_gate():
    assert not gate_first(result(start("transformers", dict(os.environ)), "transformers"))


def _imports(tree):
    """``(line, module name)`` of every import in ``tree``, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def test_every_module_that_imports_transformers_peft_or_vllm_imports_the_stand_ins_first():
    # The package and the benchmark scripts (scale_step runs from .venv-vllm too).
    root = PACKAGE.parent
    checked = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(root / "bench").glob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        needs = [line for line, name in _imports(tree) if name.split(".")[0] in NEEDS_STAND_INS]
        if not needs:
            continue
        checked.append(path.name)
        gate = [node.lineno for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                for _, name in _imports(node) if name == GATE]
        assert gate and min(gate) < min(needs), f"{path.relative_to(root)}: import {GATE} at its top, above line {min(needs)}"
    assert {"tiny.py", "export.py", "vllm.py", "scale_models.py", "scale_step.py"} <= set(checked)
