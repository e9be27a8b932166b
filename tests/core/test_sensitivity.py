"""Per-unit sensitivity and bit budget on a seeded three-conv network (core only, a second)."""
import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, Unit, act_quantizers, calibrate_activations, weight_quantizers
from qdrop_mm.core.bit_budget import act_bit_counts, average_bits, weight_bit_counts
from qdrop_mm.core.capture import tensors_in
from qdrop_mm.core.sensitivity import measure_sensitivity


def _forward(model, batch):
    x = model[0](batch)
    y = model[1](x)
    return {'p1': y, 'p2': [model[2](y)]}  # nested outputs, like a neck's tuple of levels


@pytest.fixture()
def network():
    torch.manual_seed(0)
    bits = [8, 2, 4]
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)]
    model = nn.Sequential(*[QuantLayer(conv, b, activation=nn.ReLU(), a_bits=8, w_observer='minmax',
                                       a_observer='minmax') for conv, b in zip(layers, bits)]).eval()
    units = [Unit(f'layer{i}', m) for i, m in enumerate(model)]
    batches = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    calibrate_activations(model, batches[:2], _forward)
    return model, units, batches


def test_units_rank_by_their_bits_and_all_units_err_most(network):
    model, units, batches = network
    result = measure_sensitivity(model, units, batches[2:], _forward)
    err = result.unit_errors
    assert list(err) == ['layer0', 'layer1', 'layer2'] and all(v > 0 for v in err.values())
    assert err['layer1'] > err['layer2'] > err['layer0']  # 2-bit weights > 4-bit > 8-bit
    assert result.all_units_error > max(err.values())


def test_error_matches_a_direct_computation_and_state_is_restored(network):
    model, units, batches = network
    wq, aq = weight_quantizers(model), act_quantizers(model)
    wq[2].enabled = False  # a non-default state the measurement must give back
    before = ([q.enabled for q in wq], [q.enabled for q in aq])
    result = measure_sensitivity(model, units, batches[2:], _forward)
    assert ([q.enabled for q in wq], [q.enabled for q in aq]) == before
    for q in wq + aq:
        q.enabled = False
    with torch.no_grad():
        fp = [tensors_in(_forward(model, b)) for b in batches[2:]]
        units[1].module.weight_quantizer.enabled = True
        units[1].module.act_quantizer.enabled = True
        q1 = [tensors_in(_forward(model, b)) for b in batches[2:]]
    num = sum((a - b).pow(2).sum().item() for qs, fs in zip(q1, fp) for a, b in zip(qs, fs))
    den = sum(b.pow(2).sum().item() for fs in fp for b in fs)
    assert result.unit_errors['layer1'] == pytest.approx(num / den, rel=1e-6)


def test_bit_counts_weigh_weights_by_number_and_activations_by_quantizer(network):
    model, _, _ = network
    w = weight_bit_counts(model)
    assert w == {8: 3 * 8 * 9, 2: 8 * 8 * 9, 4: 8 * 8}
    assert average_bits(w) == pytest.approx((8 * 216 + 2 * 576 + 4 * 64) / (216 + 576 + 64))
    assert act_bit_counts(model) == {8: 3} and average_bits({}) is None


def test_an_activation_quantizer_as_a_part_is_measured_with_the_weights_fp(network):
    model, units, batches = network
    parts = [Unit(f'layer{i}.act', m.act_quantizer, 'act_quantizer') for i, m in enumerate(model)]
    result = measure_sensitivity(model, parts, batches[2:], _forward)
    assert list(result.unit_errors) == ['layer0.act', 'layer1.act', 'layer2.act']
    with torch.no_grad():
        for q in weight_quantizers(model) + act_quantizers(model):
            q.enabled = False
        fp = [tensors_in(_forward(model, b)) for b in batches[2:]]
        model[1].act_quantizer.enabled = True
        a1 = [tensors_in(_forward(model, b)) for b in batches[2:]]
        for m in model:
            m.act_quantizer.enabled = True
        a_all = [tensors_in(_forward(model, b)) for b in batches[2:]]

    def rel(out):
        return (sum((a - b).pow(2).sum().item() for qs, fs in zip(out, fp) for a, b in zip(qs, fs))
                / sum(b.pow(2).sum().item() for fs in fp for b in fs))
    assert result.unit_errors['layer1.act'] == pytest.approx(rel(a1), rel=1e-6)
    assert result.all_units_error == pytest.approx(rel(a_all), rel=1e-6)  # every activation on, weights FP
    assert result.all_units_error < measure_sensitivity(model, units, batches[2:], _forward).all_units_error
