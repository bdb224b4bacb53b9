"""The run: a ``Trainer`` whose methods are its parts (build, resume, step, validate, save, run).

``Trainer(cfg, ...).run()`` is what ``vaopd.train.train`` does:

1. ``build``: decide the run folder's fate (``vaopd.runs.start_run``: new, resumed, replaced),
   assemble the setup (``vaopd.build``: models, data, the execution strategy, the rollout engine
   and scorer), the optimizer and the schedule;
2. ``resume``: load a checkpoint's optimizer, schedule, step and RNG state;
3. ``run``: prepare the run folder, then ``step`` until the last step (or a stop signal),
   ``validate`` every ``eval.every`` steps, ``save`` every ``train.checkpoint_every`` steps and at
   the end;
4. ``step``: one optimizer step (``vaopd.step.train_step``), with the rollout log as its hook,
   counting non-finite steps and aborting after ``train.max_bad_steps`` in a row.

The state of a run is the trainer's attributes: ``step``, ``bad_steps``, ``best``, ``validated``
(step -> validation record), ``saved_step`` (the step of the last checkpoint written),
``stop_signal``. Under torchrun every rank runs a trainer; only rank 0 writes the run folder's
files, the metrics and the progress bar.
"""
from __future__ import annotations

import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vaopd.atomic_io import atomic_write_text
from vaopd.build import Setup, build_setup
from vaopd.checkpoint import (CheckpointError, is_sharded_checkpoint, latest_checkpoint, load_sharded_state,
                              load_trainer_state, remove_later_checkpoints, remove_stale_temporaries, rng_state,
                              save_checkpoint, save_sharded_checkpoint, set_rng_state)
from vaopd.config import Config, ConfigError, to_dict, to_yaml
from vaopd.distributed import init_distributed, launched_by_torchrun, load_full_optimizer_state, rollout_seed
from vaopd.eval import evaluate, validation_questions
from vaopd.metrics import JsonlError, MetricsLogger, truncate_jsonl
from vaopd.models import resolve_device
from vaopd.optim import build_optimizer, total_steps
from vaopd.rollout_log import RolloutLog, rollout_log_unavailable
from vaopd.runs import RunFolderError, clear_run, lock_run_folder, run_dir_of, start_run
from vaopd.selection import BEST_FILE, is_better, read_best, write_best
from vaopd.step import train_step

__all__ = ["Trainer", "TrainResult", "TrainingAborted"]


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


class Trainer:
    """One training run of ``cfg``; see the module docstring.

    ``resume``: True (newest intact checkpoint of the run dir) or a checkpoint path;
    ``overwrite``: replace a run already in the run dir (``vaopd.runs``); ``handle_signals``:
    SIGINT/SIGTERM finish the current step, save and stop.
    """

    def __init__(self, cfg: Config, *, resume: str | bool | None = None, overwrite: bool = False,
                 handle_signals: bool = False):
        self.cfg, self.overwrite, self.handle_signals = cfg, overwrite, handle_signals
        self.env = init_distributed(cfg.train.device, cfg.distributed.timeout_s) if launched_by_torchrun() else None
        self.device = self.env.device if self.env else resolve_device(cfg)
        self.is_main = self.env is None or self.env.is_main
        self.run_dir = run_dir_of(cfg)
        self.step = self.bad_steps = 0
        self.best: dict | None = None  # main rank
        self.validated: dict[int, dict] = {}  # step -> validation record (main rank)
        self.saved_step: int | None = None
        self.checkpoint: Path | None = None  # the newest checkpoint of this run
        self.stop_signal: int | None = None
        self.history: list[dict] = []
        self._held = ExitStack()  # the run folder's lock (vaopd.runs.lock_run_folder), until run() ends
        try:
            self.build(resume)
        except BaseException:
            self._held.close()
            raise

    def say(self, *args, **kwargs) -> None:
        """A console line from the main rank (above the progress bar)."""
        if self.is_main:
            tqdm.write(*args, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Parts

    def build(self, resume: str | bool | None) -> None:
        """Decide the run folder's fate, then assemble the setup, optimizer and schedule, and resume."""
        cfg = self.cfg
        self.resumed_from, self.damaged = self._start_on_main(resume)
        self.checkpoint = self.resumed_from
        sharded = self.resumed_from is not None and is_sharded_checkpoint(self.resumed_from)
        torch.manual_seed(cfg.train.seed)
        self.setup: Setup = build_setup(
            cfg, self.device, env=self.env,
            student_source=str(self.resumed_from / "model") if self.resumed_from and not sharded else None)
        s = self.setup
        self.total_steps = total_steps(cfg, len(s.train_data))
        self.val_records = validation_questions(cfg, s.val_data.records) if s.val_data is not None else None
        self.optimizer, self.scheduler = build_optimizer(cfg, s.student, self.total_steps)
        if self.resumed_from is not None:
            self.resume(self.resumed_from)
        self.first_step = self.step
        self.config_yaml = to_yaml(cfg)
        unavailable = rollout_log_unavailable(cfg, self.env is not None) if cfg.log.rollouts_every else None
        if unavailable:
            self.say(f"log.rollouts_every: {unavailable}; this run writes no rollouts.jsonl (set it to null to silence this)")
        self.rollout_log = (RolloutLog(cfg, s, self.run_dir / "rollouts.jsonl")
                            if cfg.log.rollouts_every and not unavailable else None)

    def _start_on_main(self, resume) -> tuple[Path | None, list[Path]]:
        """``vaopd.runs.start_run`` decided by rank 0 alone, holding the run folder's lock, and told
        to every rank (a slower rank must not see rank 0's first writes as an existing run); a
        refusal is raised on every rank."""
        if self.env is None:
            self._held.enter_context(lock_run_folder(self.run_dir))
            return start_run(self.cfg, resume=resume, overwrite=self.overwrite, warn=self.say)
        import torch.distributed as dist

        answer = [None]
        if self.env.is_main:
            try:
                self._held.enter_context(lock_run_folder(self.run_dir))
                ckpt, damaged = start_run(self.cfg, resume=resume, overwrite=self.overwrite, warn=self.say)
                answer[0] = ("ok", (str(ckpt) if ckpt else None, [str(p) for p in damaged]))
            except _REFUSALS as e:
                answer[0] = (type(e).__name__, str(e))
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind != "ok":
            raise {t.__name__: t for t in _REFUSALS}[kind](value)
        ckpt, damaged = value
        return (Path(ckpt) if ckpt else None), [Path(p) for p in damaged]

    def resume(self, ckpt: Path) -> None:
        """Load the checkpoint's optimizer, schedule, step, non-finite count and RNG state (the
        weights were loaded by ``build_setup``, or here from a sharded checkpoint)."""
        cfg, s = self.cfg, self.setup
        state = load_trainer_state(ckpt)
        if is_sharded_checkpoint(ckpt):
            load_sharded_state(ckpt, s.student, self.optimizer)
        elif self.env:
            load_full_optimizer_state(s.student, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.bad_steps = int(state["step"]), int(state["bad_steps"])
        if self.env is None:
            # A sharded checkpoint has no RNG state (its ranks reseed per step): do the same here.
            if "rng" in state:
                set_rng_state(state["rng"])
            else:
                torch.manual_seed(rollout_seed(cfg.train.seed, self.step, 0))
        if state["data_position"] != self.step * cfg.train.prompts_per_step:
            raise ConfigError(f"train.prompts_per_step: the checkpoint was written with another value "
                              f"(data position {state['data_position']} at step {self.step})")

    def prepare_run_dir(self) -> None:
        """Main rank, once the run is set up: clear a replaced run, or cut a resumed one back to its
        step; then write the run's ``config.yaml``."""
        run_dir, ckpt = self.run_dir, self.resumed_from
        run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            self.say(f"removed {tmp}: a temporary folder left by an interrupted save")
        if ckpt is None:
            if self.overwrite and (removed := clear_run(run_dir)):
                self.say(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")
            (run_dir / "rollouts.jsonl").unlink(missing_ok=True)
        else:
            self.say(f"resuming from {ckpt} (step {self.step})")
            later, set_aside = remove_later_checkpoints(run_dir / "checkpoints", self.step, self.damaged)
            if later:
                self.say(f"--resume: removed {', '.join(p.name for p in later)}: later than step {self.step}, they "
                         "belong to the abandoned continuation")
            if set_aside:
                self.say(f"--resume: kept the damaged {', '.join(p.name for p in set_aside)} aside (no longer a "
                         "checkpoint; delete it once inspected)")
            rollouts = run_dir / "rollouts.jsonl"
            if rollouts.exists() and truncate_jsonl(rollouts, self.step)[0]:
                self.say(f"--resume: dropped the lines of {rollouts} after step {self.step}")
        for data in (self.setup.train_data, self.setup.val_data):
            if data is not None and data.skipped:
                self.say(f"data.skip_bad_records: skipped {data.skipped} bad record(s) of {data.source}")
        atomic_write_text(run_dir / "config.yaml", self.config_yaml)

    def train_step(self) -> dict:
        """One optimizer step: log it, count it if non-finite (``TrainingAborted`` after
        ``train.max_bad_steps`` in a row), warn when the visual advantage vanished."""
        cfg = self.cfg
        every = cfg.log.rollouts_every
        hook = self.rollout_log if every and self.step % every == 0 and self.is_main else None
        record = train_step(cfg, self.setup, self.optimizer, self.scheduler, self.step, on_rollout=hook)
        self.step += 1
        self.bad_steps = self.bad_steps + 1 if record["skipped"] else 0
        self.logger.log(record)
        self.history.append(record)
        step = self.step
        if record["skipped"]:
            phase = record["non_finite"]
            values = f" ({record['loss']}, gradient norm {record['grad_norm']})" if phase in ("loss", "gradient") else ""
            self.say(f"step {step}: non-finite {phase}{values}: update skipped")
            if self.bad_steps >= cfg.train.max_bad_steps:
                good = latest_checkpoint(self.run_dir / "checkpoints")
                raise TrainingAborted(
                    f"{self.bad_steps} non-finite steps in a row (steps {step - self.bad_steps + 1}..{step}); stopping. "
                    f"Last good checkpoint: {good if good else 'none'} (left intact). Lower optim.lr or check the data.")
        if record["va_max"] is not None and record["va_max"] < cfg.log.va_warn_threshold:
            self.say(f"WARNING: step {step}: visual advantage is ~0 on every token (max {record['va_max']:.2e} < "
                     f"{cfg.log.va_warn_threshold:g}): the teacher may not be seeing the images; VA-OPD reduces to "
                     "uniform weights", file=sys.stderr)
        return record

    def validate(self) -> dict | None:
        """Sample and grade the validation answers at the current step; returns the logged record
        on the main rank (None on the others). Each process grades its share of the questions
        (``Strategy.validation_share``) on the refreshed sampling model and the counts are summed."""
        cfg, s = self.cfg, self.setup
        strategy = s.strategy
        records, seed = strategy.validation_share(self.val_records, cfg.train.seed)
        strategy.refresh_rollout(s.rollout)
        out = {"accuracy": 0.0, "samples": 0, "questions": 0}
        if records:
            out = evaluate(strategy.sampling_model(), s.tokenizer, s.image_processor, records, eos_ids=s.eos_ids,
                           banned_ids=s.banned_ids, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                           top_p=cfg.eval.top_p, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_prompts=cfg.eval.batch_prompts, instruction=cfg.data.instruction, seed=seed,
                           grader=cfg.eval.grader)
        s.student.train()
        out = strategy.reduce_validation(out)
        if not strategy.is_main:
            return None
        # Every question has eval.samples samples, so this accuracy is also avg@k (k = eval.samples).
        record = {"step": self.step, "val_accuracy": out["accuracy"], "val_samples": out["samples"],
                  "val_questions": out["questions"]}
        self.logger.log(record)
        self.history.append(record)
        tqdm.write(f"step {self.step}: validation accuracy {out['accuracy']:.3f} (avg@{cfg.eval.samples} over "
                   f"{out['questions']} questions, {cfg.eval.grader})")
        self.validated[self.step] = record
        return record

    def save(self) -> Path:
        """Write the checkpoint of the current step (once per step) and update ``best.json`` when
        this step's validation beats the best so far."""
        if self.saved_step != self.step:
            self.checkpoint = self._write_checkpoint(protect=(self.best["step"],) if self.best else ())
            self.saved_step = self.step
        path = self.checkpoint
        val = self.validated.get(self.step)
        if val is not None and is_better(val["val_accuracy"], self.best):
            self.best = {"step": self.step, "val_accuracy": val["val_accuracy"], "val_samples": val["val_samples"],
                         "val_questions": val["val_questions"], "grader": self.cfg.eval.grader,
                         "checkpoint": path.relative_to(self.run_dir).as_posix()}
            write_best(self.run_dir, self.best)
        return path

    def _write_checkpoint(self, protect: tuple[int, ...]) -> Path:
        cfg, s = self.cfg, self.setup
        state = {"step": self.step, "data_position": self.step * cfg.train.prompts_per_step, "bad_steps": self.bad_steps}
        common = dict(tokenizer=s.tokenizer, image_processor=s.image_processor, config_yaml=self.config_yaml,
                      keep=cfg.train.keep_checkpoints, protect=protect)
        if self.env:
            return save_sharded_checkpoint(self.run_dir / "checkpoints", self.step, model=s.student,
                                           optimizer=self.optimizer,
                                           trainer_state={**state, "scheduler": self.scheduler.state_dict()}, **common)
        state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), rng=rng_state())
        return save_checkpoint(self.run_dir / "checkpoints", self.step, model=s.student, trainer_state=state, **common)

    def stopping(self) -> bool:
        """A stop signal arrived (on any rank: a signal may reach only some ranks, or reach them in
        different steps, so the ranks agree first)."""
        return self.setup.strategy.any_rank(self.stop_signal is not None)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is None:
            self.say(f"received signal {signum}: finishing the current step, then saving a checkpoint")
        self.stop_signal = signum

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> TrainResult:
        """Train from the current step to the last one (``train.stop_after`` steps at most)."""
        cfg, s = self.cfg, self.setup
        if self.is_main:
            self.prepare_run_dir()
        self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                                    config=to_dict(cfg), resume_step=self.step if self.resumed_from else None,
                                    enabled=self.is_main)
        if self.logger.dropped:
            self.say(f"--resume: dropped {self.logger.dropped} line(s) of {self.logger.path} after step {self.step}"
                     + (" (including a torn last line)" if self.logger.torn else ""))
        steps = self.total_steps
        last = min(self.step + cfg.train.stop_after if cfg.train.stop_after else steps, steps)
        best = read_best(self.run_dir) if self.resumed_from and self.is_main else None  # rank 0 alone may remove it below
        self.best = best if best is not None and best["step"] <= self.step else None  # not one of an abandoned later branch
        if self.is_main and self.best is None:
            (self.run_dir / BEST_FILE).unlink(missing_ok=True)
        previous = {}
        if self.handle_signals:
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=steps, initial=self.step, desc=f"{cfg.loss.method}",
                   disable=not (cfg.log.progress and self.is_main), dynamic_ncols=True)
        stopped = False
        try:
            while self.step < last and not (stopped := self.stopping()):
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}",
                                va=f"{record['va']:.4f}" if record["va"] is not None else "-",
                                hi=f"{record['va_high_share']:.2f}" if record["va_high_share"] is not None else "-",
                                len=f"{record['response_len']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.val_records is not None and cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < steps:
                    self.validate()
                # No checkpoint right after a skipped step: the last good one must stay the newest. The
                # last step's is saved after its validation: a checkpoint at the last step means validated.
                if (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and not record["skipped"]
                        and self.step < steps):
                    self.save()
            if self.val_records is not None and self.step == steps and not stopped and self.step > self.first_step:
                self.validate()
            if self.step > self.first_step:
                self.save()
        finally:
            bar.close()
            self.logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._held.close()
        return TrainResult(s.student, s.teacher, self.step, self.run_dir, self.checkpoint, self.history,
                           stopped_by_signal=stopped, best=self.best)
