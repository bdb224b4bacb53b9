"""What the loss benchmarks run: shapes, inputs, the implementations compared, and their FLOPs.

Every implementation is a callable doing one forward and backward of a distillation loss from
hidden states and LM-head weights (student gradients only), finished with a device sync.

- ``vaopd-triton``, ``vaopd-torch``: ``vaopd.kernels.va_opd_loss`` (VA-OPD) on each backend.
- ``vaopd-torch-compiled``: the chunked torch path with its row ops under ``torch.compile``.
- ``vaopd-opd-triton``, ``vaopd-opd-torch``: ``va_opd_loss(spec=LossSpec(method="opd"))`` without an ablated
  view: plain OPD, the same work as Liger's reverse KL.
- ``reference``: ``va_opd_loss_reference`` (full fp32 logits).
- ``liger``, ``liger-compiled``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` with
  ``beta=1`` (reverse KL) and no hard loss: one teacher pass, no VA weighting (OPD's work).
- ``trl``: TRL's ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` with ``beta=1``
  (reverse KL, Triton row kernels on CUDA, torch tiles elsewhere), summed over tokens and divided
  by their count: OPD's work and OPD's value on these inputs (token mean). It recomputes both
  models' logits in backward: 4 student and 2 teacher products.
- ``floor``: the bare bf16/fp32 matrix products VA-OPD must do: student logits, input gradient
  and weight gradient, teacher clean and ablated logits (five products).
- ``floor-opd``: the same without the ablated view (four products), OPD's and Liger's floor.

``PRODUCTS`` says how many LM-head products each one performs (its TFLOP/s); ``WORK`` which loss
it computes, whose floor the report compares it with (``FLOORS``).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import types
from dataclasses import asdict, dataclass

import torch

from vaopd.kernels import LossSpec, torch_ops, va_opd_loss, va_opd_loss_reference
from vaopd.kernels.chunks import DEFAULT_CHUNK_CPU, DEFAULT_CHUNK_GPU
from vaopd.kernels.va_opd import chunked_va_opd_loss

# Tokens per response; responses come in sibling groups of 4 (1,024 tokens), which a chunk of the
# default size holds on either device (GPU 2,048 rows, CPU 1,024): the one-pass VA-OPD path.
RESPONSE_TOKENS = 256
RECORDS: list[dict] = []  # one dict per measurement, summarised at the end of the run


@dataclass(frozen=True)
class Shape:
    tokens: int
    vocab: int
    student_hidden: int
    teacher_hidden: int
    dtype: str  # "bf16" | "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def id(self) -> str:
        return f"N{self.tokens}-V{self.vocab}-D{self.student_hidden}x{self.teacher_hidden}-{self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def product_flops(shape: Shape, student_products: int, teacher_products: int) -> float:
    """FLOPs of LM-head products: ``2 N V D`` each."""
    n, v = shape.tokens, shape.vocab
    return 2.0 * n * v * (student_products * shape.student_hidden + teacher_products * shape.teacher_hidden)


# (student products, teacher products) each implementation performs: logits, input and weight
# gradients; clean (and ablated) teacher logits.
PRODUCTS = {
    "vaopd-triton": (3, 2),  # one pass over whole sibling groups
    "vaopd-torch": (3, 2),
    "vaopd-torch-compiled": (3, 2),
    "vaopd-opd-triton": (3, 1),
    "vaopd-opd-torch": (3, 1),
    "reference": (3, 2),
    "liger": (3, 1),
    "liger-compiled": (3, 1),
    "trl": (4, 2),  # logits of both models again in backward
    "floor": (3, 2),
    "floor-opd": (3, 1),
}


# The loss each implementation computes: VA-OPD (clean and ablated teacher views) or OPD (one view).
WORK = {
    **dict.fromkeys(("vaopd-triton", "vaopd-torch", "vaopd-torch-compiled", "reference", "floor"), "va_opd"),
    **dict.fromkeys(("vaopd-opd-triton", "vaopd-opd-torch", "liger", "liger-compiled", "trl", "floor-opd"), "opd"),
}
FLOORS = {"va_opd": "floor", "opd": "floor-opd"}


@functools.lru_cache(maxsize=1)
def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict:
    """Loss inputs: ``tokens`` valid tokens as responses of up to ``RESPONSE_TOKENS`` in groups of 4.

    Drawn on the device (the Qwen-size heads are ~10^9 numbers) and cached for the next
    implementation at the same shape; each run clears the gradients it leaves.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    t = min(RESPONSE_TOKENS, shape.tokens)
    b = shape.tokens // t
    dt = shape.torch_dtype

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=dt).mul_(scale)

    return dict(
        student_hidden=randn(b, t, shape.student_hidden).requires_grad_(),
        student_weight=randn(shape.vocab, shape.student_hidden, scale=shape.student_hidden**-0.5).requires_grad_(),
        teacher_hidden=randn(b, t, shape.teacher_hidden),
        teacher_ablated_hidden=randn(b, t, shape.teacher_hidden),
        teacher_weight=randn(shape.vocab, shape.teacher_hidden, scale=shape.teacher_hidden**-0.5),
        tokens=torch.randint(0, shape.vocab, (b, t), generator=g, device=device),
        mask=torch.ones(b, t, dtype=torch.bool, device=device),
        group_ids=(torch.arange(b) // 4).to(device),
    )


def _compiled_torch_ops() -> types.SimpleNamespace:
    """The torch row ops compiled whole-chunk (compiled code fuses the temporaries away)."""
    return types.SimpleNamespace(
        lse_gather=torch.compile(torch_ops.lse_gather_rows, dynamic=True),
        logprob_grad_=torch.compile(torch_ops.logprob_grad_rows_, dynamic=True),
        reverse_kl_=torch.compile(torch_ops.reverse_kl_rows_, dynamic=True),
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(impl: str, inputs: dict, device: str):
    """A zero-argument callable running ``impl`` forward+backward on ``inputs``; returns the loss."""
    sh, sw = inputs["student_hidden"], inputs["student_weight"]

    def clear():
        sh.grad = None
        sw.grad = None

    if impl in ("vaopd-triton", "vaopd-torch", "vaopd-opd-triton", "vaopd-opd-torch", "reference"):
        fn = va_opd_loss_reference if impl == "reference" else va_opd_loss
        kwargs = {} if impl == "reference" else {"backend": impl.split("-")[-1]}
        args = dict(inputs)
        if "-opd-" in impl:
            args.update(teacher_ablated_hidden=None, spec=LossSpec(method="opd"))

        def run():
            clear()
            loss, _ = fn(**args, **kwargs)
            loss.backward()
            _sync(device)
            return loss

        return run

    if impl == "vaopd-torch-compiled":
        ops = _compiled_torch_ops()
        names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_ablated_hidden", "teacher_weight", "tokens", "mask", "group_ids")
        args = [inputs[k] for k in names]
        chunk = DEFAULT_CHUNK_GPU if device == "cuda" else DEFAULT_CHUNK_CPU

        def run():
            clear()
            loss, _ = chunked_va_opd_loss(
                *args, spec=LossSpec(), vocab=sw.shape[0], num_prompts=int(inputs["group_ids"].max()) + 1, ops=ops, chunk=chunk,
            )
            loss.backward()
            _sync(device)
            return loss

        return run

    if impl in ("liger", "liger-compiled"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=impl == "liger-compiled")
        h = sh.reshape(-1, sh.shape[-1])
        th = inputs["teacher_hidden"].reshape(-1, inputs["teacher_hidden"].shape[-1])
        labels = inputs["tokens"].reshape(-1)

        def run():
            clear()
            loss = module(h, sw, th, inputs["teacher_weight"], labels)
            loss.backward()
            _sync(device)
            return loss

        return run

    if impl == "trl":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        h = sh.reshape(-1, sh.shape[-1])
        th = inputs["teacher_hidden"].reshape(-1, inputs["teacher_hidden"].shape[-1])

        def run():
            clear()
            kl, _entropy = ChunkedDivergenceFunction.apply(h, sw, None, th, inputs["teacher_weight"], None, 1.0)
            loss = kl.sum() / kl.numel()
            loss.backward()
            _sync(device)
            return loss

        return run

    if impl in ("floor", "floor-opd"):
        h = sh.detach().reshape(-1, sh.shape[-1])
        w = sw.detach()
        th = inputs["teacher_hidden"].reshape(-1, inputs["teacher_hidden"].shape[-1])
        views = [th] if impl == "floor-opd" else [th, inputs["teacher_ablated_hidden"].reshape(-1, th.shape[-1])]
        tw = inputs["teacher_weight"]

        def run():
            logits = h @ w.T  # student logits; reused as the logits gradient below
            for view in views:
                view @ tw.T  # noqa: B018 - teacher logits
            logits @ w  # input gradient
            logits.T @ h  # weight gradient
            _sync(device)

        return run

    raise ValueError(f"unknown implementation {impl!r}")


def peak_extra_bytes(run, inputs: dict, device: str) -> int | None:
    """Peak memory of one ``run`` beyond its inputs, the returned gradients and one fp32
    ``[V, D_S]`` weight-gradient accumulator.

    CUDA: the allocator's peak. CPU: the process's peak resident size (reset through
    ``/proc/self/clear_refs``); meaningful only where freed memory goes back to the OS, as in
    ``peak_extra_bytes_fresh``'s process.
    """
    sw = inputs["student_weight"]
    allowance = sum(x.numel() * x.element_size() for x in (inputs["student_hidden"], sw)) + sw.numel() * 4
    inputs["student_hidden"].grad = None  # the last timed run's gradients are not this run's base
    sw.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident size (VmHWM) to the current one
        except OSError:
            return None
        run()
        peak = (_proc_status_kib("VmHWM") - base) * 1024
    return max(0, peak - allowance)


def peak_extra_bytes_fresh(impl: str, shape: Shape) -> int | None:
    """``peak_extra_bytes`` of ``impl`` on the CPU, measured in a fresh process (after one warm-up
    run) whose glibc hands every freed block of 64 KiB or more back to the OS, so that its resident
    size follows live memory.

    Not in the benchmark's own process: that malloc setting makes every large temporary fault its
    pages in again, which slows the implementations unevenly (at 2,048 x 32,000 fp32, one thread:
    eager OPD 1.9x, its floor 1.3x, compiled Liger 1.2x; ``bench/RESULTS.md``).
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "peak", impl, json.dumps(shape.as_dict())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {impl} at {shape.id()} failed:\n{out.stderr[-2000:]}")
    value = out.stdout.strip().splitlines()[-1]
    return None if value == "None" else int(value)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_main(impl: str, shape_json: str) -> None:
    """``python bench/lossbench.py peak IMPL SHAPE_JSON``: print ``peak_extra_bytes`` on the CPU."""
    import ctypes

    torch.set_num_threads(1)
    try:  # lock the pages mapped so far: machines that page cold memory out proactively would
        ctypes.CDLL("libc.so.6").mlockall(1)  # otherwise count library code faulted back in as growth
    except (OSError, AttributeError):
        pass
    inputs = make_inputs(Shape(**json.loads(shape_json)), "cpu")
    run = build(impl, inputs, "cpu")
    run()  # warm-up: compilation and one-time library allocations are not the loss's memory
    print(peak_extra_bytes(run, inputs, "cpu"))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "peak":
        sys.exit("usage: python bench/lossbench.py peak IMPL SHAPE_JSON")
    _peak_main(sys.argv[2], sys.argv[3])
