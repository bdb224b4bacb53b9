"""Where the fused loss's time goes on a CUDA device, to tune it.

1. The Triton row kernels alone on a 1,024-row bf16 chunk at the paper's vocabulary (151,936),
   for a few launch configurations: achieved bandwidth against the bytes each must move
   (to choose ``GPU_BLOCK`` / ``GPU_WARPS`` in triton_ops.py).
2. Phase A (one teacher view) and phase B at the paper's shape, with and without the row
   kernels (the products alone), for a few chunk sizes, with peak memory.
"""
import sys

import torch

from vaopd.kernels import triton_ops
from vaopd.kernels.fused import _accumulate_fp32, linear_logprobs_forward, reverse_kl_forward


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


def main():
    rows, vocab = 1024, 151936
    s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    work = s.clone()
    tok = torch.randint(0, vocab, (rows,), device="cuda")
    kl, logp, lse = (torch.empty(rows, device="cuda") for _ in range(3))
    one = rows * vocab * 2
    print(f"row kernels on [{rows} x {vocab}] bf16 (one read of a buffer: {one / 2**20:.0f} MiB)")
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            t_lse = bench(lambda: triton_ops.lse_gather(s, tok, lse, logp, block=block, num_warps=warps))
            t_kl = bench(lambda: triton_ops.reverse_kl_(s, t, tok, kl, logp, False, block=block, num_warps=warps))
            t_kl_g = bench(lambda: triton_ops.reverse_kl_(work, t, tok, kl, logp, True, block=block, num_warps=warps))
            # lse: 1 read; KL stats: 2 reads; with the gradient: 4 reads + 1 write.
            print(f"BLOCK {block:5d} warps {warps:2d}: lse {t_lse * 1e3:.3f} ms ({one / t_lse / 1e12:.2f} TB/s)  "
                  f"kl {t_kl * 1e3:.3f} ms ({2 * one / t_kl / 1e12:.2f} TB/s)  kl+grad {t_kl_g * 1e3:.3f} ms ({5 * one / t_kl_g / 1e12:.2f} TB/s)", flush=True)


def phases():
    n, vocab, ds, dt = 8192, 151936, 2048, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    sh = torch.randn(n, ds, device="cuda", dtype=torch.bfloat16, generator=g)
    sw = torch.randn(vocab, ds, device="cuda", dtype=torch.bfloat16, generator=g).mul_(ds**-0.5)
    th = torch.randn(n, dt, device="cuda", dtype=torch.bfloat16, generator=g)
    tw = torch.randn(vocab, dt, device="cuda", dtype=torch.bfloat16, generator=g).mul_(dt**-0.5)
    tok = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    coef = torch.rand(n, device="cuda", generator=g)
    print(f"phases at N={n} V={vocab} D={ds}/{dt} bf16")
    for chunk in (1024, 2048, 4096):
        s_buf = torch.empty(chunk, vocab, device="cuda", dtype=torch.bfloat16)
        t_buf = torch.empty_like(s_buf)
        gh = torch.empty_like(sh)
        acc = torch.zeros(vocab, ds, device="cuda")

        def products_a():
            for i in range(0, n, chunk):
                torch.matmul(th[i:i + chunk], tw.T, out=t_buf)

        def products_b():
            for i in range(0, n, chunk):
                torch.matmul(sh[i:i + chunk], sw.T, out=s_buf)
                for j in range(i, i + chunk, chunk // 2):
                    torch.matmul(th[j:j + chunk // 2], tw.T, out=t_buf[: chunk // 2])
                torch.matmul(s_buf, sw, out=gh[i:i + chunk])
                _accumulate_fp32(acc, s_buf.T, sh[i:i + chunk])

        def weight_grad_only():
            for i in range(0, n, chunk):
                _accumulate_fp32(acc, s_buf.T, sh[i:i + chunk])

        t_a = bench(lambda: linear_logprobs_forward(th, tw, tok, vocab, chunk, triton_ops), reps=5)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t_b = bench(lambda: reverse_kl_forward(sh, sw, th, tw, coef, tok, vocab, chunk, triton_ops, True), reps=5)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"chunk {chunk:5d}: phase A (1 view) {t_a * 1e3:6.2f} ms, products {bench(products_a, 5) * 1e3:6.2f} ms | "
              f"phase B {t_b * 1e3:6.2f} ms, products {bench(products_b, 5) * 1e3:6.2f} ms "
              f"(fp32 weight-grad accumulation {bench(weight_grad_only, 5) * 1e3:6.2f} ms) | phase B peak {peak:.0f} MiB", flush=True)
        del s_buf, t_buf, gh, acc
        torch.cuda.empty_cache()


def end_to_end(chunks=(1024, 2048), repeats=3):
    """``va_opd_loss`` forward+backward at the paper's shape for each chunk size, interleaved."""
    from vaopd.kernels import va_opd_loss

    n, vocab, ds, dt = 8192, 151936, 2048, 4096
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*size, scale=1.0):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=g).mul_(scale)

    b, t = 8, n // 8
    args = dict(
        student_hidden=randn(b, t, ds).requires_grad_(), student_weight=randn(vocab, ds, scale=ds**-0.5).requires_grad_(),
        teacher_hidden=randn(b, t, dt), teacher_ablated_hidden=randn(b, t, dt), teacher_weight=randn(vocab, dt, scale=dt**-0.5),
        tokens=torch.randint(0, vocab, (b, t), device="cuda", generator=g), mask=torch.ones(b, t, dtype=torch.bool, device="cuda"),
        group_ids=torch.arange(b, device="cuda") // 4,
    )

    def run(chunk):
        args["student_hidden"].grad = args["student_weight"].grad = None
        va_opd_loss(**args, chunk_size=chunk)[0].backward()

    times = {c: [] for c in chunks}
    for _ in range(repeats):
        for c in chunks:
            times[c].append(bench(lambda: run(c), reps=5))
    for c in chunks:
        args["student_hidden"].grad = args["student_weight"].grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(c)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"va_opd_loss N={n} V={vocab} D={ds}/{dt} bf16 chunk {c}: " + " ".join(f"{x * 1e3:.2f}" for x in times[c]) + f" ms; peak {peak:.0f} MiB", flush=True)


if __name__ == "__main__":
    if "--end-to-end" in sys.argv:
        end_to_end()
        sys.exit()
    phases()
    if "--kernels" in sys.argv:
        main()
