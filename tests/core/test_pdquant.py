"""PD-Quant on the seeded toy network: the prediction-difference term, its gradients through the tail,
distribution correction, and the ``pdquant`` method against ``qdrop`` at W2A4."""
import copy

import pytest
import torch
import torch.nn.functional as F

from qdrop_mm.core import (PredictionGroup, PredictionSource, PredictionTerm, act_quantizers, build_method,
                           quant_state, run_ptq, weight_quantizers)
from qdrop_mm.core.distribution_correction import bn_mismatch, correct_input, per_image_stats
from qdrop_mm.core.prediction_loss import box_difference, foreground_weight, score_difference
from qdrop_mm.core.ptq import PTQResult, UnitRecord, build_unit_cache, calibrate_activations
from qdrop_mm.core.reconstruct import ReconResult
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, smooth_images, toy_forward


pytestmark = pytest.mark.usefixtures('one_thread')


def toy_predict(model, batch, context):
    return [PredictionGroup(model(batch), 'softmax')], []


@pytest.fixture(scope='module')
def toy():
    net, batches = make_toy_setup(seed=0, num_batches=8, batch_size=4, size=16)
    with torch.no_grad():
        net.head.weight.mul_(10)  # confident logits, like a trained classifier's
    return net, batches


def quantized(net, batches, w_bits=2, a_bits=4):
    q, fp = copy.deepcopy(net), copy.deepcopy(net)
    units = quantize_toy_net(q, w_bits, a_bits)
    calibrate_activations(q, batches, toy_forward)
    return q, units, PredictionSource(toy_predict, lambda name: getattr(fp, name)), fp


def test_softmax_term_is_the_authors_kl():
    g = torch.Generator().manual_seed(0)
    q, fp = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    authors = torch.nn.KLDivLoss(reduction='batchmean')(F.log_softmax(q / 4, 1), F.softmax(fp / 4, 1))
    assert score_difference(q, fp, 'softmax', 4.0).item() == pytest.approx(authors.item(), rel=1e-5)
    assert score_difference(fp, fp, 'softmax', 4.0).item() == 0.0


def test_sigmoid_term_is_the_binary_kl_summed_over_classes():
    g = torch.Generator().manual_seed(1)
    q, fp = torch.randn(5, 3, generator=g) * 2, torch.randn(5, 3, generator=g) * 2
    p, r = torch.sigmoid(fp / 2), torch.sigmoid(q / 2)
    expected = (p * (p / r).log() + (1 - p) * ((1 - p) / (1 - r)).log()).sum() / 5
    assert score_difference(q, fp, 'sigmoid', 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert score_difference(fp, fp, 'sigmoid', 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_box_term_counts_foreground_rows_only():
    scores = torch.tensor([[-12.0], [12.0]])  # sigmoid: row 0 background, row 1 an object
    fp_boxes = torch.zeros(2, 4)
    w = foreground_weight(PredictionGroup(scores, 'sigmoid', fp_boxes))
    off_background = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    off_object = off_background.flip(0)
    assert box_difference(off_background, fp_boxes, w).item() < 1e-4
    assert box_difference(off_object, fp_boxes, w).item() == pytest.approx(4.0, rel=1e-4)
    softmax = PredictionGroup(torch.tensor([[0.0, 9.0], [9.0, 0.0]]), 'softmax', fp_boxes, background=1)
    assert foreground_weight(softmax).tolist() == pytest.approx([1.234e-4, 1 - 1.234e-4], abs=1e-6)


def test_term_is_zero_with_quantizers_off_and_positive_with_them_on(toy):
    net, batches = toy
    q, units, source, _ = quantized(net, batches)
    term = PredictionTerm(q, [(u.name, u.module) for u in units], batches, source, build_method('pdquant').prediction)
    stage = build_method('pdquant').stages[0]
    block1 = units[1].module
    cache = build_unit_cache(q, block1, batches, toy_forward, stage)
    with torch.no_grad():
        with quant_state(q, weight=False, act=False):
            off = [term.difference(block1, i, block1(cache.x_fp.get(i, torch.device('cpu')))).item()
                   for i in range(len(batches))]
        on = [term._tail_difference(block1, i, block1(cache.x_q.get(i, torch.device('cpu'))), stage).item()
              for i in range(len(batches))]
    assert max(abs(v) for v in off) < 1e-9
    assert min(on) > 1e-3


def test_tail_runs_later_units_fp_and_reaches_rounding_and_steps(toy):
    net, batches = toy
    q, units, source, fp = quantized(net, batches)
    method = build_method('pdquant')
    term = PredictionTerm(q, [(u.name, u.module) for u in units], batches, source, method.prediction)
    block1, block2 = units[1].module, units[2].module
    x = build_unit_cache(q, block1, batches, toy_forward, method.stages[0]).x_q.get(3, torch.device('cpu'))
    with torch.no_grad():
        out = block1(x)
        tail = term.predictions(block1, 3, out)[0].scores
        with quant_state(block2, weight=False, act=False):
            manual = q.head(block2(out).mean((2, 3)))
    assert torch.allclose(tail, manual, atol=1e-6)
    assert all(wq.enabled for wq in weight_quantizers(block2)) and all(aq.enabled for aq in act_quantizers(block2))

    for m in block1.modules():
        if hasattr(m, 'weight_quantizer'):
            m.weight_quantizer.init_rounding(m.weight)
            m.weight_quantizer.set_mode('soft')
    for aq in act_quantizers(block1):
        aq.scale.requires_grad_(True)
    term._tail_difference(block1, 3, block1(x), method.stages[0]).backward()
    alphas = [wq.alpha.grad for wq in weight_quantizers(block1)]
    assert all(g is not None and g.abs().sum().item() > 0 for g in alphas)
    assert all(aq.scale.grad is not None and aq.scale.grad.abs().item() > 0 for aq in act_quantizers(block1))
    assert all(wq.alpha.grad is None for wq in weight_quantizers(block2))


def test_distribution_correction_moves_bn_input_statistics_to_the_running_ones(toy):
    net, batches = toy
    fp_block = copy.deepcopy(net.block1)
    with torch.no_grad():
        fp_block.bn1.running_mean += 0.3
        fp_block.bn1.running_var *= 1.5
    x = net.stem(batches[0]).detach()
    target_std = (fp_block.bn1.running_var + 1e-6).sqrt()

    def gaps(t):
        mean, std = per_image_stats(fp_block.conv1(t).detach())
        return ((mean.mean(0) - fp_block.bn1.running_mean).abs().mean().item(),
                (std.mean(0) - target_std).abs().mean().item())
    mean0, std0 = gaps(x)
    loose = correct_input(fp_block, x, iters=100, lr=1e-2, weight=1.0)
    tight = correct_input(fp_block, x, iters=100, lr=1e-2, weight=50.0)
    mean1, std1 = gaps(loose)
    with torch.no_grad():
        m0, m_loose, m_tight = (bn_mismatch(fp_block, t).item() for t in (x, loose, tight))
    assert m_loose < 0.5 * m0 and m_tight < m0
    assert mean1 < 0.85 * mean0 and std1 < 0.5 * std0
    assert (tight - x).norm() < 0.05 * x.norm() < (loose - x).norm()
    assert not fp_block.conv1.weight.requires_grad or fp_block.conv1.weight.grad is None


def _final_kl(q, net, data, temperature=4.0):
    with torch.no_grad():
        return sum(F.kl_div(F.log_softmax(q(b) / temperature, 1), F.log_softmax(net(b) / temperature, 1),
                            log_target=True, reduction='batchmean').item() for b in data) / len(data)


def test_pdquant_changes_the_final_prediction_error_at_w2a4(toy):
    net, batches = toy
    g = torch.Generator().manual_seed(123)
    held_out = [smooth_images(4, 16, g) for _ in range(16)]
    kl, records = {}, {}
    runs = (('qdrop', {}), ('pdquant', dict(dc_iters=20)), ('pdquant_x10', dict(pd_weight=100.0, dc_iters=0)))
    for name, opts in runs:
        torch.manual_seed(0)
        q, units, source, _ = quantized(net, batches)
        method = build_method(name.split('_')[0], iters=150, batch_size=4, **opts)
        records[name] = run_ptq(q, units, batches, toy_forward, method, prediction=source).records
        kl[name] = _final_kl(q, net, held_out)
    # measured here (KL at T=4 on held-out images): RTN 0.364, qdrop 0.1225, pdquant 0.1177, pd_weight 100: 0.0965
    assert abs(kl['pdquant'] - kl['qdrop']) > 0.01 * kl['qdrop']
    assert kl['pdquant_x10'] < 0.9 * kl['qdrop']
    for rec in records['pdquant'][1:]:
        extra = rec.result.extra
        assert extra['pd_loss_after'] < 0.7 * extra['pd_loss_before']
        assert extra['dc_mismatch_after'] < extra['dc_mismatch_before'] and extra['dc_seconds'] > 0
    assert not any(r.result.extra for r in records['qdrop'])


def test_pd_interval_applies_the_term_every_k_iterations(toy):
    net, batches = toy
    q, units, source, _ = quantized(net, batches)
    calls = []

    def counting(model, batch, context):
        calls.append(torch.is_grad_enabled())
        return toy_predict(model, batch, context)
    method = build_method('pdquant', iters=12, pd_interval=4, dc_iters=0)
    run_ptq(q, units[:1], batches, toy_forward, method, prediction=PredictionSource(counting))
    trained = sum(calls)  # FP pass and evaluation run without grad
    assert trained == 3 and len(calls) == 3 + len(batches) + 2 * len(batches)


def test_method_options_and_missing_source_fail_with_the_key(toy):
    with pytest.raises(ValueError, match='^pd_interval must be a positive integer'):
        build_method('pdquant', pd_interval=0)
    with pytest.raises(ValueError, match="^dc_iters only applies to methods with a prediction term"):
        build_method('qdrop', dc_iters=3)
    net, batches = toy
    q, units, _, _ = quantized(net, batches)
    with pytest.raises(ValueError, match='prediction term: pass run_ptq\\(prediction='):
        run_ptq(q, units, batches, toy_forward, build_method('pdquant', iters=2))


def test_hooks_check_through_the_source_and_report_the_units_with_a_prediction_loss():
    seen = []

    def refuse_heads(model, paths):
        seen.append(list(paths))
        if 'head' in paths:
            raise ValueError('reconstructs backbone and neck units only')
    source = PredictionSource(toy_predict, check=refuse_heads)
    (hooks,) = build_method('pdquant', iters=2).build_hooks(source)
    hooks.check(None, ['stem'])
    with pytest.raises(ValueError, match='^reconstructs backbone and neck units only$'):
        hooks.check(None, ['stem', 'head'])
    assert seen == [['stem'], ['stem', 'head']]
    PredictionSource(toy_predict).check(None, ['head'])  # a source without a check accepts any scope

    def record(name, **extra):
        return UnitRecord(name, 'block', 0, ReconResult(1.0, 0.5, 2, 0.1, extra=extra), 0)
    result = PTQResult({}, [record('a', pd_loss_before=2.0, pd_loss_after=1.0), record('b')])
    assert hooks.report(result) == {'prediction_loss': [{'name': 'a', 'stage': 0, 'pd_loss_before': 2.0,
                                                         'pd_loss_after': 1.0}]}
    assert hooks.report(PTQResult({}, [record('b')])) == {}
    (qwt,) = build_method('qdrop_qwt', iters=2).build_hooks()
    assert qwt.report(result) == {} and qwt.check(None, ['head']) is None
