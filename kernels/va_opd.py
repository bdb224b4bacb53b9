"""``va_opd_loss``: VA-OPD (or OPD) on the distillation engine, with no ``[tokens x vocab]`` tensor.

The engine (``distill.py``) forms the gradients of a chunk as soon as its coefficients are known,
so the loss lays out the valid token rows so that each chunk's coefficients are known in time:

- **VA-OPD, one pass** (5 LM-head products): a response's coefficients depend only on its own
  tokens and its siblings' (plus the constant ``num_prompts``), so whole sibling groups are packed
  into each chunk and the chunk's coefficients come from its own teacher log-probs.
- **OPD** (4 products): ``1 / (K_g L_b P)`` is known from the mask before any logits.
- **VA-OPD, two phases** (fallback, 6 products with the full KL, 5 sampled): when one sibling
  group alone holds more valid tokens than a chunk, or with a ``process_group`` (siblings split
  over ranks): phase A computes both teacher views' log-probs for all rows, then the
  coefficients, then the engine's pass with them known (recomputing the clean teacher's logits).

The row layout is planned on the host from one copy of the (small) mask and group ids; the chunk
loop then never waits on the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .checks import check_loss_inputs
from .chunks import chunk_rows, even_chunks, row_ops, wanted
from .distill import Coefficients, attach, distill_forward, teacher_views
from .logprobs import linear_logprobs_forward
from .objective import loss_coefficients, va_opd_coefficients_nosync, visual_advantage
from .spec import LossSpec

log = logging.getLogger(__name__)


def va_opd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_ablated_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    spec: LossSpec = LossSpec(),
    vocab_size: int | None = None,
    num_prompts: int | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    process_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VA-OPD (or OPD) loss from hidden states and LM-head weights, never materialising
    ``[tokens x vocab]``; same value, gradients and stats as ``va_opd_loss_reference``.

    ``B`` responses of ``T`` positions each, ``P`` prompts in the optimizer step; per valid token
    ``t`` of response ``b`` the loss is ``c_t * KL(pS(. | y_<t) || pT(. | image, y_<t))``, summed
    and divided by ``P`` (``docs/objective.md``).

    Args:
        student_hidden: ``[B, T, D_S]`` fp32/bf16/fp16 final hidden states of the student;
            ``student_hidden[b, t]`` predicts ``tokens[b, t]`` (already shifted). Gradients reach it.
        student_weight: ``[V_S, D_S]`` student LM head, same dtype and device; rows past
            ``vocab_size`` (padding) are ignored. Gradients reach it.
        teacher_hidden: ``[B, T, D_T]`` teacher states with the original image (no gradient).
        teacher_ablated_hidden: ``[B, T, D_T]`` teacher states with the ablated (e.g. pixelated)
            image, same dtype as ``teacher_hidden``; they give the visual advantage. Required for
            ``spec.method="va_opd"``; with ``"opd"`` None, or given for the VA statistics only.
        teacher_weight: ``[V_T, D_T]`` teacher LM head, the dtype of ``teacher_hidden``.
        tokens: ``[B, T]`` int64 (or int32) sampled token ids, in ``[0, vocab_size)`` wherever
            ``mask`` is set (anything elsewhere).
        mask: ``[B, T]`` bool (or 0/1 integer/float) valid-token mask: True at a response's
            generated tokens up to and including its first EOS. Only valid tokens are computed;
            a fully masked row (a padding response) contributes nothing.
        group_ids: ``[B]`` int64 sibling-group id per response: responses with equal ids are the
            samples of one prompt, among which the rollout weights are normalised (OPD: ``K_g``,
            the group's size). Any values; they need not be dense or sorted.
        spec: the objective's settings (``LossSpec``: method, KL estimator, weight temperature,
            high-group fraction and weight, visual-advantage estimator); ``LossSpec()`` is the
            paper's VA-OPD.
        vocab_size: ``V``, the tokenizer's vocabulary size: log-probs are normalised over
            ``[0, V)``. Default: the common LM-head width (an error when the heads differ).
        num_prompts: ``P``, the prompts in the optimizer step: the loss is a sum over responses
            divided by ``P``, so micro-batches of one step add up to the step's loss. Default:
            the distinct ``group_ids`` of the rows with valid tokens; required with a
            ``process_group`` (the global count).
        backend: ``"triton"`` (Triton row kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (chunked torch, any device) or ``"auto"`` (Triton for CUDA tensors, torch
            otherwise).
        chunk_size: ``C``, valid token rows per chunk (default 2048 on CUDA, 1024 on CPU). Memory
            beyond the inputs, the gradients and an fp32 ``[V_S, D_S]`` weight-gradient
            accumulator is ``1.5 * C * vocab_size`` elements of the input dtype (a ``[C, V]``
            student buffer and a ``[C/2, V]`` teacher buffer), plus on the torch backend fp32
            row-op temporaries of a bounded row block (about 16 MiB on a CPU, 256 MiB on a GPU);
            with Qwen's vocabulary in bf16 and the default, 890 MiB, flat in the token count.
            VA-OPD runs in one pass when every sibling group's valid tokens fit in ``C``;
            otherwise it falls back to two phases (see below).
        process_group: a ``torch.distributed`` group over which one batch is split (data
            parallelism); None for a single process. Sibling responses may then sit on different
            ranks: their VA means and group ids are all-gathered (two small collectives) so the
            weights are those of the whole batch. Every rank must call the loss; ``group_ids``
            must be globally unique and ``num_prompts`` the global prompt count. The ranks'
            losses then add up to the single-process loss, and so do their gradients (sum, not
            average, across ranks).

    Returns:
        ``(loss, stats)``: the fp32 scalar ``sum(coef * kl) / P`` with gradients to
        ``student_hidden`` and ``student_weight`` only, and a dict of ``[B, T]`` fp32 detached
        tensors, zero outside ``mask``: ``kl`` (the per-token KL, or its sampled estimate),
        ``va`` (visual advantage by ``spec.va``; zero without an ablated view), ``coef`` (``c_t``, before the
        division by ``P``), ``student_logp``, ``teacher_logp``, ``teacher_ablated_logp`` (NaN at
        valid tokens when no ablated view is given).

    LM-head products (``2 N V D`` FLOPs each, ``N`` valid tokens) with both gradients wanted:

    - ``method="va_opd"``: 5 (ablated and clean teacher, student, input and weight gradients) in
      one pass when no ``process_group`` is given and every sibling group fits in a chunk (whole
      groups are packed into chunks greedily); else two phases: 6 with ``kl_estimator="full"``
      (the clean teacher is recomputed), 5 with ``"sampled"``.
    - ``method="opd"``: 4 (clean teacher, student, two gradients), with or without a process
      group; 5 when ``teacher_ablated_hidden`` is given (its log-probs feed the VA stats).
    - The same for every ``spec.va``: ``"distribution"`` takes the KL between the teacher's views
      from their logits side by side in the buffers above (``distill.teacher_views``).

    A gradient is formed only when wanted: none under ``torch.no_grad()``/``inference_mode``, no
    weight gradient (and no fp32 accumulator) for a frozen LM head, no input gradient for hidden
    states that do not require grad; each saves one product. Gradients are formed in the forward
    pass: backward may run once per call, and not with ``create_graph=True`` (``RuntimeError``).
    Which path ran is logged at debug level (logger ``vaopd.kernels.va_opd``).

    Example::

        loss, stats = va_opd_loss(h_s, student.lm_head.weight, h_t, h_t_ablated, teacher.lm_head.weight,
                                  tokens, mask, group_ids, spec=LossSpec(method="opd"), vocab_size=V)
    """
    if process_group is not None and num_prompts is None:
        raise ValueError("num_prompts is required with process_group: pass the global number of prompts in the step")
    checked = check_loss_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight,
        tokens, mask, group_ids, spec=spec, vocab_size=vocab_size, num_prompts=num_prompts,
    )
    device = student_hidden.device
    return chunked_va_opd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight, tokens, checked.mask,
        group_ids, spec=spec, vocab=checked.vocab_size, num_prompts=checked.num_prompts,
        ops=row_ops(backend, device), chunk=chunk_rows(chunk_size, device), process_group=process_group,
    )


# ----------------------------------------------------------------------------------------------
# Row layout: which valid tokens go into which chunk
# ----------------------------------------------------------------------------------------------


def pack_groups(lengths: list[int], group_ids: list[int], budget: int) -> list[list[int]] | None:
    """Whole sibling groups packed into chunks of at most ``budget`` valid tokens.

    Greedy in the order groups first appear (so a batch laid out group by group keeps its order):
    a group joins the current chunk if it fits, else it starts the next one. Responses without
    valid tokens are left out. Returns the chunks as lists of response indices (group by group,
    siblings in batch order), or None when one group alone exceeds ``budget``.
    """
    groups: dict[int, list[int]] = {}
    for b, (gid, length) in enumerate(zip(group_ids, lengths)):
        if length:
            groups.setdefault(gid, []).append(b)
    packs, current, used = [], [], 0
    for members in groups.values():
        size = sum(lengths[b] for b in members)
        if size > budget:
            return None
        if current and used + size > budget:
            packs.append(current)
            current, used = [], 0
        current += members
        used += size
    if current:
        packs.append(current)
    return packs


def _row_order(mask: torch.Tensor, responses: list[int], lengths: list[int]) -> torch.Tensor | None:
    """Flat ``[B * T]`` indices of the valid tokens of ``responses`` in order, or None when that is
    every position in batch order (the rows are then plain views, no copies). ``mask`` is the host
    copy: the indices are worked out on the CPU, where their data-dependent size costs no wait."""
    batch, width = mask.shape
    if responses == list(range(batch)) and sum(lengths) == batch * width:
        return None
    index = torch.tensor(responses, dtype=torch.long)
    flat = index[:, None] * width + torch.arange(width)
    return flat.masked_select(mask.index_select(0, index))


def _upload(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors of one dtype onto ``device`` in one copy that the host does not wait for (from
    pinned memory on CUDA): views of one buffer, shaped like ``tensors``."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


@dataclass
class PackLayout:
    """One packed chunk's responses as ``objective.va_opd_coefficients_nosync`` takes them.

    Tensors are int64: ``members [b]`` (batch indices, in row order), ``where [rows]`` (each row's
    flat position in the chunk's ``[b, T]`` layout), ``lengths [b]`` (valid tokens) and
    ``group_index [b]`` (dense sibling-group indices); ``groups`` and ``top_k`` (the longest
    response's length) are host ints.
    """

    members: torch.Tensor
    where: torch.Tensor
    lengths: torch.Tensor
    group_index: torch.Tensor
    groups: int
    top_k: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.members, self.where, self.lengths, self.group_index]


def pack_layouts(packs: list[list[int]], mask: torch.Tensor, group_ids: torch.Tensor) -> list[PackLayout]:
    """The ``PackLayout`` of each pack, on the CPU, from the host copies of the ``[B, T]`` bool
    ``mask`` and ``[B]`` int64 ``group_ids``: whatever the coefficients need to know about the
    layout is known before the chunk loop, which then never waits on the device."""
    layouts = []
    for pack in packs:
        members = torch.tensor(pack, dtype=torch.long)
        sub_mask = mask.index_select(0, members)
        lengths = sub_mask.sum(dim=1)
        _, group_index = torch.unique(group_ids.index_select(0, members), return_inverse=True)
        where = sub_mask.reshape(-1).nonzero().squeeze(1)
        layouts.append(PackLayout(members, where, lengths, group_index, int(group_index.max()) + 1, int(lengths.max())))
    return layouts


def _pack_coefficients(layouts, mask, coef_rows, *, num_prompts, spec: LossSpec) -> Coefficients:
    """Coefficients of one packed chunk from its own teacher log-probs (``objective.py``, on the
    chunk's responses: whole sibling groups, so the weights are those of the whole batch), laid
    out by the chunk's ``PackLayout`` (device tensors): no host-device synchronisation.
    Also writes the chunk's coefficients (before ``/ num_prompts``) into ``coef_rows``, for the stats."""

    def coefficients(index, rows, clean, ablated, divergence):
        layout = layouts[index]
        sub_mask = mask.index_select(0, layout.members)

        def spread(values):
            return torch.zeros(sub_mask.numel(), dtype=torch.float32, device=mask.device).index_copy_(0, layout.where, values).view(sub_mask.shape)

        coef = va_opd_coefficients_nosync(
            spread(clean), spread(ablated), sub_mask, layout.lengths, layout.group_index, layout.groups, layout.top_k,
            spec.weight_temperature, spec.high_fraction, spec.high_weight,
            estimator=spec.va, divergence=None if divergence is None else spread(divergence),
        )
        coef_rows[rows] = coef.reshape(-1).index_select(0, layout.where)
        return coef_rows[rows] / num_prompts

    return coefficients


def chunked_va_opd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_ablated_hidden, teacher_weight, tokens, mask, group_ids,
    *, spec: LossSpec, vocab, num_prompts, ops, chunk, process_group=None,
):
    """``va_opd_loss`` on validated arguments (bool ``mask``, resolved ``vocab`` and ``num_prompts``)
    with a given row-op module ``ops`` (``triton_ops``, ``torch_ops`` or a compatible one, such as
    the benchmarks' ``torch.compile``d twin) and ``chunk`` rows per chunk."""
    device = student_hidden.device
    method = spec.method
    # The row layout is planned on the host from one copy of the (small) mask and group ids, and
    # its index tensors go to the device in one copy: the chunk loop never waits on the device.
    host = torch.cat([mask.to(torch.int64), group_ids[:, None]], dim=1).cpu()
    host_mask, host_ids = host[:, :-1].bool(), host[:, -1].contiguous()
    lengths = host_mask.sum(dim=1).tolist()
    packs = None
    if method == "va_opd":
        if process_group is not None:
            log.debug("va_opd_loss: two-phase path (process_group: siblings may sit on other ranks)")
        else:
            packs = pack_groups(lengths, host_ids.tolist(), chunk)
            if packs is None:
                log.debug("va_opd_loss: two-phase path (a sibling group has more valid tokens than chunk_size=%d)", chunk)
            else:
                log.debug("va_opd_loss: one pass, whole sibling groups in %d chunk(s)", len(packs))
    responses = [b for pack in packs for b in pack] if packs is not None else [b for b, n in enumerate(lengths) if n]
    order = _row_order(host_mask, responses, lengths)
    layouts = [] if packs is None else pack_layouts(packs, host_mask, host_ids)
    uploaded = _upload(([] if order is None else [order]) + [t for layout in layouts for t in layout.tensors()], device)
    if order is not None:
        order = uploaded.pop(0)
    for i, layout in enumerate(layouts):
        layout.members, layout.where, layout.lengths, layout.group_index = uploaded[4 * i: 4 * i + 4]
    n = sum(lengths)

    def take(x):
        x = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x.reshape(-1)
        return x if order is None else x.index_select(0, order)

    def scatter(values):
        out = torch.zeros(mask.numel(), dtype=torch.float32, device=device)
        if order is None:
            out.copy_(values)
        else:
            out.index_copy_(0, order, values.float())
        return out.view(mask.shape)

    tok = take(tokens).long().contiguous()
    teacher_rows = take(teacher_hidden.detach())
    ablated_rows = None if teacher_ablated_hidden is None else take(teacher_ablated_hidden.detach())
    t_weight = teacher_weight.detach()
    # The distribution VA needs both teacher views' logits of a row at once (distill.teacher_views).
    view_kl = spec.va == "distribution" and ablated_rows is not None
    teacher_logp = ablated_logp = divergence = coef = None
    with torch.no_grad():
        if packs is not None:  # one pass: each chunk's coefficients from its own teacher log-probs
            coef_rows = torch.zeros(n, dtype=torch.float32, device=device)
            bounds = [0]
            for pack in packs:
                bounds.append(bounds[-1] + sum(lengths[b] for b in pack))
            chunks = list(zip(bounds[:-1], bounds[1:]))
            coefficients = _pack_coefficients(layouts, mask, coef_rows, num_prompts=num_prompts, spec=spec)
        else:  # coefficients known before the pass
            chunks = even_chunks(n, chunk)
            if method == "va_opd":  # phase A: both teacher views for every row, then the coefficients
                if view_kl:  # the two views side by side in one [chunk, V] buffer
                    teacher_logp, ablated_logp, divergence = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
                    buffer = teacher_rows.new_empty(max(2, min(chunk, 2 * n)), vocab)
                    teacher_views(teacher_rows, ablated_rows, t_weight[:vocab], tok, slice(0, n), buffer, divergence,
                                  teacher_logp, ablated_logp, ops)
                    del buffer
                else:
                    teacher_logp, _ = linear_logprobs_forward(teacher_rows, t_weight, tok, vocab, chunk, ops)
                    ablated_logp, _ = linear_logprobs_forward(ablated_rows, t_weight, tok, vocab, chunk, ops)
                va = visual_advantage(scatter(teacher_logp), scatter(ablated_logp), mask, spec.va,
                                      None if divergence is None else scatter(divergence))
                coef = loss_coefficients(method, va, mask, group_ids, spec.weight_temperature, spec.high_fraction,
                                         spec.high_weight, process_group)
            elif process_group is None:  # OPD: coefficients from the mask alone, so from its host copy
                coef, = _upload([loss_coefficients(method, torch.zeros(host_mask.shape), host_mask, host_ids)], device)
            else:
                coef = loss_coefficients(method, torch.zeros(mask.shape, device=device), mask, group_ids, process_group=process_group)
            scaled_coef = take(coef) / num_prompts

            def coefficients(index, rows, *views):
                return scaled_coef[rows]

    student_rows = take(student_hidden)
    need_hidden, need_weight = wanted(student_rows, student_weight)
    with torch.no_grad():
        result = distill_forward(
            student_rows.detach(), student_weight.detach(), teacher_rows, t_weight, tok, chunks, coefficients,
            vocab=vocab, chunk=chunk, ops=ops, need_hidden=need_hidden, need_weight=need_weight,
            ablated_hidden=None if ablated_logp is not None else ablated_rows, teacher_logp=teacher_logp,
            sampled=spec.kl_estimator == "sampled", view_kl=view_kl and ablated_logp is None,
        )
        if result.ablated_logp is not None:
            ablated_logp, divergence = result.ablated_logp, result.view_kl
        if packs is not None:
            coef = scatter(coef_rows)
        # The VA as a statistic, after the loop (where visual_advantage's check of the teacher's
        # log-probs costs no idle device); without an ablated view there is none.
        if ablated_logp is None:
            va = torch.zeros(mask.shape, device=device)
        else:
            va = visual_advantage(scatter(result.teacher_logp), scatter(ablated_logp), mask, spec.va,
                                  None if divergence is None else scatter(divergence))
        stats = {
            "kl": scatter(result.kl),
            "va": va,
            "coef": coef,
            "student_logp": scatter(result.student_logp),
            "teacher_logp": scatter(result.teacher_logp),
            "teacher_ablated_logp": torch.where(mask, float("nan"), 0.0).float() if ablated_logp is None else scatter(ablated_logp),
        }
    return attach(result, student_rows, student_weight), stats
