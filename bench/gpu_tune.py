"""Time the Triton row kernels alone on a CUDA device for a few launch configurations.

At the paper's vocabulary (151,936) on a 1,024-row bf16 chunk: the achieved bandwidth of each
kernel against the bytes it must move, to choose ``GPU_BLOCK`` / ``GPU_WARPS`` in triton_ops.py.
"""
import torch
import triton

from vaopd.kernels import triton_ops


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


if __name__ == "__main__":
    main()
