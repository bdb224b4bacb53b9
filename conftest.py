"""Root pytest configuration.

- Without a CUDA device the Triton kernels can only run under the interpreter, and
  ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel: set it here, before any
  test module imports ``vaopd.kernels``.
- ``pytest bench/ --benchmark`` runs only the benchmarks (an alias of ``--benchmark-only``).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False, help="run only the benchmarks (alias of --benchmark-only)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark"):
        config.option.benchmark_only = True
