import copy

import pytest
import torch

from qdrop_mm.core import (NonFiniteLossError, PTQCallbacks, StageConfig, UnitCache, act_quantizers, build_method,
                           output_mse, quant_state, reconstruct_unit, run_ptq, weight_quantizers)
from qdrop_mm.core.ptq import build_unit_cache, calibrate_activations
from qdrop_mm.core.reconstruct import mix_inputs
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
