"""Random inputs shared by the loss tests, and running the fused loss beside the reference."""
import torch

from vaopd.kernels import va_opd_loss, va_opd_loss_reference


def make_inputs(b=4, t=7, ds=8, dt=12, v=19, vs=None, vt=None, groups=None, dtype=torch.float32, seed=0, scale=1.0):
    """Random ``va_opd_loss`` arguments; LM heads may be wider (``vs``, ``vt``) than the vocabulary ``v``.

    ``scale`` multiplies the weights (larger logits, sharper distributions).
    """
    g = torch.Generator().manual_seed(seed)
    vs, vt = vs or v, vt or v
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return dict(
        student_hidden=torch.randn(b, t, ds, generator=g).to(dtype).requires_grad_(),
        student_weight=(scale * torch.randn(vs, ds, generator=g)).to(dtype).requires_grad_(),
        teacher_hidden=torch.randn(b, t, dt, generator=g).to(dtype),
        teacher_ablated_hidden=torch.randn(b, t, dt, generator=g).to(dtype),
        teacher_weight=(scale * torch.randn(vt, dt, generator=g)).to(dtype),
        tokens=torch.randint(0, v, (b, t), generator=g),
        mask=mask,
        group_ids=torch.arange(b) // 2 if groups is None else groups,
    )


def clone_inputs(inputs):
    """A copy whose student tensors are fresh leaves (so two losses get separate gradients)."""
    return {k: (x.detach().clone().requires_grad_() if k.startswith("student") else x) for k, x in inputs.items()}


def run_both(inputs, **kwargs):
    """``va_opd_loss(**kwargs)`` and the reference on copies of ``inputs``, both backpropagated:
    ``(loss, stats, inputs)`` of each (``backend`` and ``chunk_size`` go to the fused loss only)."""
    fused_in, ref_in = clone_inputs(inputs), clone_inputs(inputs)
    loss, stats = va_opd_loss(**fused_in, **kwargs)
    loss.backward()
    ref_kwargs = {k: v for k, v in kwargs.items() if k not in ("backend", "chunk_size")}
    ref_loss, ref_stats = va_opd_loss_reference(**ref_in, **ref_kwargs)
    ref_loss.backward()
    return (loss, stats, fused_in), (ref_loss, ref_stats, ref_in)
