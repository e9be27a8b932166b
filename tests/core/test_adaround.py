import pytest
import torch

from qdrop_mm.core.adaround import AdaRoundQuantizer, RoundingRegularizer


def _quantizer(bits=4, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(8, 4, 3, 3)
    return w, AdaRoundQuantizer(w, bits)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_levels_on_per_channel_grid_in_every_mode(bits):
    w, q = _quantizer(bits)
    q.init_rounding(w)
    s, z = q.scale.reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
    for mode in ('nearest', 'hard'):
        q.set_mode(mode)
        levels = q(w) / s + z
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert levels.round().min() >= 0 and levels.round().max() <= 2 ** bits - 1


def test_init_makes_soft_equal_to_unrounded_weight():
    w, q = _quantizer(4)
    q.init_rounding(w)
    q.set_mode('soft')
    s, z = q.scale.reshape(-1, 1, 1, 1), q.zero_point.reshape(-1, 1, 1, 1)
    inside = ((w / s + z) > 0.5) & ((w / s + z) < q.qmax - 0.5)
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-4)


def test_hard_rounding_within_one_step_of_nearest():
    w, q = _quantizer(4)
    q.init_rounding(w)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 3)
    nearest = q.integer_weight(w)
    q.set_mode('hard')
    hard = q.integer_weight(w)
    diff = (hard - nearest).abs()
    assert diff.max().item() == 1.0
    assert (diff <= 1).all()
    floor_level = torch.clamp(torch.floor(w / q.scale.reshape(-1, 1, 1, 1)) + q.zero_point.reshape(-1, 1, 1, 1), 0, q.qmax)
    assert ((hard - floor_level) >= 0).all() and ((hard - floor_level) <= 1).all()


def test_soft_mode_needs_init():
    w, q = _quantizer()
    with pytest.raises(RuntimeError, match='init_rounding'):
        q.set_mode('soft')


def test_regularizer_schedule():
    reg = RoundingRegularizer(100, weight=0.01, warmup=0.2)
    assert reg.start_decay == 20
    assert reg(0, []) is None and reg(19, []) is None
    assert reg.beta(20) == pytest.approx(20.0)
    assert reg.beta(99) == pytest.approx(2.0)
    assert reg.beta(20 + 79 // 2) == pytest.approx(2 + 18 * (1 - 39 / 79))
    betas = [reg.beta(i) for i in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:]))


def test_round_loss_value():
    w, q = _quantizer()
    q.alpha.data.fill_(0.0)
    h = q.h()
    assert torch.allclose(h, torch.full_like(h, 0.5))
    assert q.round_loss(2.0).item() == pytest.approx(w.numel())
    q.alpha.data.fill_(100.0)
    assert q.round_loss(2.0).item() == pytest.approx(0.0)
    reg = RoundingRegularizer(10, weight=0.5, warmup=0.0)
    q.alpha.data.fill_(0.0)
    assert reg(0, [q]).item() == pytest.approx(0.5 * w.numel())
