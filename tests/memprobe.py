"""Peak extra anonymous memory of one loss forward+backward, in a fresh process.

Usage: python memprobe.py {reference|torch} TOKENS VOCAB [CHUNK [VA]] (CHUNK "default" for the
kernel's default; VA a ``LossSpec.va`` estimator, default "sampled"); prints the peak growth in bytes
of the process's anonymous resident memory (``RssAnon``) over its value just before the call
(inputs already built), minus the returned gradients.

Anonymous memory, sampled every ~0.5 ms from a thread (torch releases the GIL inside its ops),
rather than the whole resident size: on machines that page cold memory out proactively (DAMON
"pageout", as on these CI machines) file-backed library code faulted back in during the call
would otherwise count as growth. Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed
blocks go straight back to the OS and the resident size follows live memory.
"""
import sys
import threading
import time

import torch

from vaopd.kernels import LossSpec, va_opd_loss, va_opd_loss_reference


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """Largest ``RssAnon`` seen while running."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = rss_anon_bytes()
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(0.0005)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, rss_anon_bytes())


def main():
    impl, tokens, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "default" else None
    spec = LossSpec(va=sys.argv[5] if len(sys.argv) > 5 else "sampled")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    # Responses of 256 tokens in sibling groups of 4: 1,024-token groups at every token count, so
    # a chunk of 1,024 rows or more runs the one-pass path and a smaller one the two phases.
    t = min(256, tokens)
    b = tokens // t
    args = (
        torch.randn(b, t, 64, requires_grad=True), torch.randn(vocab, 64, requires_grad=True),
        torch.randn(b, t, 64), torch.randn(b, t, 64), torch.randn(vocab, 64),
        torch.randint(0, vocab, (b, t)), torch.ones(b, t, dtype=torch.bool), torch.arange(b) // 4,
    )
    small = [a[:, :2] if a.dim() >= 2 and a.shape[0] == b else a for a in args]
    # Warm up on a tiny batch so one-time library allocations are not counted.
    if impl == "reference":
        def fn(*a):
            return va_opd_loss_reference(*a, spec=spec)
    else:
        def fn(*a):
            return va_opd_loss(*a, spec=spec, backend="torch", chunk_size=chunk)
    fn(*small)[0].backward()
    for a in args[:2]:
        a.grad = None
    before = rss_anon_bytes()
    sampler = PeakSampler()
    sampler.start()
    loss, _ = fn(*args)
    loss.backward()
    peak = sampler.stop() - before
    # The returned gradients are outputs, not overhead (the same size as the student inputs).
    grads = sum(a.grad.numel() * a.grad.element_size() for a in args[:2])
    print(max(0, peak - grads))


if __name__ == "__main__":
    main()
