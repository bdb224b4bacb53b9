"""Peak extra resident memory of one loss forward+backward, in a fresh process.

Usage: python memprobe.py {reference|torch} TOKENS VOCAB [CHUNK]; prints the peak RSS growth in
bytes over the resident size just before the call (inputs already built). Run in a subprocess so
that no earlier allocation hides the peak: ``ru_maxrss`` only ever grows.
"""
import ctypes
import resource
import sys

import torch

from vaopd.kernels import va_opd_loss, va_opd_loss_reference


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def lock_resident_pages() -> None:
    """Lock every page mapped so far (library code included) in memory. Machines that page cold
    memory out proactively (DAMON "pageout", as on these CI machines) would otherwise count code
    faulted back in during the measured call as growth. Only current mappings: locking future
    ones too would populate every reserved-but-unused region (malloc arenas, stacks)."""
    mcl_current = 1
    if ctypes.CDLL("libc.so.6", use_errno=True).mlockall(mcl_current) != 0:
        raise OSError(ctypes.get_errno(), "mlockall failed: the memory probe needs to lock its pages")


def main():
    impl, tokens, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    b = 8
    t = tokens // b
    args = (
        torch.randn(b, t, 64, requires_grad=True), torch.randn(vocab, 64, requires_grad=True),
        torch.randn(b, t, 64), torch.randn(b, t, 64), torch.randn(vocab, 64),
        torch.randint(0, vocab, (b, t)), torch.ones(b, t, dtype=torch.bool), torch.arange(b) // 4,
    )
    small = [a[:, :2] if a.dim() >= 2 and a.shape[0] == b else a for a in args]
    # Warm up on a tiny batch so one-time library allocations are not counted.
    if impl == "reference":
        fn = va_opd_loss_reference
        va_opd_loss_reference(*small)[0].backward()
    else:
        def fn(*a):
            return va_opd_loss(*a, backend="torch", chunk_size=chunk)
        fn(*small)[0].backward()
    for a in args[:2]:
        a.grad = None
    lock_resident_pages()
    before = rss_bytes()
    loss, _ = fn(*args)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The returned gradients are outputs, not overhead (the same size as the student inputs).
    grads = sum(a.grad.numel() * a.grad.element_size() for a in args[:2])
    print(max(0, peak - before - grads))


if __name__ == "__main__":
    main()
