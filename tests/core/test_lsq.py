import math

import pytest
import torch

from qdrop_mm.core.fused import draw_seed, keep_mask, keep_threshold
from qdrop_mm.core.lsq import LSQActQuantizer, clamp_steps


def _calibrated(bits=4, seed=0):
    torch.manual_seed(seed)
    q = LSQActQuantizer(bits)
    q.start_observing()
    q(torch.relu(torch.randn(4, 8, 6, 6)))
    q.finish_observing()
    return q


def test_drop_one_is_plain_quantization_and_zero_is_identity():
    q = _calibrated()
    x = torch.randn(2, 8, 5, 5)
    q.drop_prob = 1.0
    full = q(x)
    assert torch.equal(full, q.quantize(x))
    assert not torch.equal(full, x)
    q.drop_prob = 0.0
    assert torch.equal(q(x), x)


def test_drop_mixes_elementwise_with_fresh_masks():
    q = _calibrated()
    x = torch.rand(64, 64) * 3
    xq = q.quantize(x)
    changed = xq != x
    q.drop_prob = 0.3
    torch.manual_seed(0)
    y1, y2 = q(x), q(x)
    for y in (y1, y2):
        assert torch.all((y == x) | (y == xq))
    kept = (y1 == xq) & changed
    frac = kept.sum().item() / changed.sum().item()
    assert 0.25 < frac < 0.35
    assert not torch.equal(y1, y2)


def test_lsq_step_gradient_scaled():
    q = _calibrated(bits=4)
    q.scale.requires_grad_(True)
    x = torch.rand(3, 7) * 2
    q(x).sum().backward()
    scaled = q.scale.grad.item()
    s = q.scale.detach()
    x_s = x / s
    inside = (x_s.round() + q.zero_point >= 0) & (x_s.round() + q.zero_point <= q.qmax)
    expected = torch.where(inside, x_s.round() - x_s, torch.clamp(x_s.round() + q.zero_point, 0, q.qmax) - q.zero_point).sum()
    assert scaled == pytest.approx(expected.item() / math.sqrt(x.numel() * q.qmax), rel=1e-5)


def test_step_stays_positive_and_state_roundtrip():
    q = _calibrated()
    q.scale.data.fill_(-0.2)
    q.clamp_step()
    assert q.scale.item() == pytest.approx(0.2)
    q2 = LSQActQuantizer(4)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(10)
    assert q2.is_calibrated and torch.equal(q2(x), q(x))


def test_clamp_steps_matches_clamp_step_per_quantizer():
    qs = [_calibrated(seed=i) for i in range(3)]
    for q, v in zip(qs, (-0.2, 0.0, 0.3)):
        q.scale.data.fill_(v)
    clamp_steps(qs)
    assert [q.scale.item() for q in qs] == pytest.approx([0.2, 1e-8, 0.3])


def test_uncalibrated_is_identity_and_calibration_needs_data():
    q = LSQActQuantizer(4)
    x = torch.randn(3)
    assert torch.equal(q(x), x)
    q.start_observing()
    with pytest.raises(RuntimeError, match='saw no data'):
        q.finish_observing()


@pytest.mark.parametrize('keep_prob', [1.0, 0.5])
def test_fused_path_matches_reference_autograd(keep_prob):
    q = _calibrated(bits=3, seed=2)
    q.drop_prob = keep_prob
    q.scale.requires_grad_(True)
    x = (torch.randn(4, 8, 6, 6) * 2).requires_grad_(True)
    torch.manual_seed(7)
    y = q(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    fused_x, fused_s = x.grad.clone(), q.scale.grad.clone()
    x.grad, q.scale.grad = None, None
    torch.manual_seed(7)
    keep = keep_mask(x, draw_seed(x.device), keep_threshold(keep_prob)) if keep_prob < 1 else \
        torch.ones_like(x, dtype=torch.bool)
    ref = torch.where(keep, q.quantize(x), x)
    assert torch.equal(ref, y)
    (ref * gy).sum().backward()
    assert torch.allclose(fused_x, x.grad)
    assert torch.allclose(fused_s, q.scale.grad, rtol=1e-4, atol=1e-6)
