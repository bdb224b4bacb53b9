"""Plumbing shared by the chunked ops: the row-op backend, chunk sizes, LM-head products over a
reused buffer and fp32 accumulation of weight gradients."""
from __future__ import annotations

import os
from types import ModuleType

import torch

from . import torch_ops

BACKENDS = ("auto", "triton", "torch")

# Token rows per chunk, C. Memory beyond the inputs and gradients is 1.5 C V elements of the input
# dtype: at the Qwen vocabulary in bf16, 2,048 rows are 890 MiB (under 1 GiB; 893 MiB measured on
# an H100 with the same two buffers in the former two-phase design, bench/RESULTS.md), and the
# products stay efficient (2,048-row chunks were 1 to 3% faster than 1,024 there). A sibling group must fit in a chunk
# for the one-pass VA-OPD path: 4 responses of 512 tokens do. On a CPU the buffers are fp32 (1,024
# rows at a 32K vocabulary: 188 MiB) and the torch row ops add about 16 MiB of temporaries: a
# fifth of the full-logits reference's memory at 2,048 tokens (tests/test_kernel_memory.py).
DEFAULT_CHUNK_GPU = 2048
DEFAULT_CHUNK_CPU = 1024


def row_ops(backend: str, device: torch.device) -> ModuleType:
    """The row-op module for ``backend`` ("auto", "triton" or "torch") on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return torch_ops
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on a CPU use backend='torch', or set "
            "TRITON_INTERPRET=1 before importing vaopd.kernels to run the kernels in Triton's interpreter"
        )
    from . import triton_ops

    return triton_ops


def chunk_rows(chunk_size: int | None, device: torch.device) -> int:
    """``chunk_size`` checked, or the device's default."""
    if chunk_size is None:
        return DEFAULT_CHUNK_GPU if device.type == "cuda" else DEFAULT_CHUNK_CPU
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (token rows per chunk), got {chunk_size!r}")
    return chunk_size


def even_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, end)`` row ranges of at most ``chunk`` rows covering ``[0, n)``."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def wanted(*tensors: torch.Tensor) -> list[bool]:
    """Which of ``tensors`` need a gradient from this call (none under no_grad/inference_mode)."""
    enabled = torch.is_grad_enabled()
    return [enabled and t.requires_grad for t in tensors]


def logits(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``hidden [n, D] @ weight.T`` into the first ``n`` rows of ``buffer``."""
    out = buffer[: hidden.shape[0]]
    torch.matmul(hidden, weight.T, out=out)
    return out


_OUT_DTYPE_ADDMM: dict[torch.device, bool] = {}


def _has_fp32_out_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` accumulates bf16 products into fp32 here."""
    if device not in _OUT_DTYPE_ADDMM:
        ok = False
        if device.type == "cuda":
            try:
                acc = torch.ones(2, 2, device=device)
                a = torch.full((2, 3), 0.5, dtype=torch.bfloat16, device=device)
                torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
                ok = bool((acc == 1.75).all())
            except (RuntimeError, TypeError):
                ok = False
        _OUT_DTYPE_ADDMM[device] = ok
    return _OUT_DTYPE_ADDMM[device]


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b`` with fp32 accumulation: cuBLAS's fp32 output where torch offers it,
    else an fp32 copy of the chunk operands (bounded by the chunk)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, alpha=alpha)
    elif _has_fp32_out_addmm(a.device):
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


def finish_weight_grad(acc: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 accumulator in ``weight``'s dtype."""
    return acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
