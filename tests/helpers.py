"""Random inputs shared by the loss tests."""
import torch


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
