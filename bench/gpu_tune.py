"""Where the fused loss's time goes on a CUDA device, and which chunk size to default to.

1. ``va_opd_loss`` forward+backward at the paper's shape (8,192 tokens in sibling groups of
   4 x 256, vocabulary 151,936, hidden 2,048/4,096, bf16), VA-OPD (one pass) and OPD, for a few
   chunk sizes, interleaved, with peak extra memory; next to the bare LM-head products with the
   same chunking (5 for VA-OPD, 4 for OPD, the weight gradient accumulated in fp32): the gap is
   the row kernels, the coefficients and the launches.
2. With ``--kernels``: the Triton row kernels alone on a 1,024-row bf16 chunk, for a few launch
   configurations: achieved bandwidth against the bytes each must move (to choose
   ``GPU_BLOCK`` / ``GPU_WARPS`` in triton_ops.py).
"""
import sys

import torch

from vaopd.kernels import LossSpec, triton_ops, va_opd_loss
from vaopd.kernels.chunks import accumulate_fp32

N, VOCAB, DS, DT, RESPONSE = 8192, 151936, 2048, 4096, 256


def bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e-3


def paper_inputs():
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size, scale=1.0):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=g).mul_(scale)

    b = N // RESPONSE
    return dict(
        student_hidden=randn(b, RESPONSE, DS).requires_grad_(), student_weight=randn(VOCAB, DS, scale=DS**-0.5).requires_grad_(),
        teacher_hidden=randn(b, RESPONSE, DT), teacher_ablated_hidden=randn(b, RESPONSE, DT), teacher_weight=randn(VOCAB, DT, scale=DT**-0.5),
        tokens=torch.randint(0, VOCAB, (b, RESPONSE), device="cuda", generator=g), mask=torch.ones(b, RESPONSE, dtype=torch.bool, device="cuda"),
        group_ids=torch.arange(b, device="cuda") // 4,
    )


def chunk_sweep(chunks=(1024, 1536, 2048), repeats=3):
    args = paper_inputs()
    opd_args = dict(args, teacher_ablated_hidden=None, spec=LossSpec(method="opd"))
    sh, sw = args["student_hidden"], args["student_weight"]
    h, w = sh.detach().reshape(N, DS), sw.detach()
    th, tha, tw = (args[k].reshape(N, DT) if args[k].dim() == 3 else args[k] for k in ("teacher_hidden", "teacher_ablated_hidden", "teacher_weight"))

    def loss(kwargs, chunk):
        sh.grad = sw.grad = None
        va_opd_loss(**kwargs, chunk_size=chunk)[0].backward()

    def products(chunk, views):
        """The LM-head products alone, chunked as the loss chunks them (a group of 1,024 tokens
        per chunk unless two fit)."""
        rows, sub = chunk - chunk % (4 * RESPONSE), chunk // 2
        g = torch.empty(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
        t = torch.empty(sub, VOCAB, device="cuda", dtype=torch.bfloat16)
        gh = torch.empty_like(h)
        acc = torch.zeros(VOCAB, DS, device="cuda")

        def run():
            for i in range(0, N, rows):
                r = slice(i, i + rows)
                for view in views:
                    torch.matmul(view[r], tw.T, out=g)
                torch.matmul(h[r], w.T, out=g)
                for j in range(i, i + rows, sub):
                    k = min(j + sub, i + rows)
                    torch.matmul(th[j:k], tw.T, out=t[: k - j])
                torch.matmul(g, w, out=gh[r])
                accumulate_fp32(acc, g.T, h[r])

        return run

    print(f"va_opd_loss at N={N} (groups of 4 x {RESPONSE}) V={VOCAB} D={DS}/{DT} bf16; ms per forward+backward", flush=True)
    times = {(m, c): [] for m in ("va_opd", "opd") for c in chunks}
    for _ in range(repeats):
        for c in chunks:
            times["va_opd", c].append(bench(lambda: loss(args, c), reps=5))
            times["opd", c].append(bench(lambda: loss(opd_args, c), reps=5))
    for c in chunks:
        for method, kwargs, views in (("va_opd", args, [tha]), ("opd", opd_args, [])):
            sh.grad = sw.grad = None
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss(kwargs, c)
            # Extra: beyond the inputs, the returned gradients and the fp32 [V, D_S] accumulator.
            peak = (torch.cuda.max_memory_allocated() - base - (h.numel() + w.numel()) * 2 - w.numel() * 4) / 2**20
            floor = bench(products(c, views), reps=5)
            best = min(times[method, c])
            print(f"chunk {c:5d} {method:6s}: " + " ".join(f"{x * 1e3:.2f}" for x in times[method, c])
                  + f" ms; its products alone {floor * 1e3:.2f} ms (x{best / floor:.2f}); peak extra {peak:.0f} MiB", flush=True)


def kernel_sweep():
    rows, vocab = 1024, VOCAB
    s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    work = s.clone()
    tok = torch.randint(0, vocab, (rows,), device="cuda")
    kl, logp, lse, t_logp = (torch.empty(rows, device="cuda") for _ in range(4))
    one = rows * vocab * 2
    print(f"row kernels on [{rows} x {vocab}] bf16 (one read of a buffer: {one / 2**20:.0f} MiB)")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            t_lse = bench(lambda: triton_ops.lse_gather(s, tok, lse, logp, block=block, num_warps=warps))
            t_kl = bench(lambda: triton_ops.reverse_kl_(s, t, tok, kl, logp, False, t_logp, block=block, num_warps=warps))
            t_kl_g = bench(lambda: triton_ops.reverse_kl_(work, t, tok, kl, logp, True, t_logp, block=block, num_warps=warps))
            # lse: 1 read; KL stats: 2 reads; with the gradient: 4 reads + 1 write.
            print(f"BLOCK {block:5d} warps {warps:2d}: lse {t_lse * 1e3:.3f} ms ({one / t_lse / 1e12:.2f} TB/s)  "
                  f"kl {t_kl * 1e3:.3f} ms ({2 * one / t_kl / 1e12:.2f} TB/s)  kl+grad {t_kl_g * 1e3:.3f} ms ({5 * one / t_kl_g / 1e12:.2f} TB/s)", flush=True)


if __name__ == "__main__":
    chunk_sweep()
    if "--kernels" in sys.argv:
        kernel_sweep()
