"""Peak extra memory of the chunked torch path: anonymous resident memory of fresh subprocesses."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test starts fresh processes that build [tokens x vocab] logits

PROBE = os.path.join(os.path.dirname(__file__), "memprobe.py")


def peak_extra(impl: str, tokens: int, vocab: int, chunk: int | None = None, va: str = "sampled") -> int:
    cmd = [sys.executable, PROBE, impl, str(tokens), str(vocab), str(chunk or "default"), va]
    # A fixed mmap threshold makes glibc hand every large block back to the OS when freed, so the
    # resident size follows live memory (glibc's sliding threshold otherwise keeps some freed chunks).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=env)
    return int(out.stdout.strip().splitlines()[-1])


MIB = 2**20


def test_torch_path_uses_a_fifth_of_the_reference_memory_and_is_flat_in_tokens():
    # The default CPU chunk (1,024 rows) holds a sibling group (4 x 256 tokens): the one-pass path.
    reference = peak_extra("reference", 2048, 32000)
    fused_2k = peak_extra("torch", 2048, 32000)
    fused_1k = peak_extra("torch", 1024, 32000)
    fused_4k = peak_extra("torch", 4096, 32000)
    report = f"reference {reference / MIB:.0f} MiB, torch path 1K/2K/4K tokens {fused_1k / MIB:.0f}/{fused_2k / MIB:.0f}/{fused_4k / MIB:.0f} MiB"
    # A [2048 x 32000] fp32 tensor is 250 MiB; the reference holds several at once.
    assert reference > 4 * 250 * MIB, report
    assert fused_2k * 5 <= reference, report
    # 1.5 chunks of fp32 logits (188 MiB) plus a few MiB of row-op temporaries.
    assert fused_2k < 1.5 * 1024 * 32000 * 4 + 48 * MIB, report
    # Flat: quadrupling the tokens at a fixed chunk adds well under one fp32 chunk of logits (125 MiB).
    assert fused_4k - fused_1k < 16 * MIB, report


def test_two_phase_fallback_is_flat_in_tokens():
    # A 256-row chunk cannot hold a 1,024-token sibling group: the two-phase path.
    fused_1k = peak_extra("torch", 1024, 32000, 256)
    fused_4k = peak_extra("torch", 4096, 32000, 256)
    report = f"two-phase torch path 1K/4K tokens {fused_1k / MIB:.0f}/{fused_4k / MIB:.0f} MiB"
    assert fused_4k < 1.5 * 256 * 32000 * 4 + 48 * MIB, report
    assert fused_4k - fused_1k < 16 * MIB, report


def test_distribution_va_keeps_both_paths_within_the_same_buffers():
    # The two teacher views side by side reuse the teacher buffer (one pass) or phase A's chunk
    # buffer (two phases): the same bound as the sampled VA, flat in tokens.
    one_pass = peak_extra("torch", 2048, 32000, va="distribution")
    two_1k = peak_extra("torch", 1024, 32000, 256, va="distribution")
    two_4k = peak_extra("torch", 4096, 32000, 256, va="distribution")
    report = f"distribution VA: one pass 2K tokens {one_pass / MIB:.0f} MiB, two phases 1K/4K {two_1k / MIB:.0f}/{two_4k / MIB:.0f} MiB"
    assert one_pass < 1.5 * 1024 * 32000 * 4 + 48 * MIB, report
    assert two_4k < 1.5 * 256 * 32000 * 4 + 48 * MIB, report
    assert two_4k - two_1k < 16 * MIB, report
