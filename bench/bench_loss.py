"""Forward+backward of the VA-OPD loss against the reference, Liger-Kernel, TRL and the matmul floor."""
import functools

import pytest
import torch

import lossbench
from lossbench import RECORDS
from vaopd.kernels import LossSpec, va_opd_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def reference_loss(shape: lossbench.Shape, method: str) -> float:
    inputs = dict(lossbench.make_inputs(shape, DEVICE))
    if method == "opd":
        inputs["teacher_ablated_hidden"] = None
    return va_opd_loss_reference(**inputs, spec=LossSpec(method=method))[0].item()


def test_loss(benchmark, loss_case, grid):
    impl, shape = loss_case
    if impl == "vaopd-triton" and DEVICE != "cuda" and shape.tokens * shape.vocab > 2**17:
        pytest.skip("the Triton backend only runs in the interpreter on a CPU: timing it means nothing")
    if impl.startswith("liger"):
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (carry its wheel in .whl/)")
    if impl == "trl":
        pytest.importorskip("trl.kernels.chunked_divergence", reason="trl or a dependency is not installed (carry the wheels in .whl/)")
    inputs = lossbench.make_inputs(shape, DEVICE)
    run = lossbench.build(impl, inputs, DEVICE)
    products = lossbench.PRODUCTS[impl]
    record = dict(impl=impl, shape=shape.as_dict(), shape_id=shape.id(), products=list(products), floor=lossbench.FLOORS[lossbench.WORK[impl]], flops=lossbench.product_flops(shape, *products))
    try:
        loss = benchmark.pedantic(run, rounds=grid["rounds"], warmup_rounds=0 if benchmark.disabled else 1, iterations=1)
        if not benchmark.disabled:  # on a CPU in a fresh process, after the timed rounds
            record["peak_extra"] = (lossbench.peak_extra_bytes(run, inputs, DEVICE) if DEVICE == "cuda"
                                    else lossbench.peak_extra_bytes_fresh(impl, shape))
    except torch.cuda.OutOfMemoryError:
        del run
        torch.cuda.empty_cache()
        RECORDS.append(dict(record, oom=True))
        pytest.skip(f"{impl} ran out of GPU memory at {shape.id()}")
    if not benchmark.disabled:
        record["seconds"] = benchmark.stats.stats.median
    if (impl.startswith("vaopd") or impl == "trl") and DEVICE == "cpu":
        record["loss"] = loss.item()
        tol = 1e-4 if shape.dtype == "fp32" else 3e-2
        assert loss.item() == pytest.approx(reference_loss(shape, lossbench.WORK[impl]), rel=tol)
    RECORDS.append(record)
