"""``python -m vaopd.train``: on-policy distillation of a vision-language student (VA-OPD or OPD).

This module is the command line and ``train()``. The run is ``vaopd.trainer.Trainer`` (build,
resume, step, validate, save, run); one step, in the order it happens, lives in these modules:

- ``vaopd.data``: the step's prompts; ``vaopd.rollout``: the engines that sample ``K``
  responses per prompt (``hf``, ``vllm``); ``vaopd.strategy``: one process or FSDP2 under
  torchrun (sampling, reductions, clipping);
- ``vaopd.scoring``: the scorer (teacher's clean and ablated hidden states, the student's);
- ``vaopd.kernels.va_opd_loss``: the fused loss; ``vaopd.step``: one optimizer step end to end;
- ``vaopd.checkpoint``: atomic checkpoints; ``vaopd.build`` and ``vaopd.models``: the set-up;
  ``vaopd.optim``: AdamW and the schedule; ``vaopd.rollout_log``: the rollout log;
  ``vaopd.plan``: ``--dry-run``.

Run ``python -m vaopd.train --help`` for the command line.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.atomic_io import RunWriteError
from vaopd.checkpoint import CheckpointError
from vaopd.config import Config, ConfigError, load_config, to_yaml
from vaopd.data import DataError
from vaopd.distributed import launched_by_torchrun, shutdown
from vaopd.metrics import JsonlError
from vaopd.models import VocabularyError
from vaopd.plan import build_plan
from vaopd.runs import RunFolderError
from vaopd.trainer import Trainer, TrainingAborted, TrainResult

__all__ = ["train", "main", "TrainResult", "TrainingAborted"]


def train(cfg: Config, *, resume: str | bool | None = None, overwrite: bool = False,
          handle_signals: bool = False) -> TrainResult:
    """Train with ``cfg``; ``resume`` = True (newest intact checkpoint of the run dir) or a
    checkpoint path; ``overwrite`` replaces a run already in the run dir (``vaopd.runs``).

    Under torchrun every rank calls this: the student is FSDP2-sharded (``vaopd.strategy.FSDP``),
    each rank samples and scores its share of the step, checkpoints are sharded (DCP), and only
    rank 0 writes metrics, the run dir's files and the progress bar.
    """
    return Trainer(cfg, resume=resume, overwrite=overwrite, handle_signals=handle_signals).run()


# ----------------------------------------------------------------------------------------------
# Command line


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.train", description="On-policy distillation (VA-OPD or OPD) of a VLM.")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} when present, else built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. optim.lr=1e-5 (repeatable)")
    parser.add_argument("--method", choices=["va_opd", "opd"], default=None, help="shorthand for --set loss.method=...")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the run dir's newest intact checkpoint, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run dir that holds a run, removing its checkpoints and metrics")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and the plan, exit")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the console to our own progress bar
    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    overrides = list(args.set) + ([f"loss.method={args.method}"] if args.method else [])
    distributed = launched_by_torchrun()
    # Under torchrun every rank's messages name it; the first rank to fail exits non-zero and
    # torchrun stops the others (their collectives fail or time out: distributed.timeout_s).
    rank = f"[rank {os.environ['RANK']}] " if distributed else ""
    try:
        cfg = load_config(config_path, overrides)
        if args.dry_run:
            print(to_yaml(cfg))
            print(build_plan(cfg))
            return 0
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, handle_signals=True)
    except (ConfigError, DataError, VocabularyError, RunFolderError, CheckpointError, JsonlError, RunWriteError) as e:
        print(f"{rank}error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"{rank}aborted: {e}", file=sys.stderr)
        return 1
    except Exception:
        if not distributed:
            raise
        trace = traceback.format_exc().rstrip().splitlines()
        print("\n".join(f"{rank}{line}" for line in trace), file=sys.stderr, flush=True)
        return 1
    if distributed:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        best = result.best
        print(f"done: step {result.step}, run dir {result.run_dir}, checkpoint {result.checkpoint}"
              + (f", best checkpoint step {best['step']} (val accuracy {best['val_accuracy']:.4f})" if best else "")
              + (" (stopped by signal)" if result.stopped_by_signal else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
