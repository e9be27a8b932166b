"""The fused kernels against the reference autograd ops: same numbers, and a drop with the right statistics."""
import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from qdrop_mm.core import build_method, reconstruct_unit, weight_quantizers
from qdrop_mm.core import fused
from qdrop_mm.core.adaround import AdaRoundQuantizer
from qdrop_mm.core.lsq import LSQActQuantizer
from qdrop_mm.core.ptq import build_unit_cache, calibrate_activations
from qdrop_mm.core.qmodules import QuantLayer
from qdrop_mm.core.reconstruct import output_mse
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


def _calibrated(bits=4, seed=0, signed=False):
    torch.manual_seed(seed)
    q = LSQActQuantizer(bits)
    q.start_observing()
    x = torch.randn(4, 8, 6, 6)
    q(x if signed else torch.relu(x))
    q.finish_observing()
    return q


def _grads(q, x, activation, gy, fused_path):
    """Output and gradients (x, step) of q(activation(x)) on the fused or the reference path."""
    q.fused = fused_path
    x = x.detach().clone().requires_grad_(True)
    q.scale.grad = None
    y = q.quantize_after(x, activation)
    (y * gy).sum().backward()
    return y.detach(), x.grad, q.scale.grad.clone()


@pytest.mark.parametrize('activation', [None, nn.ReLU(), nn.ReLU6()])
def test_no_drop_matches_reference_to_float_rounding(activation):
    q = _calibrated(bits=4, seed=1, signed=activation is None)
    q.scale.requires_grad_(True)
    x = torch.randn(3, 8, 7, 7) * 4
    gy = torch.randn_like(x)
    ref = _grads(q, x, activation, gy, fused_path=False)
    out = _grads(q, x, activation, gy, fused_path=True)
    assert torch.equal(out[0], ref[0])
    assert torch.allclose(out[1], ref[1], rtol=1e-6, atol=0)  # the reference's x gradient is (g·s)/s
    assert torch.allclose(out[2], ref[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('keep_prob', [0.3, 0.5, 0.9])
def test_keep_fraction_and_fresh_independent_masks(keep_prob):
    x = torch.empty(64, 64, 32)
    torch.manual_seed(0)
    masks = [fused.keep_mask(x, fused.draw_seed(x.device), fused.keep_threshold(keep_prob)) for _ in range(2)]
    n = x.numel()
    tol = 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)
    for m in masks:
        assert abs(m.float().mean().item() - keep_prob) < tol
    both = (masks[0] & masks[1]).float().mean().item()
    assert abs(both - keep_prob ** 2) < 5 * math.sqrt(keep_prob ** 2 / n)  # masks of two calls independent
    flat = masks[0].flatten().float()
    neighbours = (flat[:-1] * flat[1:]).mean().item()
    assert abs(neighbours - keep_prob ** 2) < 5 * math.sqrt(keep_prob ** 2 / n)  # neighbours independent


def test_drop_gradients_straight_through_where_kept_identity_where_dropped():
    q = _calibrated(bits=3, seed=2)
    q.scale.requires_grad_(True)
    q.drop_prob = 0.5
    x = torch.randn(4, 8, 6, 6) * 3
    gy = torch.randn_like(x)
    torch.manual_seed(7)
    y, gx, gs = _grads(q, x, nn.ReLU(), gy, fused_path=True)
    torch.manual_seed(7)
    keep = fused.keep_mask(x, fused.draw_seed(x.device), fused.keep_threshold(0.5))
    r = torch.relu(x)
    assert torch.equal(y, torch.where(keep, q.quantize(r).detach(), r))
    s, z = q.scale.detach(), q.zero_point
    level = torch.round(r / s) + z
    inside = (level >= 0) & (level <= q.qmax)
    expected_gx = torch.where(keep, gy * inside, gy) * (x > 0)
    assert torch.equal(gx, expected_gx)
    d_scale = torch.where(inside, torch.round(r / s) - r / s, torch.clamp(level, 0, q.qmax) - z)
    expected_gs = (gy * d_scale * keep).sum() / math.sqrt(x.numel() * q.qmax)
    assert gs.item() == pytest.approx(expected_gs.item(), rel=1e-5)
    assert 0.4 < keep.float().mean().item() < 0.6


def test_mix_inputs_extremes_and_statistics():
    a, b = torch.zeros(60000), torch.ones(60000)  # below the compile threshold: eager kernel
    assert fused.mix_inputs(a, b, 1.0) is b and fused.mix_inputs(a, b, 0.0) is a
    torch.manual_seed(0)
    m1, m2 = fused.mix_inputs(a, b, 0.5), fused.mix_inputs(a, b, 0.5)
    assert abs(m1.mean().item() - 0.5) < 0.01 and set(m1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(m1, m2)


def test_soft_rounding_and_regulariser_match_reference():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    q = AdaRoundQuantizer(w, 4)
    q.init_rounding(w)
    q.set_mode('soft')
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 4)  # some h(V) clipped at 0 or 1
    gy = torch.randn_like(w)
    out = {}
    for path in (False, True):
        q.fused = path
        q.alpha.grad = None
        loss = (q(w) * gy).sum() + 0.01 * q.round_loss(7.5)
        loss.backward()
        out[path] = (q(w).detach(), q.round_loss(7.5).detach(), q.alpha.grad.clone())
    assert torch.equal(out[True][0], out[False][0])
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-6)
    assert torch.allclose(out[True][2], out[False][2], rtol=1e-5, atol=1e-7)


def test_output_mse_matches_reference():
    pred = torch.randn(2, 5, 4, 4, requires_grad=True)
    target = torch.randn(2, 5, 4, 4)
    ref = output_mse(pred, target)
    ref.backward()
    g_ref, pred.grad = pred.grad.clone(), None
    out = fused.output_mse(pred, target)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(pred.grad, g_ref, rtol=1e-6, atol=1e-8)


def test_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    kernel = fused.Kernel(fused._mix, min_numel=1)

    def broken(*args):
        raise RuntimeError('backend exploded')

    monkeypatch.setattr(kernel, 'compiled', lambda: broken)
    a, b, seed = torch.zeros(50), torch.ones(50), torch.tensor(3, dtype=torch.int32)
    with pytest.warns(UserWarning, match='torch.compile of _mix failed .*backend exploded'):
        y = kernel(a, b, seed, 0)
    assert torch.equal(y, fused._mix(a, b, seed, 0)) and kernel.failed
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        kernel(a, b, seed, 0)


def test_compiled_kernels_match_eager_on_a_tiny_shape():
    """One compile of the LSQ+drop pair (tiny shape: compile time, not size, is what this costs)."""
    torch.manual_seed(0)
    x, g = torch.randn(2, 3, 5, 7) * 2, torch.randn(2, 3, 5, 7)
    args = (torch.tensor(0.3), torch.tensor(2.0), torch.tensor(12345, dtype=torch.int32), 15,
            fused.keep_threshold(0.5), 0.0, None)
    y_c = fused.lsq_forward.compiled()(x, *args)
    gx_c, gs_c = fused.lsq_backward.compiled()(g, x, *args)
    y_e = fused._lsq_forward(x, *args)
    gx_e, gs_e = fused._lsq_backward(g, x, *args)
    assert torch.allclose(y_c, y_e, atol=1e-6) and torch.equal(gx_c, gx_e)
    assert gs_c.item() == pytest.approx(gs_e.item(), rel=1e-5)


def test_reconstruction_without_drop_matches_the_reference_path():
    net, batches = make_toy_setup(seed=0, num_batches=3, batch_size=4, size=16)
    units = quantize_toy_net(net, w_bits=4, a_bits=4)
    calibrate_activations(net, batches, toy_forward)
    stage = replace(build_method('qdrop', iters=30, log_interval=10).stages[0], drop_prob=1.0)
    unit = units[1].module
    cache = build_unit_cache(net, unit, batches, toy_forward, stage)
    start = copy.deepcopy(unit.state_dict())
    results = {}
    for path in (False, True):
        unit.load_state_dict(start)
        for m in unit.modules():
            if isinstance(m, (LSQActQuantizer, AdaRoundQuantizer)):
                m.fused = path
        torch.manual_seed(0)
        res = reconstruct_unit(unit, cache, stage)
        results[path] = (res, [wq.alpha.detach().clone() for wq in weight_quantizers(unit)])
    (ref, ref_alpha), (out, out_alpha) = results[False], results[True]
    assert out.loss_after == pytest.approx(ref.loss_after, rel=1e-4)
    assert all(c[1] == pytest.approx(r[1], rel=1e-4) for c, r in zip(out.curve, ref.curve))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out_alpha, ref_alpha))


def test_layer_with_relu_folded_matches_separate_ops():
    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(4, 6, 3, padding=1), 4, activation=nn.ReLU(), a_bits=4)
    x = torch.randn(2, 4, 8, 8)
    layer.act_quantizer.start_observing()
    layer(x)
    layer.act_quantizer.finish_observing()
    outs = []
    for path in (False, True):
        layer.act_quantizer.fused = path
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
