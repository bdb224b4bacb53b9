"""Data parallelism, loss and gradient: 2 gloo processes with an FSDP2 student (and a replicated or
FSDP2 teacher) give the loss and gradient of one process on the same global batch, with a sibling
group split across the ranks and responses of unequal lengths."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_utils import free_port
from vaopd.data import tiny_records
from vaopd.distributed import DistEnv, HiddenAndHead, generate_slots, shard_model, slot_layout
from vaopd.kernels import LossSpec, va_opd_loss
from vaopd.rollout import PromptBatch, encode_prompts
from vaopd.tiny import build_image_processor, build_model, build_tokenizer
from vaopd.scoring import scoring_inputs, teacher_hidden
from vaopd.strategy import FSDP, inference_copy

P, K = 3, 2  # 6 responses on 2 ranks: slots 0-2 and 3-5, so prompt 1's siblings are split
VARIANTS = [("va_opd", "full", "replica"), ("opd", "full", "replica"), ("va_opd", "sampled", "replica"),
            ("va_opd", "full", "fsdp")]  # (method, KL estimator, teacher on the ranks)


def fixed_batch():
    """Models, prompts, ablated pixels, responses ``[P K, T]`` with unequal valid lengths, vocab."""
    tok, ip = build_tokenizer(), build_image_processor()
    student, teacher = build_model("student", tok, seed=0), build_model("teacher", tok, seed=1)
    teacher.requires_grad_(False)
    records = tiny_records(P, seed=3)
    prompts = encode_prompts([r.question for r in records], [r.image for r in records], tok, ip)
    g = torch.Generator().manual_seed(0)
    ablated = prompts.pixel_values + torch.randn(prompts.pixel_values.shape, generator=g)
    tokens = torch.randint(10, 200, (P * K, 7), generator=g)
    lengths = torch.tensor([7, 2, 5, 1, 6, 3])
    mask = torch.arange(7)[None] < lengths[:, None]
    return student, teacher, prompts, ablated, tokens, mask, len(tok)


def rows_loss(student_fn, teacher, prompts, ablated, tokens, mask, slots, loss_fn, teacher_root=None):
    """Loss of the responses at global ``slots`` (prompt-major), student hidden via ``student_fn``;
    the teacher runs through its FSDP ``teacher_root`` when given."""
    prompt_of = [s // K for s in slots]
    batch = prompts.select(prompt_of)
    t_ablated = prompts.with_pixels(ablated).select(prompt_of).pixel_values
    t_hidden, t_abl = teacher_hidden(teacher_root or teacher, batch, t_ablated, tokens[slots], mask[slots])
    # A sharded teacher's root stays gathered after its forward, so lm_head.weight is the full weight.
    hidden, weight = student_fn(scoring_inputs(batch, tokens[slots], mask[slots]))
    hidden = hidden[:, batch.input_ids.shape[1] - 1:]
    return loss_fn(hidden, weight, t_hidden, t_abl, teacher.lm_head.weight, tokens[slots], mask[slots],
                   torch.tensor(prompt_of))


def single_process(method, estimator, _teacher_mode):
    student, teacher, prompts, ablated, tokens, mask, vocab = fixed_batch()

    def loss_fn(*args):
        return va_opd_loss(*args, spec=LossSpec(method=method, kl_estimator=estimator), vocab_size=vocab, num_prompts=P)[0]

    loss = rows_loss(lambda inputs: (student.model(**inputs).last_hidden_state, student.lm_head.weight),
                     teacher, prompts, ablated, tokens, mask, list(range(P * K)), loss_fn)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for method, estimator, teacher_mode in VARIANTS:
            student, teacher, prompts, ablated, tokens, mask, vocab = fixed_batch()
            replica = inference_copy(student, torch.float32)
            root = shard_model(student, param_dtype=None, device=torch.device("cpu"))
            t_root = shard_model(teacher, param_dtype=None, device=torch.device("cpu")) if teacher_mode == "fsdp" else None
            (parts,) = slot_layout(P, K, P, world)

            def loss_fn(*args):
                return va_opd_loss(*args, spec=LossSpec(method=method, kl_estimator=estimator), vocab_size=vocab, num_prompts=P,
                                   process_group=dist.group.WORLD)[0]

            loss = rows_loss(lambda inputs: root(**inputs), teacher, prompts, ablated, tokens, mask,
                             list(parts[rank]), loss_fn, t_root)
            loss.backward()
            if t_root is not None:
                t_root.reshard()
            total = loss.detach().clone()
            dist.all_reduce(total)
            grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
            results[method, estimator, teacher_mode] = (float(total), grads)
        # The sampling replica follows the sharded student after an update.
        torch.optim.SGD(student.parameters(), lr=1.0).step()
        full = {n: p.full_tensor() for n, p in student.named_parameters()}
        stale = max(float((replica.state_dict()[n] - v).abs().max()) for n, v in full.items())
        strategy = FSDP(DistEnv(rank, world, rank, torch.device("cpu")), root, HiddenAndHead(teacher), replica)
        strategy.refresh_rollout(object())  # an engine without weights of its own: the replica is refreshed
        synced = max(float((replica.state_dict()[n] - v).abs().max()) for n, v in full.items())
        results["replica"] = (stale, synced)
        # The step's loss gathers split sibling groups over this group (not None: per rank only).
        results["group"] = dist.group.WORLD is not None and strategy.process_group is dist.group.WORLD
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_layout_splits_a_group_and_keeps_micro_batches_aligned():
    (parts,) = slot_layout(P, K, P, 2)
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5]]  # prompt 1 = slots 2, 3
    layout = slot_layout(4, 2, 2, 3)
    assert [[list(r) for r in m] for m in layout] == [[[0], [1], [2, 3]], [[4], [5], [6, 7]]]
    with pytest.raises(ValueError, match="fewer than"):
        slot_layout(2, 2, 1, 3)


class Recorder:
    """A rollout backend whose response rows say which prompt (first token) and sample (second)
    they are, with ``1 + sample`` valid tokens."""

    def generate(self, prompts, k):
        rows = [[int(p), j] + [0] * 3 for p in prompts.input_ids[:, 0] for j in range(k)]
        tokens = torch.tensor(rows)
        return tokens, torch.arange(5)[None] <= tokens[:, 1:2]


def test_generate_slots_keeps_slot_order_for_whole_and_partial_groups():
    ids = torch.arange(4)[:, None].repeat(1, 2)  # prompt p's first token is p
    prompts = PromptBatch(ids, torch.ones_like(ids), torch.zeros_like(ids), torch.zeros(4, 1), torch.ones(4, 3, dtype=torch.long))
    # K = 3: slots 2 (prompt 0, sample 2), 3-5 (all of prompt 1), 6-7 (prompt 2, samples 0-1)
    tokens, mask = generate_slots(Recorder(), prompts, [2, 3, 4, 5, 6, 7], 3)
    assert tokens[:, 0].tolist() == [0, 1, 1, 1, 2, 2]
    assert tokens[:, 1].tolist() == [0, 0, 1, 2, 0, 1]  # a partial group is sampled afresh on its rank
    assert mask.sum(1).tolist() == [1, 1, 2, 3, 1, 2] and mask.dtype == torch.bool


@pytest.mark.slow
def test_two_fsdp_ranks_match_one_process_with_split_siblings(tmp_path):
    out = tmp_path / "dist.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out, weights_only=False)
    stale, synced = results.pop("replica")
    assert results.pop("group")
    assert stale > 1e-3 and synced == 0
    for variant in VARIANTS:
        loss, grads = single_process(*variant)
        d_loss, d_grads = results[variant]
        assert d_loss == pytest.approx(loss, rel=1e-5), variant
        assert grads.keys() == d_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(d_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{variant} {name}")
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0
