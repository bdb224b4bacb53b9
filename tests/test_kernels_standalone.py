"""``vaopd.kernels`` is a library: importing it loads nothing of the trainer and changes nothing in
the process (checked in fresh interpreters, where a torchvision that cannot load its ops is
installed, so the trainer's torchvision stand-ins would be defined if anything asked for them)."""
import json
import subprocess
import sys
import textwrap

from fake_torchvision import fake_torchvision_env

PROBE = textwrap.dedent("""
    import json, os, sys, torch
    environ = dict(os.environ)
    for name in {imports!r}:
        __import__(name)
    try:
        torch.ops.torchvision.nms.default
        torchvision_schema = True
    except (AttributeError, RuntimeError):
        torchvision_schema = False
    print(json.dumps({{"modules": list(sys.modules), "environ_changed": dict(os.environ) != environ,
                      "torchvision_schema": torchvision_schema}}))
""")


def loaded(imports, env):
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def top_level(modules):
    return {m.split(".")[0] for m in modules}


def test_importing_the_kernels_loads_only_torch_triton_numpy_and_the_standard_library(tmp_path):
    env = fake_torchvision_env(tmp_path)
    baseline = loaded(["torch", "triton", "numpy"], env)
    kernels = loaded(["vaopd.kernels"], env)
    ours = [m for m in kernels["modules"] if m.split(".")[0] == "vaopd"]
    assert "vaopd.kernels.va_opd" in ours  # the probe sees the package it imported
    assert all(m in ("vaopd", "vaopd.kernels") or m.startswith("vaopd.kernels.") for m in ours), ours
    for absent in ("vaopd.objective", "vaopd.torchvision_ops", "transformers", "torchvision"):
        assert absent not in kernels["modules"], absent
    extra = top_level(kernels["modules"]) - top_level(baseline["modules"]) - {"vaopd"} - set(sys.stdlib_module_names)
    assert not extra, f"import vaopd.kernels loaded {sorted(extra)}"
    assert not kernels["torchvision_schema"], "import vaopd.kernels defined torch.library ops under torchvision"
    assert not kernels["environ_changed"]


def test_the_probe_sees_the_trainers_torchvision_stand_ins(tmp_path):
    # The same probe on the trainer's module that defines them: the check above can fail.
    trainer = loaded(["vaopd.torchvision_ops"], fake_torchvision_env(tmp_path))
    assert trainer["torchvision_schema"]
