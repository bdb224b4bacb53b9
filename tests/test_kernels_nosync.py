"""The fused loss's chunk loop never waits on the device.

A host-device synchronisation is an op whose result the host must read (``.item()``, ``bool()``,
``int()``, ``.tolist()``) or whose output size depends on tensor values (``nonzero``, a boolean
mask index, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``...). On a
CPU nothing waits, so the test looks for the ops themselves: a ``TorchDispatchMode`` (plus a
patched ``Tensor.tolist``, which does not dispatch) is active for the whole of
``distill_forward``, the chunk loop, and fails on any of them. Inputs are fp32/bf16: fp16 rows
take one documented wait per chunk (``_scaled_rows``).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vaopd.kernels.va_opd as va_opd
from helpers import clone_inputs, make_inputs
from vaopd.kernels import LossSpec, va_opd_loss

aten = torch.ops.aten
V = 211
# Ops whose outputs the host must see before it can go on.
SYNC_OPS = {
    aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
    aten.unique_consecutive, aten.repeat_interleave, aten.bincount, aten.equal, aten.is_nonzero, aten.allclose,
}


class SyncDetector(TorchDispatchMode):
    """Records every host-device synchronisation dispatched while active (see the module doc)."""

    def __init__(self):
        super().__init__()
        self.syncs, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        packet = func.overloadpacket
        if packet in SYNC_OPS and not (packet is aten.repeat_interleave and kwargs.get("output_size") is not None):
            self.syncs.append(str(func))
        elif packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        detector = self

        def tolist(tensor):
            detector.syncs.append("Tensor.tolist")
            return detector._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_the_detector_sees_each_kind_of_sync():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    for sync in (
        lambda: x[0].item(), lambda: bool(mask.any()), lambda: int(x.max()), lambda: float(x.sum()), lambda: x.tolist(),
        lambda: mask.nonzero(), lambda: x[mask], lambda: x.masked_select(mask), lambda: torch.unique(x),
        lambda: x.clone().__setitem__(mask, 0.0), lambda: torch.topk(x, int(mask.sum())),
    ):
        with SyncDetector() as detector:
            sync()
        assert detector.syncs, sync
    with SyncDetector() as detector:
        torch.where(mask, x, 0.0).topk(2).values.index_select(0, torch.tensor([1]))
    assert detector.syncs == []


@pytest.fixture
def loop_detector(monkeypatch):
    """A ``SyncDetector`` active over every ``distill_forward`` call (the chunk loops)."""
    detector, inner = SyncDetector(), va_opd.distill_forward

    def watched(*args, **kwargs):
        with detector:
            return inner(*args, **kwargs)

    monkeypatch.setattr(va_opd, "distill_forward", watched)
    return detector


def grouped(groups, lengths, dtype=torch.float32, t=8):
    inputs = make_inputs(b=len(groups), t=t, ds=16, dt=16, v=V, groups=torch.tensor(groups), dtype=dtype, seed=3)
    inputs["mask"] = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return inputs


# Groups of 9, 4, 13 and 6 valid tokens (out of order, an empty response among them) in chunks of 16.
GROUPS, LENGTHS = [0, 2, 0, 1, 2, 2, 3, 1], [5, 4, 4, 0, 1, 8, 6, 4]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, kl_estimator", [("va_opd", "full"), ("va_opd", "sampled"), ("opd", "full"), ("opd", "sampled")])
def test_the_one_pass_loop_never_waits_on_the_device(loop_detector, backend, dtype, method, kl_estimator):
    inputs = clone_inputs(grouped(GROUPS, LENGTHS, dtype))
    loss, _ = va_opd_loss(**inputs, spec=LossSpec(method=method, kl_estimator=kl_estimator), backend=backend, chunk_size=16)
    loss.backward()
    assert loop_detector.ops > 0, "distill_forward did not run under the detector"
    assert loop_detector.syncs == []

