"""The batched Newton–Schulz iteration against torch.optim.Muon's per-matrix one."""

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from k2_workers.optim import NS_COEFFICIENTS, zeropower_via_newton_schulz


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_single_matrix_equals_torch_muon(shape: tuple[int, int]) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(zeropower_via_newton_schulz(g), expected)


@pytest.mark.parametrize("shape", [(6, 16, 40), (6, 40, 16)])
def test_batch_equals_per_matrix_loop(shape: tuple[int, int, int]) -> None:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    batched = zeropower_via_newton_schulz(g)
    looped = torch.stack([zeropower_via_newton_schulz(m) for m in g])
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)


def test_output_is_roughly_orthogonal() -> None:
    # The quintic iteration leaves singular values spread around 1 (roughly 0.7..1.2), not exactly 1.
    g = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(2))
    sv = torch.linalg.svdvals(zeropower_via_newton_schulz(g, dtype=torch.float32))
    assert sv.min() > 0.5 and sv.max() < 1.3
    assert torch.linalg.svdvals(g).max() > 5  # the input was far from orthogonal


def test_rejects_4d() -> None:
    with pytest.raises(ValueError, match="2-D or 3-D"):
        zeropower_via_newton_schulz(torch.zeros(2, 2, 2, 2))
