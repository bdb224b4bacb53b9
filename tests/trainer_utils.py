"""Shared helpers for the trainer tests: a tiny, fast config in a temporary run dir."""
from __future__ import annotations

import torch

from vaopd.config import load_config


def tiny_overrides(tmp_path, name: str = "run") -> list[str]:
    """The tiny default shrunk for tests (2 prompts x 2 responses, 6 new tokens, no validation).

    Pinned to the CPU in fp32 so the equalities the tests check hold on a GPU machine too.
    """
    return [
        "train.device=cpu", "train.precision=fp32",
        f"train.run_dir={tmp_path / name}", "train.prompts_per_step=2", "train.max_steps=2",
        "train.checkpoint_every=0", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
        "data.tiny_train_size=8", "data.val=", "log.progress=false", "optim.lr=1e-3", "optim.warmup_ratio=0",
    ]


def tiny_config(tmp_path, *overrides: str, name: str = "run"):
    """``tiny_overrides`` then ``overrides``, loaded."""
    return load_config(None, tiny_overrides(tmp_path, name) + list(overrides))


def tiny_cli(tmp_path, *overrides: str, name: str = "run") -> list[str]:
    """The same settings as ``--set`` arguments of ``python -m vaopd.train``."""
    return [a for o in tiny_overrides(tmp_path, name) + list(overrides) for a in ("--set", o)]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a local process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
