"""A torchvision that behaves like the vLLM environment's CUDA build beside a CPU torch: it is
installed (``find_spec`` finds it), has no loadable ``_C`` library, and its import fails unless the
``torchvision::nms`` schema is already defined (transformers imports it when it looks for its
version). Once imported it has no ``__file__`` or ``__version__``, which transformers takes for a
stray namespace folder, so it does not go on to use the transforms this stand-in lacks."""
import os
from pathlib import Path

FAKE_INIT = '''import torch
try:
    torch.ops.torchvision.nms.default
except (AttributeError, RuntimeError):
    raise RuntimeError("operator torchvision::nms does not exist")
del globals()["__file__"]
'''


def fake_torchvision_env(tmp_path: Path) -> dict:
    """An environment for a fresh interpreter whose ``PYTHONPATH`` puts such a torchvision first."""
    root = Path(tmp_path) / "fake_site"
    (root / "torchvision").mkdir(parents=True, exist_ok=True)
    (root / "torchvision" / "__init__.py").write_text(FAKE_INIT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
