"""``python -m vaopd.export --checkpoint DIR --out DIR``: the student of a checkpoint as one
consolidated ``save_pretrained`` folder (safetensors, config, tokenizer, image processor) for
inference with ``from_pretrained`` or ``vaopd.eval`` (the folder also holds the run's
``config.yaml``, which ``vaopd.eval`` reads, and a ``manifest.json`` of its files).

The checkpoint is verified first (its manifest, readable and finite weights): a damaged one is
refused, naming the file. ``--out`` must be a new or empty folder outside every checkpoint.

Both checkpoint layouts work (``vaopd.checkpoint``): a single-process checkpoint's ``model/``
already holds full safetensors and is re-saved as is; a sharded (torchrun) checkpoint's weights
are read from its ``dcp/`` shards into a model built from ``model/config.json``, on one process,
whatever number of ranks wrote them.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.checkpoint import is_sharded_checkpoint, load_sharded_state, verify_checkpoint
from vaopd.manifest import MANIFEST, write_manifest
from vaopd.selection import resolve_checkpoint

__all__ = ["export", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export(checkpoint: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the student of ``checkpoint`` to ``out`` as safetensors in ``dtype``; returns ``out``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    checkpoint, out = Path(checkpoint), Path(out)
    model_dir = checkpoint / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no model/)")
    if (model_dir / "adapter_config.json").is_file():
        raise ValueError(f"{checkpoint} holds a LoRA adapter: load it with peft onto model.student, or merge it there")
    _check_out(out)
    verify_checkpoint(checkpoint)
    if is_sharded_checkpoint(checkpoint):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
        load_sharded_state(checkpoint, model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    # Tokenizer, image processor, chat template and generation config travel unchanged.
    shutil.copytree(model_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"),
                    dirs_exist_ok=True)
    model.to(_DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    shutil.copy2(checkpoint / "config.yaml", out / "config.yaml")  # the run's settings, for vaopd.eval
    write_manifest(out)
    return out


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, not empty, directly in a run's ``checkpoints/``, or inside a
    checkpoint or export folder (one with a manifest: writing there would change what it describes)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: a file, not a folder; name a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: exists and is not empty; name a new or empty folder")
    if out.resolve().parent.name == "checkpoints":
        raise ValueError(f"--out {out}: inside a run's checkpoints folder; export to a folder outside it")
    holder = next((p for p in out.resolve().parents if (p / MANIFEST).is_file()), None)
    if holder is not None:
        raise ValueError(f"--out {out}: inside the checkpoint {holder}, whose files its {MANIFEST} describes; "
                         "export to a folder outside every checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoints/step_NNNNNNNN folder (single-process or sharded), or 'best' (with --run)")
    parser.add_argument("--run", default=None, help="the run folder whose best checkpoint (best.json) --checkpoint best names")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty if it exists)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weights' dtype (default float32)")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, args.run)
        out = export(checkpoint, args.out, args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
