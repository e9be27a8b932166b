import copy

import pytest
import torch

from qdrop_mm.core import (NonFiniteLossError, PTQCallbacks, StageConfig, UnitCache, act_quantizers, build_method,
                           output_mse, quant_state, reconstruct_unit, run_ptq, weight_quantizers)
from qdrop_mm.core.ptq import build_unit_cache, calibrate_activations
from qdrop_mm.core.reconstruct import mix_inputs
from qdrop_mm.core.unit_cache import Entry
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


@pytest.fixture(scope='module')
def toy():
    return make_toy_setup(seed=0, num_batches=6, batch_size=4, size=16)


def _feature_mse(net, ref, batches):
    with torch.no_grad():
        return sum(output_mse(toy_forward(net, b), ref.features(b)).item() for b in batches) / len(batches)


def test_output_mse_sums_channels():
    pred, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert output_mse(pred, target).item() == 3.0


def test_mix_inputs_extremes_and_mix():
    a, b = torch.zeros(1000), torch.ones(1000)
    assert torch.equal(mix_inputs(a, b, 1.0), b)
    assert torch.equal(mix_inputs(a, b, 0.0), a)
    torch.manual_seed(0)
    m = mix_inputs(a, b, 0.5)
    assert 0.4 < m.mean().item() < 0.6 and set(m.unique().tolist()) == {0.0, 1.0}


def test_adaround_lowers_block_mse_clearly_vs_rtn(toy):
    net, batches = toy
    ref = copy.deepcopy(net)
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, w_bits=2, a_bits=4)
    calibrate_activations(q, batches, toy_forward)
    stage = build_method('adaround', iters=200).stages[0]
    cache = build_unit_cache(q, units[1].module, batches, toy_forward, stage)
    torch.manual_seed(0)
    res = reconstruct_unit(units[1].module, cache, stage)
    assert res.loss_after < 0.5 * res.loss_before
    assert all(wq.mode == 'hard' for wq in weight_quantizers(units[1].module))
    assert not any(wq.alpha.requires_grad for wq in weight_quantizers(units[1].module))
    assert res.curve[0][0] == 1 and res.curve[-1][0] == 200


def test_qdrop_network_beats_rtn_and_restores_state(toy):
    net, batches = toy
    ref = copy.deepcopy(net)
    errs = {}
    for name in ('rtn', 'qdrop'):
        torch.manual_seed(0)
        q = copy.deepcopy(net)
        units = quantize_toy_net(q, w_bits=2, a_bits=4)
        result = run_ptq(q, units, batches, toy_forward, build_method(name, iters=150))
        errs[name] = _feature_mse(q, ref, batches)
        assert len(result.records) == (3 if name == 'qdrop' else 0)
        for aq in act_quantizers(q):
            assert aq.drop_prob == 1.0 and aq.enabled and not aq.scale.requires_grad
        if name == 'qdrop':
            assert all(r.result.loss_after < r.result.loss_before for r in result.records)
            assert all(wq.mode == 'hard' for wq in weight_quantizers(q))
    assert errs['qdrop'] < 0.5 * errs['rtn']


def test_brecq_runs_two_passes_in_order(toy):
    net, batches = toy
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, 4, 4)
    seen = []

    class Record(PTQCallbacks):
        def after_unit(self, record):
            seen.append((record.stage, record.name))

    run_ptq(q, units, batches[:2], toy_forward, build_method('brecq', iters=5, act_iters=5), Record())
    assert seen == [(0, 'stem'), (0, 'block1'), (0, 'block2'), (1, 'stem'), (1, 'block1'), (1, 'block2')]


def test_act_steps_learned_only_when_asked(toy):
    net, batches = toy
    for name, changes in (('adaround', False), ('qdrop', True)):
        q = copy.deepcopy(net)
        units = quantize_toy_net(q, 4, 4)
        calibrate_activations(q, batches, toy_forward)
        before = [a.scale.item() for a in act_quantizers(q)]
        run_ptq(q, units, batches[:2], toy_forward, build_method(name, iters=20))
        after = [a.scale.item() for a in act_quantizers(q)]
        assert (before != after) == changes


def test_nan_loss_is_reported_with_iteration(toy):
    net, batches = toy
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, 4, 4)
    calibrate_activations(q, batches, toy_forward)
    bad = UnitCache.from_tensors([torch.randn(2, 16, 8, 8)], [torch.randn(2, 16, 8, 8)],
                                [torch.full((2, 16, 8, 8), float('nan'))])
    with pytest.raises(NonFiniteLossError, match='iteration 0'):
        reconstruct_unit(units[1].module, bad, StageConfig(iters=5, log_interval=1))


def _toy_unit_cache(method: str, **stage_kw):
    net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=4, size=16)
    units = quantize_toy_net(net, w_bits=2, a_bits=4)
    calibrate_activations(net, batches, toy_forward)
    stage = build_method(method, **stage_kw).stages[0]
    return units[1].module, build_unit_cache(net, units[1].module, batches, toy_forward, stage), stage


def test_early_stop_after_flat_checks_past_the_given_fraction():
    kw = dict(iters=400, log_interval=20, early_stop_after=0.5, early_stop_rel_tol=0.9)
    unit, cache, stage = _toy_unit_cache('adaround', early_stop_patience=2, **kw)
    torch.manual_seed(0)
    res = reconstruct_unit(unit, cache, stage)
    # checks at 200 (first: sets the best), 220 (flat 1), 240 (flat 2 -> stop)
    assert res.stopped_early and res.iters == 240 and res.curve[-1][0] == 240
    assert all(wq.mode == 'hard' for wq in weight_quantizers(unit))
    assert res.loss_after < res.loss_before and 0 < res.rel_error_after < res.rel_error_before
    unit, cache, stage = _toy_unit_cache('adaround', early_stop_patience=0, **kw)
    full = reconstruct_unit(unit, cache, stage)
    assert not full.stopped_early and full.iters == 400


def test_compile_failure_falls_back_to_eager_with_identical_result(monkeypatch):
    unit, cache, stage = _toy_unit_cache('qdrop', iters=30, log_interval=10)
    state = copy.deepcopy(unit.state_dict())
    torch.manual_seed(0)
    eager = reconstruct_unit(unit, cache, stage)
    eager_state = copy.deepcopy(unit.state_dict())

    def broken_compile(module, **kw):
        def run(x):
            raise RuntimeError('backend exploded')
        return run

    unit.load_state_dict(state)
    monkeypatch.setattr(torch, 'compile', broken_compile)
    from dataclasses import replace
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match='torch.compile failed .* backend exploded'):
        fallback = reconstruct_unit(unit, cache, replace(stage, compile=True))
    assert fallback.loss_after == eager.loss_after
    assert all(torch.equal(v, eager_state[k]) for k, v in unit.state_dict().items())


def test_stage_with_nothing_to_learn_leaves_the_unit_unchanged():
    from qdrop_mm.core import QuantLayer
    torch.manual_seed(0)
    layer = QuantLayer(torch.nn.Conv2d(4, 4, 3, padding=1), 4)  # no activation quantizer: like an FPN output conv
    xs = [torch.randn(2, 4, 6, 6) for _ in range(3)]
    with torch.no_grad():
        cache = UnitCache.from_tensors(xs, xs, [layer(x) * 1.1 for x in xs])
    acts_only = build_method('brecq', iters=10, act_iters=10).stages[1]
    state = copy.deepcopy(layer.state_dict())
    res = reconstruct_unit(layer, cache, acts_only)
    assert res.iters == 0 and res.loss_after == res.loss_before > 0
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())


class _SequentialCache:
    """Stands in for a UnitCache: ``sample`` hands out the given batches in turn (concatenated when asked
    for several at once), so one large batch and its accumulated pieces see the same data."""

    def __init__(self, xs, targets, piece: int) -> None:
        self.xs, self.targets, self.piece, self.pos = xs, targets, piece, 0

    def __len__(self) -> int:
        return len(self.xs)

    def entry(self, i, device):
        return Entry(self.xs[i], self.xs[i], self.targets[i])

    def sample(self, batch_size, device):
        n = batch_size // self.piece
        idx = [(self.pos + j) % len(self.xs) for j in range(n)]
        self.pos += n
        x, t = torch.cat([self.xs[i] for i in idx]), torch.cat([self.targets[i] for i in idx])
        return Entry(x, x, t)


def test_gradient_accumulation_equals_one_large_batch():
    """k accumulated batches of B step exactly like one batch of k·B (linear toy, rounding and act steps learned)."""
    from dataclasses import replace
    from qdrop_mm.core import QuantLayer
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 8)
    layer = QuantLayer(fc, 3, activation=torch.nn.ReLU(), a_bits=4)
    xs = [torch.randn(2, 16) for _ in range(8)]
    with torch.no_grad():
        targets = [torch.relu(fc(x)) for x in xs]
        layer.act_quantizer.start_observing()
        for x in xs:
            layer(x)
        layer.act_quantizer.finish_observing()
    stage = replace(build_method('qdrop', iters=25, drop_prob=1.0).stages[0], w_lr=1e-2, a_lr=1e-3, warmup=0.2,
                    schedule='paper')
    state = copy.deepcopy(layer.state_dict())
    big = reconstruct_unit(layer, _SequentialCache(xs, targets, 2), replace(stage, batch_size=8))
    big_state = copy.deepcopy(layer.state_dict())
    layer.load_state_dict(state)
    acc = reconstruct_unit(layer, _SequentialCache(xs, targets, 2), replace(stage, batch_size=2, accum_steps=4))
    acc_state = layer.state_dict()
    assert big.iters == acc.iters == 25
    assert abs(big.loss_after - acc.loss_after) <= 1e-6 * max(1.0, big.loss_after)
    for key in ('weight_quantizer.alpha', 'act_quantizer.scale'):
        assert torch.allclose(big_state[key], acc_state[key], rtol=1e-5, atol=1e-6), key
    alpha_moved = (big_state['weight_quantizer.alpha'] - state['weight_quantizer.alpha']).abs().max()
    assert alpha_moved > 0.1  # the comparison is not trivially of two unchanged tensors
    # and plain batches of 2 without accumulation take another path
    layer.load_state_dict(state)
    reconstruct_unit(layer, _SequentialCache(xs, targets, 2), replace(stage, batch_size=2))
    assert not torch.allclose(layer.state_dict()['weight_quantizer.alpha'], big_state['weight_quantizer.alpha'])


def test_learned_bias_corrects_a_mean_shift_and_is_kept_in_the_state_dict():
    from dataclasses import replace
    from qdrop_mm.core import QuantLayer
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 8)
    xs = [torch.randn(4, 16) for _ in range(6)]
    with torch.no_grad():
        targets = [fc(x) + 0.3 for x in xs]  # every output channel shifted by 0.3
    cache = UnitCache.from_tensors(xs, xs, targets)
    stage = build_method('adaround', iters=200, batch_size=4).stages[0]
    results, biases = {}, {}
    for learn in (False, True):
        layer = QuantLayer(fc, 4)
        torch.manual_seed(0)
        results[learn] = reconstruct_unit(layer, cache, replace(stage, learn_bias=learn, b_lr=1e-2))
        biases[learn] = layer.state_dict()['bias']
        assert not layer.bias.requires_grad
    assert torch.equal(biases[False], fc.bias.detach())
    shift = (biases[True] - fc.bias.detach()).mean().item()
    assert 0.2 < shift < 0.4  # the shift went into the bias
    assert results[True].loss_after < 0.1 * results[False].loss_after


def test_movement_reports_rounding_changes_and_step_moves():
    unit, cache, stage = _toy_unit_cache('qdrop', iters=60, log_interval=10)
    res = reconstruct_unit(unit, cache, stage)
    from qdrop_mm.core.reconstruct import rounding_changed_fraction
    assert res.movement['rounding_changed'] == rounding_changed_fraction(unit)
    assert 0.0 < res.movement['rounding_changed'] < 0.5
    assert res.movement['act_step_rel_change'] > 0.0
    for q in weight_quantizers(unit):
        q.set_mode('nearest')
    assert rounding_changed_fraction(unit) == 0.0


def test_quantized_path_calibration_observes_each_unit_behind_quantized_units(toy):
    net, batches = toy
    fp_net, q_net = copy.deepcopy(net), copy.deepcopy(net)
    fp_units, q_units = quantize_toy_net(fp_net, w_bits=2, a_bits=3), quantize_toy_net(q_net, w_bits=2, a_bits=3)
    n = calibrate_activations(fp_net, batches, toy_forward)
    assert calibrate_activations(q_net, batches, toy_forward, q_units) == n > 2
    fp_scales = [q.scale.item() for q in act_quantizers(fp_net)]
    q_scales = [q.scale.item() for q in act_quantizers(q_net)]
    # every range now sees quantized weights (and, after the first unit, quantized inputs): all move
    assert all(a != b for a, b in zip(q_scales, fp_scales))
    # the FP pass again gives the FP ranges: the difference is the path, not noise
    again = copy.deepcopy(net)
    quantize_toy_net(again, w_bits=2, a_bits=3)
    calibrate_activations(again, batches, toy_forward)
    assert [q.scale.item() for q in act_quantizers(again)] == fp_scales
    # and the method config carries the choice to run_ptq
    assert build_method('qdrop', act_calibration='quantized').act_calibration == 'quantized'
    with pytest.raises(ValueError, match='act_calibration must be one of'):
        build_method('qdrop', act_calibration='q')
