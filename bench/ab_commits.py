"""Time the fused loss at two git commits, interleaved, to tell a code change from drift.

Each commit's ``vaopd/`` and ``kernels/`` are extracted with ``git archive`` into a temporary
folder (or given as a folder ``--export`` wrote earlier) and run in their own worker process
(``vaopd`` and ``vaopd.kernels`` imported from that tree, checked at start-up). The
workers build the same inputs (seed 0: responses of 256 tokens in sibling groups of 4, every
token valid, as in ``bench/lossbench.py``), warm up, and then take turns: each round times one
forward + backward of ``va_opd_loss`` (student gradients, device-synchronised) in each worker,
alternating which goes first (ABBA), so slow drift of the machine (clocks, temperature, other
tenants) lands on both. Only the public ``vaopd.kernels.va_opd_loss`` is called, so any two
commits since the loss got its current signature can be compared. On a CPU each worker uses one
thread.

Printed: per commit the median, mean, min, max and interquartile range of the rounds; the
median of the per-round ratios B/A with their 10th-90th percentile range. ``--out FILE`` also
writes every round's times as JSON.

    python bench/ab_commits.py c4da231 fc8189d                      # OPD, paper shape, bf16, 20 rounds
    python bench/ab_commits.py c4da231 fc8189d --method va_opd --rounds 30
    python bench/ab_commits.py HEAD~1 HEAD --tokens 64 --vocab 1031 --hidden 32 48 --dtype fp32 --rounds 3

On the GPU machine (no network; issue 17's OPD question, 45.7 ms at ``c4da231`` against
51.9 ms at ``fc8189d`` on an H200) the copy of the working tree may come without ``.git``: export
the two trees here (about 0.4 MB each, into ``bench/out``, which git ignores) and carry them::

    python bench/ab_commits.py c4da231 fc8189d --export bench/out/ab     # here; carry: ["bench/out/ab"]
    timeout -k 5 150 python3 bench/ab_commits.py bench/out/ab/c4da231 bench/out/ab/fc8189d \\
        --rounds 24 --out "$out/ab_opd.json" 2>&1 | tee "$out/ab_opd.txt"     # there, after bench/gpu_env.sh

Not yet run on a GPU. Expected from the H200 figures: each worker holds about 5 GB at the paper
shape (inputs, the fp32 weight-gradient accumulator, the chunk buffers), a round about 0.1 s, on
top of the start-up and Triton compilation of both workers.

TRL's row in the loss benchmarks on that machine needs TRL and the packages that
``import trl.kernels.chunked_divergence`` pulls in (``trl.trainer.utils`` imports accelerate,
datasets and pandas), as wheels in ``.whl/`` (``bench/gpu_env.sh`` installs them offline with
``--no-deps``; pass ``carry: [".whl"]``). Download them here for the GPU machine's Python 3.12::

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \\
        -d .whl trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \\
        xxhash==4.1.0 fsspec psutil liger-kernel==0.8.5

These are about 4 MB. The machine may lack pandas (a 12 MB wheel: add ``pandas==3.1.1
python-dateutil six tzdata``) or pyarrow (55 MB: ``pyarrow==26.0.1``); check first with
``python3 -c "import pandas, pyarrow"``. Either one fits beside the rest in a call's 64 MiB of
carried files, both do not. Without them the ``trl`` rows are skipped, with that reason, and the
rest of the grid runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESPONSE_TOKENS = 256  # as bench/lossbench.py: sibling groups of 4 responses


# ------------------------------------------------------------------------------------------------
# Worker: one commit's tree, one set of inputs, one timed call per request
# ------------------------------------------------------------------------------------------------


def worker(spec: dict, tree: str) -> None:
    """Serve timing requests on stdin ("run" -> one timed call, seconds on stdout; "quit")."""
    import torch

    import vaopd.kernels
    from vaopd.kernels import va_opd_loss

    loaded = Path(vaopd.kernels.__file__).resolve()
    if not loaded.is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"vaopd.kernels came from {loaded}, not from the extracted tree {tree}: another copy shadows it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # the idle worker's spinning thread pool would slow the timed one
    inputs = make_inputs(spec, device)
    sh, sw = inputs["student_hidden"], inputs["student_weight"]
    try:  # the loss's settings became a LossSpec after the commits this script was written for
        from vaopd.kernels import LossSpec
        kwargs = dict(spec=LossSpec(method=spec["method"]), chunk_size=spec["chunk_size"])
    except ImportError:
        kwargs = dict(method=spec["method"], chunk_size=spec["chunk_size"])
    if spec["method"] == "opd":
        inputs["teacher_ablated_hidden"] = None

    def run() -> float:
        sh.grad = sw.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = va_opd_loss(**inputs, **kwargs)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(spec["warmup"]):
        run()
    print(f"ready {loaded}", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        print(repr(run()), flush=True)


def make_inputs(spec: dict, device: str) -> dict:
    """Seed-0 loss inputs of ``spec``'s shape on ``device`` (the same in every worker)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    t = min(RESPONSE_TOKENS, spec["tokens"])
    b = spec["tokens"] // t
    v, ds, dt = spec["vocab"], *spec["hidden"]

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=dtype).mul_(scale)

    return dict(
        student_hidden=randn(b, t, ds).requires_grad_(),
        student_weight=randn(v, ds, scale=ds**-0.5).requires_grad_(),
        teacher_hidden=randn(b, t, dt),
        teacher_ablated_hidden=randn(b, t, dt),
        teacher_weight=randn(v, dt, scale=dt**-0.5),
        tokens=torch.randint(0, v, (b, t), generator=g, device=device),
        mask=torch.ones(b, t, dtype=torch.bool, device=device),
        group_ids=(torch.arange(b) // 4).to(device),
    )


# ------------------------------------------------------------------------------------------------
# Parent: extract the commits, start a worker for each, alternate
# ------------------------------------------------------------------------------------------------


def resolve(repo: Path, commit: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{commit!r} is not a commit of {repo} (a shallow copy may lack it: fetch it, or copy the repository with its history)")
    return out.stdout.strip()


def extract(repo: Path, sha: str, dest: Path) -> Path:
    """``vaopd/`` and ``kernels/`` of ``sha`` under ``dest``, with ``vaopd.kernels`` importable from it."""
    dest.mkdir(parents=True)
    archive = dest / "tree.tar"
    subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), sha, "vaopd", "kernels"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    # setup.py installs kernels/ as vaopd.kernels; from a bare tree, a link does the same.
    if (dest / "kernels").is_dir() and not (dest / "vaopd" / "kernels").exists():
        (dest / "vaopd" / "kernels").symlink_to("../kernels")
    return dest


class Worker:
    def __init__(self, label: str, tree: Path, spec: dict):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), str(tree)],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def wait_ready(self) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"the worker for {self.label} failed to start (exit {self.proc.wait()}): see its error above")
        return line.split(" ", 1)[1].strip()

    def time_once(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.label} died (exit {self.proc.wait()}): see its error above")
        return float(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def alternate(workers: list[Worker], rounds: int) -> dict[str, list[float]]:
    """``rounds`` timed calls per worker, first A-B, then B-A, and so on."""
    times = {w.label: [] for w in workers}
    for i in range(rounds):
        for w in workers if i % 2 == 0 else workers[::-1]:
            times[w.label].append(w.time_once())
    return times


def summary(times: dict[str, list[float]]) -> str:
    """Per-commit medians and spreads (ms), and the per-round ratio of the second to the first."""
    lines = ["| commit | rounds | median ms | mean ms | min ms | max ms | p25-p75 ms |", "|---|---|---|---|---|---|---|"]
    for label, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        lines.append(f"| {label} | {len(ms)} | {statistics.median(ms):.2f} | {statistics.fmean(ms):.2f} | {ms[0]:.2f} | {ms[-1]:.2f} | {q[0]:.2f}-{q[2]:.2f} |")
    (a, ta), (b, tb) = times.items()
    ratios = sorted(y / x for x, y in zip(ta, tb))
    d = statistics.quantiles(ratios, n=10, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 9
    lines.append(f"\n{b} / {a}, per round: median {statistics.median(ratios):.3f}, 10th-90th percentile {d[0]:.3f}-{d[8]:.3f}")
    return "\n".join(lines)


def is_tree(arg: str) -> bool:
    """True when ``arg`` names a folder holding ``vaopd/`` and ``kernels/`` (an exported tree)."""
    return (Path(arg) / "vaopd").is_dir() and (Path(arg) / "kernels").is_dir()


def export(commits: list[str], dest: Path, repo: Path = REPO) -> list[Path]:
    """Each commit's trees under ``dest/<commit as given>``, for a machine without the history."""
    return [extract(repo, resolve(repo, c), dest / c) for c in commits]


def compare(commits: list[str], spec: dict, rounds: int, repo: Path = REPO) -> dict[str, list[float]]:
    """Times of ``rounds`` alternating calls at each of two commits or exported trees (keys: a
    tree's path; a commit's short sha, after the name given when that is not a sha)."""
    with tempfile.TemporaryDirectory(prefix="vaopd-ab-") as tmp:
        workers = []
        try:
            for i, name in enumerate(commits):
                if is_tree(name):
                    workers.append(Worker(name, Path(name).resolve(), spec))
                    continue
                sha = resolve(repo, name)
                tree = extract(repo, sha, Path(tmp) / f"{i}-{sha[:12]}")
                workers.append(Worker(sha[:7] if sha.startswith(name) else f"{name} ({sha[:7]})", tree, spec))
            for w in workers:
                print(f"{w.label}: vaopd.kernels from {w.wait_ready()}", file=sys.stderr)
            return alternate(workers, rounds)
        finally:
            for w in workers:
                w.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(json.loads(argv[1]), argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("commits", nargs=2, help="two commits (any git revision) or exported trees, A then B")
    p.add_argument("--rounds", type=int, default=20, help="timed calls per commit (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per worker first")
    p.add_argument("--method", choices=["opd", "va_opd"], default="opd")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, nargs=2, default=[2048, 4096], metavar=("D_S", "D_T"))
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--repo", type=Path, default=REPO)
    p.add_argument("--out", type=Path, help="also write the spec and every round's times here (JSON)")
    p.add_argument("--export", type=Path, metavar="DIR", help="only extract the two commits' trees into DIR/<commit>")
    a = p.parse_args(argv)
    if a.export:
        for tree in export(a.commits, a.export, a.repo):
            print(tree)
        return
    if a.rounds < 1 or a.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    spec = dict(method=a.method, tokens=a.tokens, vocab=a.vocab, hidden=a.hidden, dtype=a.dtype, chunk_size=a.chunk_size, warmup=a.warmup)
    times = compare(a.commits, spec, a.rounds, a.repo)
    print(f"{a.method} loss, N {a.tokens}, V {a.vocab}, D {a.hidden[0]}/{a.hidden[1]}, {a.dtype}; forward + backward")
    print(summary(times))
    if a.out:
        a.out.write_text(json.dumps(dict(spec=spec, seconds=times), indent=1))


if __name__ == "__main__":
    main()
