"""``python -m vaopd.train``: on-policy distillation of a vision-language student (VA-OPD or OPD).

This module is the orchestration: the run (resume, loop, signals, validation, checkpoints) and
the command line. One step, in the order it happens, lives in these modules:

- ``vaopd.data``: the step's prompts; ``vaopd.rollout``: the engines that sample ``K``
  responses per prompt (``hf``, ``vllm``);
- ``vaopd.scoring``: the teacher's clean and ablated hidden states (``vaopd.ablate`` for the view);
- ``vaopd.kernels.va_opd_loss``: the fused loss; ``vaopd.step``: one optimizer step end to end;
- ``vaopd.checkpoint``: atomic checkpoints; ``vaopd.build`` and ``vaopd.models``: the set-up;
  ``vaopd.optim``: AdamW and the schedule; ``vaopd.plan``: ``--dry-run``.

Run ``python -m vaopd.train --help`` for the command line.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.atomic_io import RunWriteError, atomic_write_text
from vaopd.build import Setup, build_setup, parallelize
from vaopd.checkpoint import (CheckpointError, is_sharded_checkpoint, latest_checkpoint, load_sharded_state,
                              load_trainer_state, remove_later_checkpoints, remove_stale_temporaries, rng_state,
                              save_checkpoint, save_sharded_checkpoint, set_rng_state)
from vaopd.config import Config, ConfigError, load_config, to_dict, to_yaml
from vaopd.data import DataError
from vaopd.distributed import (any_rank, init_distributed, launched_by_torchrun, load_full_optimizer_state, reduce_sums,
                               rollout_seed, shutdown)
from vaopd.eval import evaluate, validation_questions
from vaopd.metrics import JsonlError, MetricsLogger, truncate_jsonl
from vaopd.models import VocabularyError, resolve_device
from vaopd.optim import build_optimizer, total_steps
from vaopd.plan import build_plan
from vaopd.runs import RunFolderError, clear_run, lock_run_folder, run_dir_of, start_run
from vaopd.selection import BEST_FILE, is_better, read_best, write_best
from vaopd.step import train_step

__all__ = ["train", "main", "TrainResult", "TrainingAborted"]


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    student: torch.nn.Module
    teacher: torch.nn.Module
    step: int
    run_dir: Path
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)
    stopped_by_signal: bool = False
    # The best checkpoint so far (vaopd.selection): step, val_accuracy, checkpoint (relative path).
    best: dict | None = None


_REFUSALS = (RunFolderError, CheckpointError, ConfigError, JsonlError)


def _start_on_main(env, say, cfg: Config, resume, overwrite: bool, held: ExitStack) -> tuple[Path | None, list[Path]]:
    """``vaopd.runs.start_run`` decided by rank 0 alone, holding the run folder's lock (until
    ``held`` closes), and told to every rank (a slower rank must not see rank 0's first writes as
    an existing run); a refusal is raised on every rank."""
    if env is None:
        held.enter_context(lock_run_folder(run_dir_of(cfg)))
        return start_run(cfg, resume=resume, overwrite=overwrite, warn=say)
    import torch.distributed as dist

    answer = [None]
    if env.is_main:
        try:
            held.enter_context(lock_run_folder(run_dir_of(cfg)))
            ckpt, damaged = start_run(cfg, resume=resume, overwrite=overwrite, warn=say)
            answer[0] = ("ok", (str(ckpt) if ckpt else None, [str(p) for p in damaged]))
        except _REFUSALS as e:
            answer[0] = (type(e).__name__, str(e))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind != "ok":
        raise {t.__name__: t for t in _REFUSALS}[kind](value)
    ckpt, damaged = value
    return (Path(ckpt) if ckpt else None), [Path(p) for p in damaged]


def train(cfg: Config, *, resume: str | bool | None = None, overwrite: bool = False,
          handle_signals: bool = False) -> TrainResult:
    """Train with ``cfg``; ``resume`` = True (newest intact checkpoint of the run dir) or a
    checkpoint path; ``overwrite`` replaces a run already in the run dir (``vaopd.runs``).

    Under torchrun every rank calls this: the student is FSDP2-sharded (``parallelize``), each
    rank samples and scores its share of the step, checkpoints are sharded (DCP), and only rank 0
    writes metrics, the run dir's files and the progress bar.
    """
    with ExitStack() as held:  # the run folder's lock (vaopd.runs.lock_run_folder), for the whole run
        return _train(cfg, resume, overwrite, handle_signals, held)


def _train(cfg: Config, resume: str | bool | None, overwrite: bool, handle_signals: bool, held: ExitStack) -> TrainResult:
    env = init_distributed(cfg.train.device, cfg.distributed.timeout_s) if launched_by_torchrun() else None
    device = env.device if env else resolve_device(cfg)
    main_rank = env is None or env.is_main
    say = tqdm.write if main_rank else (lambda *args, **kwargs: None)
    if env and cfg.log.rollouts_every:
        say("log.rollouts_every: rollouts.jsonl is written by single-process runs only; not under torchrun")
    run_dir = run_dir_of(cfg)
    ckpt, damaged = _start_on_main(env, say, cfg, resume, overwrite, held)
    sharded_ckpt = ckpt is not None and is_sharded_checkpoint(ckpt)
    torch.manual_seed(cfg.train.seed)
    s = build_setup(cfg, device, student_source=str(ckpt / "model") if ckpt and not sharded_ckpt else None)
    if env:
        parallelize(cfg, s, env)
    steps = total_steps(cfg, len(s.train_data))
    val_records = validation_questions(cfg, s.val_data.records) if s.val_data is not None else None
    optimizer, scheduler = build_optimizer(cfg, s.student, steps)
    step, bad = 0, 0
    if ckpt:
        state = load_trainer_state(ckpt)
        if sharded_ckpt:
            load_sharded_state(ckpt, s.student, optimizer)
        elif env:
            load_full_optimizer_state(s.student, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, bad = int(state["step"]), int(state["bad_steps"])
        if env is None:
            # A sharded checkpoint has no RNG state (its ranks reseed per step): do the same here.
            if "rng" in state:
                set_rng_state(state["rng"])
            else:
                torch.manual_seed(rollout_seed(cfg.train.seed, step, 0))
        if state["data_position"] != step * cfg.train.prompts_per_step:
            raise ConfigError(f"train.prompts_per_step: the checkpoint was written with another value "
                              f"(data position {state['data_position']} at step {step})")
    first_step = step
    config_yaml = to_yaml(cfg)
    if main_rank:
        _prepare_run_dir(run_dir, ckpt, damaged, step, overwrite, say)
        for data in (s.train_data, s.val_data):
            if data is not None and data.skipped:
                say(f"data.skip_bad_records: skipped {data.skipped} bad record(s) of {data.source}")
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                           config=to_dict(cfg), resume_step=step if ckpt else None, enabled=main_rank)
    if logger.dropped:
        say(f"--resume: dropped {logger.dropped} line(s) of {logger.path} after step {step}"
            + (" (including a torn last line)" if logger.torn else ""))
    last = step + cfg.train.stop_after if cfg.train.stop_after else steps
    last = min(last, steps)
    result = TrainResult(s.student, s.teacher, step, run_dir, ckpt)
    best = read_best(run_dir) if ckpt and main_rank else None  # rank 0 alone may remove it just below
    result.best = best if best is not None and best["step"] <= step else None  # not one of an abandoned later branch
    if main_rank and result.best is None:
        (run_dir / BEST_FILE).unlink(missing_ok=True)
    validated: dict[int, dict] = {}  # step -> validation record (main rank)

    saved_step = [None]  # the step last written: the final save after a periodic one at that step reuses it

    def save() -> Path:
        if saved_step[0] != step:
            result.checkpoint = write_checkpoint(protect=(result.best["step"],) if result.best else ())
            saved_step[0] = step
        path = result.checkpoint
        val = validated.get(step)
        if val is not None and is_better(val["val_accuracy"], result.best):
            result.best = {"step": step, "val_accuracy": val["val_accuracy"], "val_samples": val["val_samples"],
                           "val_questions": val["val_questions"], "grader": cfg.eval.grader,
                           "checkpoint": path.relative_to(run_dir).as_posix()}
            write_best(run_dir, result.best)
        return path

    def write_checkpoint(protect: tuple[int, ...]) -> Path:
        state = {"step": step, "data_position": step * cfg.train.prompts_per_step, "bad_steps": bad}
        if env:
            return save_sharded_checkpoint(run_dir / "checkpoints", step, model=s.student, optimizer=optimizer,
                                           tokenizer=s.tokenizer, image_processor=s.image_processor,
                                           trainer_state={**state, "scheduler": scheduler.state_dict()},
                                           config_yaml=config_yaml, keep=cfg.train.keep_checkpoints, protect=protect)
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
        return save_checkpoint(run_dir / "checkpoints", step, model=s.student, tokenizer=s.tokenizer,
                               image_processor=s.image_processor, trainer_state=state, config_yaml=config_yaml,
                               keep=cfg.train.keep_checkpoints, protect=protect)

    stop = {"signal": None}
    previous = {}
    if handle_signals:
        def on_signal(signum, frame):
            if stop["signal"] is None:
                say(f"received signal {signum}: finishing the current step, then saving a checkpoint")
            stop["signal"] = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    def stopping() -> bool:
        # A signal may reach only some ranks, or reach them in different steps: agree first.
        return any_rank(stop["signal"] is not None, device) if env else stop["signal"] is not None

    bar = tqdm(total=steps, initial=step, desc=f"{cfg.loss.method}", disable=not (cfg.log.progress and main_rank),
               dynamic_ncols=True)
    stopped = False
    try:
        while step < last and not (stopped := stopping()):
            record = train_step(cfg, s, optimizer, scheduler, step)
            step += 1
            bad = bad + 1 if record["skipped"] else 0
            logger.log(record)
            result.history.append(record)
            if record["skipped"]:
                say(f"step {step}: non-finite loss ({record['loss']}) or gradient norm ({record['grad_norm']}): update skipped")
                if bad >= cfg.train.max_bad_steps:
                    good = latest_checkpoint(run_dir / "checkpoints")
                    raise TrainingAborted(
                        f"{bad} non-finite steps in a row (steps {step - bad + 1}..{step}); stopping. "
                        f"Last good checkpoint: {good if good else 'none'} (left intact). Lower optim.lr or check the data.")
            if record["va_max"] is not None and record["va_max"] < cfg.log.va_warn_threshold:
                say(f"WARNING: step {step}: visual advantage is ~0 on every token (max {record['va_max']:.2e} < "
                           f"{cfg.log.va_warn_threshold:g}): the teacher may not be seeing the images; VA-OPD reduces to "
                           "uniform weights", file=sys.stderr)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}",
                            va=f"{record['va']:.4f}" if record["va"] is not None else "-",
                            hi=f"{record['va_high_share']:.2f}" if record["va_high_share"] is not None else "-",
                            len=f"{record['response_len']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if val_records is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < steps:
                validated[step] = validate(cfg, s, val_records, logger, step, result)
            # No checkpoint right after a skipped step: the last good one must stay the newest. The
            # last step's is saved after its validation: a checkpoint at the last step means validated.
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not record["skipped"] and step < steps:
                result.checkpoint = save()
        if val_records is not None and step == steps and not stopped and step > first_step:
            validated[step] = validate(cfg, s, val_records, logger, step, result)
        if step > first_step:
            result.checkpoint = save()
    finally:
        bar.close()
        logger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result.step = step
    result.stopped_by_signal = stopped
    return result


def _prepare_run_dir(run_dir: Path, ckpt: Path | None, damaged: list[Path], step: int, overwrite: bool, say) -> None:
    """Main rank, once the run is set up: clear a replaced run, or cut a resumed one back to ``step``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
        say(f"removed {tmp}: a temporary folder left by an interrupted save")
    if ckpt is None:
        if overwrite and (removed := clear_run(run_dir)):
            say(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
        (run_dir / "rollouts.jsonl").unlink(missing_ok=True)
        return
    say(f"resuming from {ckpt} (step {step})")
    later, set_aside = remove_later_checkpoints(run_dir / "checkpoints", step, damaged)
    if later:
        say(f"--resume: removed {', '.join(p.name for p in later)}: later than step {step}, they belong to the "
            "abandoned continuation")
    if set_aside:
        say(f"--resume: kept the damaged {', '.join(p.name for p in set_aside)} aside (no longer a checkpoint; "
            "delete it once inspected)")
    rollouts = run_dir / "rollouts.jsonl"
    if rollouts.exists() and truncate_jsonl(rollouts, step)[0]:
        say(f"--resume: dropped the lines of {rollouts} after step {step}")


def validate(cfg: Config, s: Setup, records: list, logger: MetricsLogger, step: int, result: TrainResult) -> dict | None:
    """Sample and grade the validation answers of ``records``; returns the logged record on the
    main rank (None on the others). Under torchrun each rank grades every N-th question on the
    refreshed unsharded replica (seeded by its rank) and the counts are summed."""
    model, seed, par = s.student, cfg.train.seed, s.parallel
    if par is not None:
        par.sync_replica()
        model, seed = par.replica, cfg.train.seed + par.env.rank
        records = records[par.env.rank::par.env.world_size]
    out = {"accuracy": 0.0, "samples": 0, "questions": 0}
    if records:
        out = evaluate(model, s.tokenizer, s.image_processor, records, eos_ids=s.eos_ids, banned_ids=s.banned_ids,
                       samples=cfg.eval.samples, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                       max_new_tokens=cfg.eval.max_new_tokens, batch_prompts=cfg.eval.batch_prompts,
                       instruction=cfg.data.instruction, seed=seed, grader=cfg.eval.grader)
    s.student.train()
    if par is not None:
        totals = reduce_sums({"correct": out["accuracy"] * out["samples"], "samples": float(out["samples"]),
                              "questions": float(out["questions"])}, s.device)
        out = {"accuracy": totals["correct"] / max(totals["samples"], 1.0), "samples": int(totals["samples"]),
               "questions": int(totals["questions"])}
        if not par.env.is_main:
            return None
    # Every question has eval.samples samples, so this accuracy is also avg@k (k = eval.samples).
    record = {"step": step, "val_accuracy": out["accuracy"], "val_samples": out["samples"], "val_questions": out["questions"]}
    logger.log(record)
    result.history.append(record)
    tqdm.write(f"step {step}: validation accuracy {out['accuracy']:.3f} (avg@{cfg.eval.samples} over "
               f"{out['questions']} questions, {cfg.eval.grader})")
    return record


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
