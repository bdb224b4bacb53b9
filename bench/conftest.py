"""Benchmark grids and the end-of-run summary.

The grid follows the device: ``gpu`` with CUDA, ``cpu`` otherwise, and ``smoke`` (tiny shapes, each
implementation once) when benchmarks are disabled, as in CI. ``VAOPD_BENCH_GRID`` overrides it;
``-k`` narrows it further (ids read like ``N8192_V151936_D2048x4096_bf16``). The summary table is
printed at the end and written with JSON and PNG plots to ``VAOPD_BENCH_OUT`` (default ``bench/out``).
"""
from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

from lossbench import RECORDS, Shape

# A grid is a list of blocks, each the product of its tokens, vocab, hidden sizes, dtypes and
# implementations, and a number of timed rounds.
VAOPD = ["vaopd-triton", "vaopd-opd-triton", "floor", "floor-opd"]
PEERS = ["liger", "trl"]  # reverse KL from hidden states: OPD's work
GRIDS = {
    "smoke": dict(rounds=1, blocks=[
        dict(tokens=[64], vocab=[1031], hidden=[(32, 48)], dtype=["fp32"],
             impls=["vaopd-torch", "vaopd-opd-torch", "vaopd-triton", "reference", "liger", "trl", "floor", "floor-opd"]),
    ]),
    "cpu": dict(rounds=3, blocks=[
        dict(tokens=[512, 1024, 2048], vocab=[32000], hidden=[(256, 512)], dtype=["fp32"],
             impls=["vaopd-torch", "vaopd-opd-torch", "reference", "liger", "trl", "floor", "floor-opd"]),
        dict(tokens=[512, 2048], vocab=[32000], hidden=[(256, 512)], dtype=["fp32"], impls=["vaopd-torch-compiled", "liger-compiled"]),
    ]),
    # About 2 minutes on an H100/H200 (Liger's torch.compile warm-up included); bench/gpu_check.sh
    # runs it after the correctness check, the tuning sweep and the scale-step benchmark.
    "gpu": dict(rounds=5, blocks=[
        # The paper's shape over token counts (memory flat in tokens), VA-OPD and OPD with their floors.
        dict(tokens=[1024, 2048, 4096, 8192, 16384], vocab=[151936], hidden=[(2048, 4096)], dtype=["bf16"], impls=VAOPD + PEERS),
        dict(tokens=[8192], vocab=[151936], hidden=[(2048, 4096)], dtype=["bf16"],
             impls=["liger-compiled", "vaopd-torch", "reference"]),
        # Larger hidden sizes, a smaller vocabulary, and fp32 (no TF32).
        dict(tokens=[8192], vocab=[151936], hidden=[(4096, 5120)], dtype=["bf16"], impls=VAOPD + PEERS),
        dict(tokens=[8192], vocab=[32000], hidden=[(2048, 4096)], dtype=["bf16"], impls=VAOPD + PEERS),
        dict(tokens=[4096], vocab=[151936], hidden=[(2048, 4096)], dtype=["fp32"], impls=["vaopd-triton", "floor"]),
    ]),
}


def grid_name(config) -> str:
    name = os.environ.get("VAOPD_BENCH_GRID")
    if name is None:
        disabled = config.getoption("benchmark_disable", False)
        name = "smoke" if disabled else ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in GRIDS:
        raise pytest.UsageError(f"VAOPD_BENCH_GRID must be one of {sorted(GRIDS)}, got {name!r}")
    return name


def cases(name: str):
    for block in GRIDS[name]["blocks"]:
        for dtype in block["dtype"]:
            for vocab in block["vocab"]:
                for ds, dt in block["hidden"]:
                    for tokens in block["tokens"]:
                        shape = Shape(tokens, vocab, ds, dt, dtype)
                        for impl in block["impls"]:
                            yield pytest.param((impl, shape), id=f"{impl}-N{tokens}_V{vocab}_D{ds}x{dt}_{dtype}")


def pytest_generate_tests(metafunc):
    if "loss_case" in metafunc.fixturenames:
        metafunc.parametrize("loss_case", list(cases(grid_name(metafunc.config))))


@pytest.fixture(scope="session")
def grid(request):
    return GRIDS[grid_name(request.config)]


def _title() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    timed = [r for r in RECORDS if r.get("seconds") or r.get("oom")]
    if not timed:
        return
    import report

    out = os.environ.get("VAOPD_BENCH_OUT", os.path.join(os.path.dirname(__file__), "out"))
    table = report.write(RECORDS, out, _title())
    terminalreporter.write_sep("=", "vaopd loss benchmarks")
    terminalreporter.write_line(table)
    terminalreporter.write_line(f"written to {out}/results.md, results.json, time.png, memory.png")
