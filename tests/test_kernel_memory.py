"""Peak extra memory of the chunked torch path: anonymous resident memory of fresh subprocesses."""
import os
import subprocess
import sys

PROBE = os.path.join(os.path.dirname(__file__), "memprobe.py")


def peak_extra(impl: str, tokens: int, vocab: int, chunk: int | None = None) -> int:
    cmd = [sys.executable, PROBE, impl, str(tokens), str(vocab)] + ([str(chunk)] if chunk else [])
    # A fixed mmap threshold makes glibc hand every large block back to the OS when freed, so the
    # resident size follows live memory (glibc's sliding threshold otherwise keeps some freed chunks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def test_torch_path_uses_a_fifth_of_the_reference_memory_and_is_flat_in_tokens():
    reference = peak_extra("reference", 2048, 32000)
    fused_2k = peak_extra("torch", 2048, 32000, 256)
    fused_1k = peak_extra("torch", 1024, 32000, 256)
    fused_4k = peak_extra("torch", 4096, 32000, 256)
    mib = 2**20
    report = f"reference {reference / mib:.0f} MiB, torch path 1K/2K/4K tokens {fused_1k / mib:.0f}/{fused_2k / mib:.0f}/{fused_4k / mib:.0f} MiB"
    # A [2048 x 32000] fp32 tensor is 250 MiB; the reference holds several at once.
    assert reference > 4 * 250 * mib, report
    assert fused_2k * 5 <= reference, report
    # Flat: quadrupling the tokens at a fixed chunk adds well under one fp32 chunk of logits (31 MiB).
    assert fused_4k - fused_1k < 16 * mib, report
