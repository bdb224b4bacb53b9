"""``va_opd_loss(process_group=...)``: a batch split over 2 gloo ranks, siblings split across them,
gives the single-process loss (summed over ranks), coefficients and gradients."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import clone_inputs, make_inputs
from trainer_utils import free_port
from vaopd.kernels import LossSpec, va_opd_loss, va_opd_loss_reference

# Rows of each rank: group 1 has responses on both ranks; rank 1 also holds an all-masked row.
SPLIT = {0: [0, 1, 2], 1: [3, 4, 5, 6]}
GROUPS = torch.tensor([0, 0, 1, 1, 1, 2, 2])


def _inputs():
    inputs = make_inputs(b=7, t=9, ds=8, dt=12, v=53, groups=GROUPS, seed=31)
    inputs["mask"][:, 5:] = torch.rand(7, 4, generator=torch.Generator().manual_seed(32)) > 0.5  # unequal lengths
    inputs["mask"][4] = False
    return inputs


def _rank(rank, world, port, method, va, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs = _inputs()
        mine = {k: (v[SPLIT[rank]].detach().clone().requires_grad_(k.startswith("student_h")) if v.dim() and v.shape[0] == 7 and k != "student_weight" else v)
                for k, v in inputs.items()}
        mine["student_weight"] = inputs["student_weight"].detach().clone().requires_grad_()
        loss, stats = va_opd_loss(**mine, spec=LossSpec(method=method, va=va), num_prompts=3, backend="torch", chunk_size=4, process_group=dist.group.WORLD)
        loss.backward()
        torch.save(dict(loss=loss.detach(), coef=stats["coef"], kl=stats["kl"], va=stats["va"], d_hidden=mine["student_hidden"].grad,
                        d_weight=mine["student_weight"].grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method, va", [("va_opd", "sampled"), ("opd", "sampled"), ("va_opd", "two_sided"), ("va_opd", "distribution")])
def test_two_ranks_with_split_siblings_match_one_process(tmp_path, method, va):
    mp.spawn(_rank, args=(2, free_port(), method, va, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    inputs = clone_inputs(_inputs())
    loss, stats = va_opd_loss_reference(**inputs, spec=LossSpec(method=method, va=va))
    loss.backward()
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], loss, rtol=1e-5, atol=1e-6)
    for key in ("coef", "kl", "va"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), stats[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([p["d_hidden"] for p in parts]), inputs["student_hidden"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts[0]["d_weight"] + parts[1]["d_weight"], inputs["student_weight"].grad, rtol=1e-4, atol=1e-6)
    # Group 1 is split 1 + 2 across the ranks; its coefficients still sum to 1.
    assert torch.cat([p["coef"] for p in parts])[2:5].sum().item() == pytest.approx(1.0, rel=1e-5)


def test_process_group_needs_the_global_prompt_count():
    with pytest.raises(ValueError, match="num_prompts is required with process_group"):
        va_opd_loss(**make_inputs(), process_group=object())
