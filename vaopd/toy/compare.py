"""``python -m vaopd.toy.compare --regime original|paper --out runs/toy``: the whole OPD vs VA-OPD comparison on the toy task.

Two regimes (``REGIMES``), each a set of ``Settings`` and a trainer config:

- ``original`` (``configs/toy.yaml``): short answers (~22 tokens), a student SFT'd briefly that reads
  the digits at chance, rollouts at temperature 1, lr 2e-3, 3 seeds.
- ``paper``, the regime the method is claimed for (``configs/toy_paper.yaml``): answers with a
  reasoning scaffold of ~43 tokens around the two digit readings (so the visually grounded tokens
  are sparse), a student SFT'd until it reads most digits but relies on the image less than the
  teacher, rollouts at temperature 0.7 / top-p 0.95, a learning rate an order of magnitude lower
  (2e-4, chosen by an OPD-only sweep, ``--sweep-lr``, then used unchanged for VA-OPD), 5 seeds.

1. Write the task's splits (``OUT/data``) with the regime's answer template.
2. SFT the teacher until it reads the digits, and the student briefly (``OUT/teacher``,
   ``OUT/student``; both are reused when already there, so a rerun only redoes the comparison).
3. Measure the starting point on the test split: teacher and student accuracy per question kind,
   the visual profile of the student's rollouts (the teacher's VA concentration, the student's own
   visual reliance; see ``vaopd.toy.analysis``), and the teacher-forced measurements at the digit
   readings (reading accuracy, VA of teacher and student, KL at correct and at wrong readings;
   ``vaopd.toy.readings``).
   Also where each objective puts its loss weight on the student's own rollouts: the share on
   right and on wrong digit readings (``vaopd.toy.readings.loss_weight_probe``).
4. For every seed, distil the student with each objective of ``--methods`` (``opd``, ``va_opd``,
   and VA-OPD with another visual-advantage estimator, ``va_opd:two_sided`` or
   ``va_opd:distribution``) under the regime's config: the same student checkpoint, data order,
   steps and settings, only ``loss.method`` and ``loss.va`` differ
   (``OUT/runs/<method>_s<seed>``, ``:`` written ``_``, with ``rollouts.jsonl`` for the inspect
   page). Then measure each final student the same way; a finished run's measurements are kept in
   its ``result.json`` and reused by a rerun with the same settings. Jobs run in ``--workers``
   processes with one thread each: these models are too small for threads to help, and the
   machine has two cores.
5. Write ``OUT/results.json``, ``OUT/results.md`` (the tables, with each objective minus OPD
   paired by seed: mean and a 95 % t-interval) and ``OUT/inspect/`` (HTML page and curves, as
   ``python -m vaopd.inspect OUT/runs`` would).

``--quick`` shrinks everything for a smoke test.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
import multiprocessing

import torch

from vaopd import torchvision_ops  # noqa: F401  first: transformers may import torchvision (see there)
from vaopd.toy.readings import OBJECTIVES

__all__ = ["Settings", "REGIMES", "QUICK", "settings_for", "paired_differences", "t_quantile", "sweep", "run", "main"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class Settings:
    regime: str = "original"
    config: str = "toy.yaml"  # the trainer config, in configs/
    template: str = "short"  # answer template (vaopd.toy.task.TEMPLATES)
    data_seed: int = 0
    train_size: int = 2000
    val_size: int = 64
    test_size: int = 200
    teacher_steps: int = 900
    teacher_lr: float = 3e-3
    student_steps: int = 150
    student_lr: float = 3e-3
    # The tiny student preset's 0.02 init does not learn to read digits in a CPU budget (measured:
    # still at chance after 150 distillation steps); at 0.2 it does after ~250 SFT steps, so a
    # brief SFT leaves it with the format but not the reading.
    student_init_range: float = 0.2
    sft_batch: int = 32
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: ["opd", "va_opd"])
    sweep_lrs: list[float] = field(default_factory=list)  # non-empty: the OPD learning-rate sweep instead
    distill_steps: int = 300
    # Test-time sampling for accuracy and for the visual profiles.
    eval_samples: int = 2
    eval_temperature: float = 1.0
    profile_samples: int = 2
    # Draws per digit-reading position (vaopd.toy.readings), at the config's rollout temperature and top-p.
    reading_samples: int = 8
    max_new_tokens: int = 32
    workers: int = 2
    extra: list[str] = field(default_factory=list)  # --set overrides for the distillation runs


REGIMES: dict[str, dict] = {
    "original": {},
    # SFT lengths (scaffold template, measured in docs/toy-results.md): the teacher reads all digits
    # after 900 steps. The student (init 0.2) leaves the no-information plateau after ~250 steps and
    # the outcome is sharp in the step count: after 600 it answers 28 % of the digit questions, after
    # 650 it reads 62 % of the digits (--student-steps 650), after 700 it reads 99 % of them but with
    # about 2/3 of the teacher's VA on them.
    "paper": dict(regime="paper", config="toy_paper.yaml", template="scaffold", student_steps=700,
                  seeds=[0, 1, 2, 3, 4], distill_steps=100, max_new_tokens=64),
}

QUICK = dict(train_size=64, val_size=8, test_size=16, teacher_steps=4, student_steps=2, sft_batch=8, seeds=[0],
             distill_steps=2, eval_samples=1, profile_samples=1, max_new_tokens=24, workers=1,
             reading_samples=2, extra=["train.prompts_per_step=2", "rollout.samples_per_prompt=2", "eval.every=1",
                                       "log.rollouts_every=1"])


def settings_for(regime: str, quick: bool = False) -> Settings:
    """The regime's settings, shrunk to the smoke-test sizes when ``quick``."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {sorted(REGIMES)}, got {regime!r}")
    return Settings(**{**REGIMES[regime], **(QUICK if quick else {})})


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _kinds(rows: dict[str, dict]) -> dict[str, str]:
    return {k: r["kind"] for k, r in rows.items()}


def _measure(model_dir: Path, teacher_dir: Path, data: Path, st: Settings, seed: int) -> dict:
    """Accuracy per kind and the visual profile of ``model_dir`` on the test split."""
    from vaopd.config import load_config
    from vaopd.toy.analysis import accuracy_by_kind, visual_profile
    from vaopd.toy.readings import loss_weight_probe, reading_probe
    from vaopd.toy.sft import load_split
    from vaopd.models import load_pretrained

    cfg = load_config(CONFIGS / st.config)
    cpu = torch.device("cpu")
    model, tokenizer, image_processor = load_pretrained(cfg, str(model_dir), cpu, trainable=False)
    teacher, _, _ = load_pretrained(cfg, str(teacher_dir), cpu, trainable=False)
    model.eval()
    teacher.eval()
    records, rows = load_split(data / "test.jsonl")
    kinds = _kinds(rows)
    return {
        "accuracy": accuracy_by_kind(model, tokenizer, image_processor, records, kinds, samples=st.eval_samples,
                                     temperature=st.eval_temperature, max_new_tokens=st.max_new_tokens, seed=seed),
        "profile": visual_profile(model, teacher, tokenizer, image_processor, records, kinds, samples=st.profile_samples,
                                  temperature=st.eval_temperature, max_new_tokens=st.max_new_tokens, seed=seed,
                                  high_fraction=cfg.loss.high_fraction, pixelate_factor=cfg.loss.pixelate_factor),
        "readings": reading_probe(model, teacher, tokenizer, image_processor, records, rows, samples=st.reading_samples,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=seed,
                                  pixelate_factor=cfg.loss.pixelate_factor),
        "weights": loss_weight_probe(model, teacher, tokenizer, image_processor, records, rows,
                                     samples=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                                     top_p=cfg.rollout.top_p, max_new_tokens=st.max_new_tokens, seed=seed,
                                     pixelate_factor=cfg.loss.pixelate_factor, high_fraction=cfg.loss.high_fraction,
                                     high_weight=cfg.loss.high_weight, weight_temperature=cfg.loss.weight_temperature),
    }


def _measure_job(model_dir: Path, teacher_dir: Path, data: Path, st: Settings, seed: int) -> dict:
    """``_measure`` in a worker process (one thread)."""
    torch.set_num_threads(1)
    return _measure(model_dir, teacher_dir, data, st, seed)


def run_name(method: str) -> str:
    """A run folder's name for an objective label (``va_opd:two_sided`` -> ``va_opd_two_sided``)."""
    return method.replace(":", "_")


def _distill(out: Path, st: Settings, method: str, seed: int, lr: float | None = None) -> dict:
    """One distillation run and the measurement of its final student (runs in a worker process).

    ``method``: an objective label (``vaopd.toy.readings.OBJECTIVES``). ``lr``: None for the
    config's learning rate (``OUT/runs/<name>_s<seed>``), else a sweep point
    (``OUT/sweep/<name>_lr<lr>_s<seed>``). A run whose ``result.json`` records the same settings
    is not run again: its result is returned.
    """
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    from vaopd.config import load_config
    from vaopd.train import train

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    name = run_name(method)
    run_dir = out / "runs" / f"{name}_s{seed}" if lr is None else out / "sweep" / f"{name}_lr{lr:g}_s{seed}"
    data = out / "data"
    loss_method, _, va = method.partition(":")
    stamp = {"settings": {k: v for k, v in asdict(st).items() if k not in ("seeds", "methods", "workers", "sweep_lrs")},
             "method": method, "seed": seed, "lr": lr}
    done = run_dir / "result.json"
    if done.is_file():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.get("stamp") == json.loads(json.dumps(stamp)):
            return saved["result"]
    cfg = load_config(CONFIGS / st.config, [
        f"model.student={out / 'student'}", f"model.teacher={out / 'teacher'}",
        f"data.train={data / 'train.jsonl'}", f"data.val={data / 'val.jsonl'}",
        f"train.run_dir={run_dir}", f"train.seed={seed}", f"loss.method={loss_method}", f"loss.va={va or 'sampled'}",
        f"train.max_steps={st.distill_steps}", f"rollout.max_new_tokens={st.max_new_tokens}",
        f"eval.max_new_tokens={st.max_new_tokens}", *st.extra, *([f"optim.lr={lr}"] if lr is not None else []),
    ])
    start = time.perf_counter()
    result = train(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    measured = _measure(result.checkpoint / "model", out / "teacher", data, st, seed=1000 + seed)
    # The share of its own objective's weight on the readings, the number compared across methods.
    measured["weights"]["own"] = measured["weights"][method]
    run = {"method": method, "seed": seed, "lr": cfg.optim.lr, "train_seconds": seconds, "run_dir": str(run_dir), **measured}
    done.write_text(json.dumps({"stamp": stamp, "result": run}, indent=1), encoding="utf-8")
    return run


def _sft(out: Path, st: Settings) -> dict:
    from vaopd.config import load_config
    from vaopd.toy.sft import sft_model

    cfg = load_config(CONFIGS / st.config)
    train_file = out / "data" / "train.jsonl"
    data_digest = hashlib.sha256(train_file.read_bytes()).hexdigest()
    times = {}
    for preset, steps, lr, init in (("teacher", st.teacher_steps, st.teacher_lr, None),
                                    ("student", st.student_steps, st.student_lr, st.student_init_range)):
        target = out / preset
        # What the model was trained with: a folder made with other settings or data is not reused.
        stamp = {"preset": preset, "steps": steps, "lr": lr, "init_range": init, "batch": st.sft_batch,
                 "seed": st.data_seed, "instruction": cfg.data.instruction, "min_pixels": cfg.data.min_pixels,
                 "max_pixels": cfg.data.max_pixels, "train_data_sha256": data_digest}
        if (target / "config.json").is_file():
            stamp_file = target / "sft.json"
            found = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
            if found != stamp:
                differ = sorted(k for k in stamp if found is None or found.get(k) != stamp[k])
                raise SystemExit(f"{target} holds a model SFT'd with other settings or data ({', '.join(differ)}"
                                 f"{'; no sft.json' if found is None else ''}): pass another --out, or remove it")
            _log(f"{preset}: reusing {target}")
            continue
        _log(f"{preset}: SFT for {steps} steps")
        start = time.perf_counter()
        sft_model(preset, train_file, target, steps=steps, batch_size=st.sft_batch, lr=lr,
                  seed=st.data_seed, instruction=cfg.data.instruction, min_pixels=cfg.data.min_pixels,
                  max_pixels=cfg.data.max_pixels, init_range=init, log=_log)
        (target / "sft.json").write_text(json.dumps(stamp, indent=1))
        times[preset] = time.perf_counter() - start
    return times


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    """Nested measurements as ``{"a.b.c": value}``, numbers only."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _measurements(run: dict) -> dict[str, float]:
    return _flat({k: run[k] for k in ("accuracy", "profile", "readings", "weights") if k in run})


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom.

    Bisection on the CDF, ``0.5 + integral_0^x pdf``, with the density integrated by Simpson's rule
    (no SciPy here); accurate to ~1e-6 for the 95 % intervals used below (t(0.975, 4) = 2.7764).
    """
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def paired_differences(runs: list[dict], level: float = 0.95, method: str = "va_opd", baseline: str = "opd") -> dict[str, dict]:
    """``method`` minus ``baseline`` for every measurement, paired by seed: mean and a ``level`` t-interval.

    Only seeds with both methods count. With ``n`` pairs and differences ``d``, the interval is
    ``mean(d) +- t((1 + level) / 2, n - 1) * sd(d) / sqrt(n)`` (NaN bounds for a single pair).
    """
    by = {(r["method"], r["seed"]): _measurements(r) for r in runs}
    seeds = sorted({s for m, s in by if ((baseline, s) in by and (method, s) in by)})
    out = {}
    if not seeds:
        return out
    for key in by[(baseline, seeds[0])]:
        d = [by[(method, s)].get(key, math.nan) - by[(baseline, s)].get(key, math.nan) for s in seeds]
        d = [x for x in d if not math.isnan(x)]
        if not d:
            continue
        mean = statistics.fmean(d)
        half = (t_quantile((1 + level) / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
                if len(d) > 1 else math.nan)
        out[key] = {"mean": mean, "low": mean - half, "high": mean + half, "n": len(d)}
    return out


def _summary(rows: list[dict]) -> dict:
    """Mean and sample std over seeds of every number of the per-run measurements."""
    flats = [_measurements(r) for r in rows]
    out = {}
    for key in flats[0]:
        values = [f[key] for f in flats if key in f and not math.isnan(f[key])]
        out[key] = {"mean": statistics.fmean(values) if values else math.nan,
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


READING_COLUMNS = [
    ("accuracy.detail", "acc. digits"), ("accuracy.coarse", "acc. squares"),
    ("readings.all.reading_accuracy", "digits read right"), ("readings.all.student_va", "student VA on digits"),
    ("readings.all.teacher_va", "teacher VA on digits"), ("readings.all.kl", "KL at digits"),
    ("readings.all.kl_correct", "KL at right readings"), ("readings.all.kl_wrong", "KL at wrong readings"),
    ("readings.first.kl_correct", "KL at right first readings"), ("readings.first.kl_wrong", "KL at wrong first readings"),
]
WEIGHT_COLUMNS = [
    ("weights.own.wrong", "own weight on wrong readings"), ("weights.own.right", "own weight on right readings"),
    ("weights.own.per_wrong_token", "own weight per wrong reading / mean"),
    ("weights.opd.wrong", "OPD weight on wrong"), ("weights.va_opd.wrong", "sampled VA weight on wrong"),
    ("weights.va_opd:two_sided.wrong", "two-sided VA weight on wrong"),
    ("weights.va_opd:distribution.wrong", "distribution VA weight on wrong"),
    ("weights.counts.wrong_readings", "wrong readings"), ("weights.counts.readings", "readings"),
]
PROFILE_COLUMNS = [
    ("profile.detail.student_reliance_per_token", "student reliance / token (detail)"),
    ("profile.detail.student_reliance_high_tokens", "student reliance on teacher-high tokens (detail)"),
    ("profile.coarse.student_reliance_per_token", "student reliance / token (coarse)"),
    ("profile.detail.teacher_high_share", "teacher VA share of top 20 % (detail)"),
    ("profile.detail.teacher_frac_tokens_80pct", "tokens holding 80 % of VA (detail)"),
    ("profile.coarse.teacher_high_share", "teacher VA share of top 20 % (coarse)"),
]


def _table(results: dict) -> str:
    """The markdown tables of results.md."""
    def cell(stats: dict, key: str) -> str:
        s = stats.get(key)
        if s is None or math.isnan(s["mean"]):
            return "-"
        # Weight shares on the readings are fractions of a percent for a good reader: 4 decimals.
        d = 4 if key.startswith("weights.") and key.endswith((".wrong", ".right")) else 3
        if "low" in s:
            return f"{s['mean']:+.{d}f} [{s['low']:+.{d}f}, {s['high']:+.{d}f}]" if s["n"] > 1 else f"{s['mean']:+.{d}f}"
        return f"{s['mean']:.{d}f} ± {s['std']:.{d}f}" if s["n"] > 1 else f"{s['mean']:.{d}f}"

    # The teacher's row measures it on its own rollouts and against itself (KL 0): what reading the digits looks like.
    rows = [("teacher (SFT, own rollouts)", _summary([results["teacher"]])),
            ("student before (SFT)", _summary([results["student_before"]]))]
    for method, summary in results["summary"].items():
        n = len([r for r in results["runs"] if r["method"] == method])
        rows.append((f"{method} after ({n} seeds)", summary))
    for method, diff in results.get("difference", {}).items():
        if diff:
            n = next(iter(diff.values()))["n"]
            rows.append((f"{method} - opd (paired by seed, n={n}; mean [95 % t-interval])", diff))
    lines = [f"Regime `{results['settings']['regime']}`, student SFT {results['settings']['student_steps']} steps, seeds "
             f"{sorted({r['seed'] for r in results['runs']})} (mean ± sample std over seeds; the last rows: paired differences).", ""]
    for columns in (READING_COLUMNS, WEIGHT_COLUMNS, PROFILE_COLUMNS):
        lines += ["| model | " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
        for name, stats in rows:
            lines.append(f"| {name} | " + " | ".join(cell(stats, c[0]) for c in columns) + " |")
        lines.append("")
    lines += ["Teacher VA on the student's digit readings (training rollouts of all seeds, `rollouts.jsonl`):", "",
              "| run | reading | tokens | mean teacher VA | share in high group |", "|---|---|---|---|---|"]
    for method, groups in results.get("digit_readings", {}).items():
        for key, g in groups.items():
            lines.append(f"| {method} | {key} | {g['tokens']} | {g['mean_va']:.3f} | {g['high_rate']:.3f} |")
    return "\n".join(lines)


def _prepare(out: Path, st: Settings, pool) -> tuple[dict, dict, dict]:
    """Splits, SFT and the starting point (teacher and student measured on the test split).

    The starting point is a deterministic function of the models and settings (fixed sampling
    seeds), so it is kept in ``OUT/start.json`` and reused while neither changes.
    """
    from vaopd.toy.task import write_splits

    timings: dict[str, float] = {}
    data = out / "data"
    sizes = {"train": st.train_size, "val": st.val_size, "test": st.test_size}
    stamp = data / "sizes.json"
    wanted = json.dumps({"seed": st.data_seed, "template": st.template, **sizes})
    if not stamp.is_file() or stamp.read_text() != wanted:
        _log(f"writing the task's splits to {data} {sizes}, template {st.template}")
        write_splits(data, st.data_seed, sizes, template=st.template)
        stamp.write_text(wanted)
    timings["sft"] = sum(_sft(out, st).values())
    cache = out / "start.json"
    key = {"config": st.config, "data": wanted, "samples": [st.eval_samples, st.profile_samples, st.reading_samples],
           "measurements": ["accuracy", "profile", "readings", "weights"],
           "eval_temperature": st.eval_temperature, "max_new_tokens": st.max_new_tokens,
           "models": [(out / m / "model.safetensors").stat().st_mtime for m in ("teacher", "student")]}
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") == json.loads(json.dumps(key)):
        _log(f"reusing the starting point measured in {cache}")
        return saved["teacher"], saved["student_before"], timings
    _log("measuring the teacher and the starting student on the test split")
    start = time.perf_counter()
    futures = [pool.submit(_measure_job, out / m, out / "teacher", data, st, 999) for m in ("teacher", "student")]
    teacher, before = (f.result() for f in futures)
    timings["measure_before"] = time.perf_counter() - start
    cache.write_text(json.dumps({"key": key, "teacher": teacher, "student_before": before}, indent=1), encoding="utf-8")
    return teacher, before, timings


def _distill_all(out: Path, st: Settings, pool, jobs: list[tuple]) -> list[dict]:
    """``_distill`` for every ``(method, seed, lr)`` of ``jobs`` in the pool; results in job order."""
    _log(f"{len(jobs)} distillation runs of {st.distill_steps} steps in {st.workers} worker(s)")
    runs = []
    for f in [pool.submit(_distill, out, st, *job) for job in jobs]:
        runs.append(f.result())
        r = runs[-1]
        _log(f"{r['method']} seed {r['seed']} lr {r['lr']:g}: accuracy {r['accuracy']} ({r['train_seconds']:.0f} s training)")
    return runs


class _Serial:
    """The ``submit`` of a process pool, run in this process (``--workers 1``)."""

    class _Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def submit(self, fn, *args):
        return self._Done(fn(*args))


def _pool(st: Settings):
    return (ProcessPoolExecutor(st.workers, mp_context=multiprocessing.get_context("spawn")) if st.workers > 1
            else contextlib.nullcontext(_Serial()))


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    from vaopd.inspect import read_jsonl

    return [(r["step"], r["val_accuracy"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "val_accuracy" in r]


def sweep(out: str | Path, st: Settings) -> dict:
    """OPD alone at each of ``st.sweep_lrs`` (the learning-rate sweep); writes ``OUT/sweep.json`` and ``OUT/sweep.md``.

    The selection rule (stated before the sweep ran, docs/toy-results.md): the learning rate
    with the highest mean validation accuracy over the evaluations in the second half of the run,
    averaged over the sweep's seeds.
    """
    from vaopd.inspect import read_jsonl

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with _pool(st) as pool:
        teacher, before, _ = _prepare(out, st, pool)
        runs = _distill_all(out, st, pool, [("opd", s, lr) for lr in st.sweep_lrs for s in st.seeds])
    rows = []
    for lr in st.sweep_lrs:
        mine = [r for r in runs if r["lr"] == lr]
        late = [a for r in mine for step, a in _val_curve(Path(r["run_dir"])) if step > st.distill_steps / 2]
        kls = [m["kl"] for r in mine for m in read_jsonl(Path(r["run_dir"]) / "metrics.jsonl")
               if "kl" in m and m["step"] > 0.8 * st.distill_steps]
        summary = _summary(mine)
        rows.append({"lr": lr, "val_accuracy_late": statistics.fmean(late) if late else math.nan,
                     "train_kl_last_20pct": statistics.fmean(kls) if kls else math.nan,
                     **{k: summary[k]["mean"] for k in ("accuracy.detail", "accuracy.coarse", "readings.all.reading_accuracy",
                                                        "readings.all.kl", "readings.all.student_va") if k in summary}})
    best = max(rows, key=lambda r: (r["val_accuracy_late"], -r["lr"]))
    results = {"settings": asdict(st), "teacher": teacher, "student_before": before, "runs": runs, "rows": rows,
               "chosen_lr": best["lr"]}
    (out / "sweep.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    keys = list(rows[0])
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] +
                       ["| " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |" for r in rows])
    (out / "sweep.md").write_text(f"{table}\n\nchosen lr: {best['lr']:g}\n", encoding="utf-8")
    _log(f"sweep done: chosen lr {best['lr']:g}\n{table}")
    return results


def run(out: str | Path, st: Settings) -> dict:
    """The full comparison into ``out``; returns what ``results.json`` holds."""
    from vaopd.inspect import find_runs, plot_curves, read_jsonl, render_page
    from vaopd.toy.digits import digit_token_stats

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # One thread: these models are too small for intra-op threads to pay off on a shared 2-core box.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = out / "data"
    with _pool(st) as pool:
        teacher, before, timings = _prepare(out, st, pool)
        _log(f"teacher accuracy {teacher['accuracy']}, student accuracy {before['accuracy']}")
        start = time.perf_counter()
        runs = _distill_all(out, st, pool, [(m, s, None) for s in st.seeds for m in st.methods])
        timings["distill"] = time.perf_counter() - start
    results = {
        "settings": asdict(st), "teacher": teacher, "student_before": before, "runs": runs,
        "summary": {m: _summary([r for r in runs if r["method"] == m]) for m in st.methods},
        "difference": {m: paired_differences(runs, method=m) for m in st.methods if m != "opd"},
    }
    run_dirs = find_runs(out / "runs")
    train_rows = {r["id"]: r for r in read_jsonl(data / "train.jsonl")}
    results["digit_readings"] = digit_token_stats(run_dirs, train_rows)
    curves = plot_curves(run_dirs, out / "inspect" / "curves.png")
    render_page(run_dirs, out / "inspect", curves.name if curves else None)
    timings["total"] = time.perf_counter() - t0
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "results.md").write_text(_table(results) + "\n", encoding="utf-8")
    _log(f"done in {timings['total']:.0f} s: {out / 'results.md'}, {out / 'inspect' / 'index.html'}")
    print(_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.toy.compare", description="OPD vs VA-OPD on the toy task.")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="original",
                        help="original: short answers, chance-level student, lr 2e-3; paper: the paper's regime (module doc)")
    parser.add_argument("--out", default="runs/toy")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per run")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--methods", nargs="+", choices=list(OBJECTIVES), default=None,
                        help="distil with these objectives (va_opd:<loss.va> for another VA estimator; "
                             "the learning-rate sweep runs OPD alone)")
    parser.add_argument("--student-steps", type=int, default=None, help="SFT steps of the student (how well it starts)")
    parser.add_argument("--sweep-lr", type=float, nargs="+", default=None, metavar="LR",
                        help="instead of the comparison: OPD alone at each learning rate (OUT/sweep.md)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the pipeline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer override for the distillation runs")
    args = parser.parse_args(argv)
    st = settings_for(args.regime, args.quick)
    if args.seeds is not None:
        st.seeds = args.seeds
    if args.steps is not None:
        st.distill_steps = args.steps
    if args.workers is not None:
        st.workers = args.workers
    if args.methods is not None:
        st.methods = args.methods
    if args.student_steps is not None:
        st.student_steps = args.student_steps
    st.extra = st.extra + list(args.set)
    if args.sweep_lr:
        st.sweep_lrs = args.sweep_lr
        sweep(args.out, st)
    else:
        run(args.out, st)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
