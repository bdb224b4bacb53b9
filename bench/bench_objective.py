"""The per-token objective (no vocabulary dimension) at 256 responses x 4,096 tokens."""
import torch

from vaopd.objective import loss_coefficients, visual_advantage


def _batch():
    g = torch.Generator().manual_seed(0)
    clean, ablated = -torch.rand(256, 4096, generator=g) * 5, -torch.rand(256, 4096, generator=g) * 5
    mask = torch.rand(256, 4096, generator=g) > 0.1
    return clean, ablated, mask, torch.arange(256) // 4


def test_va_opd_coefficients_256x4096(benchmark):
    clean, ablated, mask, groups = _batch()

    def run():
        va = visual_advantage(clean, ablated, mask)
        return loss_coefficients("va_opd", va, mask, groups)

    coef = benchmark(run)
    assert torch.allclose(coef.view(64, -1).sum(1), torch.ones(64), atol=1e-4)


def test_opd_coefficients_256x4096(benchmark):
    _, _, mask, groups = _batch()
    coef = benchmark(loss_coefficients, "opd", None, mask, groups)
    assert torch.allclose(coef.view(64, -1).sum(1), torch.ones(64), atol=1e-4)
