import pytest
import torch

from qdrop_mm.core.fake_quant import UniformQuantizer, check_bits, fake_quantize, qparams_from_range, round_ste


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_per_channel_levels_on_grid(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 3, 6).reshape(6, 1, 1, 1)
    lo, hi = w.flatten(1).min(1).values, w.flatten(1).max(1).values
    scale, zp = qparams_from_range(lo, hi, 2 ** bits - 1)
    q = UniformQuantizer(bits, ch_axis=0)
    q.set_qparams(scale, zp)
    wq = q(w)
    levels = wq / scale.reshape(-1, 1, 1, 1) + zp.reshape(-1, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().min() >= 0 and levels.round().max() <= 2 ** bits - 1
    for c in range(6):
        assert levels[c].round().unique().numel() <= 2 ** bits
    # nearest rounding: error at most half a step inside the range
    assert ((wq - w).abs() <= scale.reshape(-1, 1, 1, 1) / 2 + 1e-6).all()


def test_per_tensor_zero_exact_and_ste_gradient():
    x = torch.linspace(-1, 3, 50, requires_grad=True)
    scale, zp = qparams_from_range(x.min().detach(), x.max().detach(), 15)
    y = fake_quantize(x, scale, zp, 15)
    assert fake_quantize(torch.zeros(1), scale, zp, 15).item() == 0.0
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(round_ste(torch.tensor([0.4, 0.6])), torch.tensor([0.0, 1.0]))


def test_clamping_outside_range():
    scale, zp = torch.tensor(0.5), torch.tensor(2.0)
    y = fake_quantize(torch.tensor([-10.0, 10.0]), scale, zp, 3)
    assert y.tolist() == [-1.0, 0.5]


@pytest.mark.parametrize('bad', [1, 9, 4.0, True, '4'])
def test_bits_validation(bad):
    with pytest.raises(ValueError, match='bits'):
        check_bits(bad)
