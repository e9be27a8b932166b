"""QwT compensation: the streaming least squares, the fitted units, placement, save/load."""
import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from qdrop_mm.core import (Compensated, CompensationConfig, LeastSquaresAccumulator, QuantLayer, Unit, build_method,
                           output_mse, quant_state, run_ptq, wrap_units)
from qdrop_mm.core.quant_state import act_quantizers, weight_quantizers
from qdrop_mm.core.qwt import choose_ridge
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, smooth_images, toy_forward


@pytest.fixture(scope='module')
def toy():
    net, batches = make_toy_setup(seed=0)
    g = torch.Generator().manual_seed(1000)
    held_out = [smooth_images(4, 16, g) for _ in range(4)]
    return net, batches, held_out


def _feature_mse(q, ref, batches):
    with torch.no_grad():
        return sum(output_mse(toy_forward(q, b), ref.features(b)).item() for b in batches) / len(batches)


def _quantize(net, batches, method, w_bits, a_bits, iters=60):
    torch.manual_seed(0)
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, w_bits, a_bits)
    result = run_ptq(q, units, batches, toy_forward, build_method(method, iters=iters, batch_size=4))
    return q, units, result


def _random_problem(n=600, d=7, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    y = x @ torch.randn(d, c, generator=g, dtype=torch.float64) + torch.randn(c, generator=g, dtype=torch.float64)
    return x, y + 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)


def _streamed(x, y, chunks=(100, 250, 250)):
    acc = LeastSquaresAccumulator(x.shape[1], y.shape[1])
    for xc, yc in zip(x.split(list(chunks)), y.split(list(chunks))):
        acc.add(xc.float(), yc.float())
    return acc


def test_streamed_least_squares_matches_lstsq():
    x, y = _random_problem()
    acc = _streamed(x.float().double(), y.float().double())
    xa = torch.cat([x.float().double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(xa, y.float().double()).solution
    w, b = acc.solve(ridge=0.0)
    assert torch.allclose(w, ref[:-1].T, atol=1e-9) and torch.allclose(b, ref[-1], atol=1e-9)
    resid = y.float().double() - xa @ ref
    assert acc.sse(w, b) == pytest.approx(resid.pow(2).sum().item(), rel=1e-6)
    assert acc.sse() == pytest.approx(y.float().double().pow(2).sum().item(), rel=1e-12)
    assert acc.xtx.shape == (8, 8) and acc.ytx.shape == (5, 8) and acc.rows.item() == 600


def test_ridge_matches_augmented_lstsq_and_handles_dead_channels():
    x, y = _random_problem(seed=1)
    acc = _streamed(x, y)
    ridge = 0.05
    lam = ridge * acc.xtx.diagonal()[:-1].mean().item()
    xa = torch.cat([x.float().double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    penalty = torch.cat([lam ** 0.5 * torch.eye(7, dtype=torch.float64), torch.zeros(7, 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(torch.cat([xa, penalty]), torch.cat([y.float().double(), torch.zeros(7, 5)])).solution
    w, b = acc.solve(ridge)
    assert torch.allclose(w, ref[:-1].T, atol=1e-8) and torch.allclose(b, ref[-1], atol=1e-8)
    x[:, 3] = 0  # a channel that is always zero (dead ReLU): X^T X is singular
    for r in (0.0, 1e-4):
        w, b = _streamed(x, y).solve(r)
        assert torch.isfinite(w).all() and torch.isfinite(b).all() and w[:, 3].abs().max() < 1e-6


def test_validation_picks_the_ridge_or_no_compensation():
    x, y = _random_problem(n=4000, d=7, c=5, seed=2)
    folds = [_streamed(x[:2000], y[:2000], (2000,)), _streamed(x[2000:], y[2000:], (2000,))]
    assert choose_ridge(folds, 1e-4) == pytest.approx(1e-4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 40, generator=g, dtype=torch.float64)
    noise = torch.randn(60, 5, generator=g, dtype=torch.float64)  # unrelated to x: no fit generalises
    folds = [_streamed(x[:30], noise[:30], (30,)), _streamed(x[30:], noise[30:], (30,))]
    assert choose_ridge(folds, 1e-4) is None


@pytest.mark.parametrize('w_bits,a_bits', [(4, 4), (2, 4)])
def test_qwt_lowers_held_out_feature_mse(toy, w_bits, a_bits):
    net, batches, held_out = toy
    err = {}
    for method in ('rtn', 'qwt', 'qdrop', 'qdrop_qwt'):
        q, units, result = _quantize(net, batches, method, w_bits, a_bits)
        err[method] = _feature_mse(q, net, held_out)
        comp = [r for r in result.records if r.stage == len(build_method(method).stages)]
        if method.endswith('qwt'):
            assert [r.name for r in comp] == ['stem', 'block1', 'block2']
            assert all(r.result.iters == 0 and r.result.loss_after < r.result.loss_before for r in comp)
            assert all(isinstance(u.module, Compensated) and u.module.compensation is not None for u in result.units)
            assert not any(isinstance(u.module, Compensated) for u in units)  # the caller's units are not changed
    assert err['qwt'] < 0.95 * err['rtn'], err
    assert err['qdrop_qwt'] < 0.95 * err['qdrop'], err


def test_fit_takes_no_gradient_steps(toy, monkeypatch):
    net, batches, _ = toy
    rtn, _, _ = _quantize(net, batches, 'rtn', 4, 4)

    def refuse(*args, **kwargs):
        raise AssertionError('QwT must not take gradient steps')
    monkeypatch.setattr(torch.Tensor, 'backward', refuse)
    monkeypatch.setattr(torch.optim.Adam, 'step', refuse)
    q, _, _ = _quantize(net, batches, 'qwt', 4, 4)
    for a, b in zip(weight_quantizers(rtn), weight_quantizers(q)):
        assert a.mode == b.mode == 'nearest' and torch.equal(a.scale, b.scale)
    for a, b in zip(act_quantizers(rtn), act_quantizers(q)):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    assert len(act_quantizers(rtn)) == len(act_quantizers(q)) == 5
    comps = [m.compensation for m in q.modules() if isinstance(m, Compensated)]
    assert len(comps) == 3 and not any(p.requires_grad or p.grad is not None for c in comps for p in c.parameters())


def test_compensation_shapes_stride_and_fp_path(toy):
    net, batches, _ = toy
    q, _, _ = _quantize(net, batches, 'qwt', 4, 4)
    shapes = {n: (tuple(m.compensation.weight.shape), m.compensation.stride)
              for n, m in q.named_children() if isinstance(m, Compensated)}
    assert shapes == {'stem': ((16, 3, 1, 1), (1, 1)), 'block1': ((16, 16, 1, 1), (1, 1)),
                      'block2': ((32, 16, 1, 1), (2, 2))}
    x = batches[0]
    with quant_state(q, weight=False, act=False):
        assert torch.allclose(toy_forward(q, x), net.features(x), atol=1e-4)
    with quant_state(q, weight=True, act=True):
        with_comp = toy_forward(q, x)
        saved = q.block2.compensation
        q.block2.compensation = None
        without = toy_forward(q, x)
        q.block2.compensation = saved
    assert (with_comp - without).abs().max() > 1e-3


@pytest.mark.parametrize('placement,on_grid', [('before_quantizer', True), ('after_quantizer', False)])
def test_placement_decides_whether_the_output_is_requantized(toy, placement, on_grid):
    net, batches, _ = toy
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, 4, 4)
    method = dataclasses.replace(build_method('qwt'), compensation=CompensationConfig(placement=placement))
    run_ptq(q, units, batches, toy_forward, method)
    block = q.block1
    out_q = block.out_quantizer if on_grid else block.unit.act_quantizer
    assert (block.out_quantizer is not None) == on_grid
    with torch.no_grad():
        y = block(q.stem(batches[0]))
    levels = y / out_q.scale + out_q.zero_point
    off_grid = (levels - levels.round()).abs().max().item()
    assert (off_grid < 1e-3) == on_grid, off_grid


def test_save_load_reproduces_outputs(toy):
    net, batches, held_out = toy
    q, units, _ = _quantize(net, batches, 'qwt', 2, 4)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    fresh = copy.deepcopy(net)
    fresh_units = quantize_toy_net(fresh, 2, 4)
    wrap_units(fresh, [u.module for u in fresh_units])
    assert fresh.block2.compensation is None
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert fresh.block2.compensation.stride == (2, 2)
    with torch.no_grad():
        for b in held_out:
            assert torch.equal(toy_forward(fresh, b), toy_forward(q, b))


def test_non_conv_units_are_left_uncompensated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), QuantLayer(nn.Linear(12, 6), 4, a_bits=4))
    batches = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    units = [Unit('fc', model[1])]
    result = run_ptq(model, units, batches, lambda m, b: m(b), build_method('qwt'))
    assert result.records == [] and isinstance(model[1], Compensated) and model[1].compensation is None


def _qwt_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        net, batches = make_toy_setup(seed=0, num_batches=4)
        q = copy.deepcopy(net)
        run_ptq(q, quantize_toy_net(q, 4, 4), batches[rank::world], toy_forward, build_method('qwt'))
        torch.save(q.state_dict(), f'{out_dir}/rank{rank}.pth')
    finally:
        dist.destroy_process_group()


def test_two_ranks_fit_one_compensation_from_summed_statistics(tmp_path):
    import os
    import torch.multiprocessing as mp
    mp.spawn(_qwt_rank, args=(2, 29500 + (os.getpid() + 7) % 1000, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'rank{r}.pth', weights_only=True) for r in (0, 1))
    keys = [k for k in a if '.compensation.' in k]
    assert len(keys) == 6 and all(torch.equal(a[k], b[k]) for k in a)
    net, batches = make_toy_setup(seed=0, num_batches=4)
    q = copy.deepcopy(net)
    run_ptq(q, quantize_toy_net(q, 4, 4), batches[0::2], toy_forward, build_method('qwt'))
    alone = q.state_dict()
    assert all(not torch.allclose(alone[k], a[k]) for k in keys)


def test_wrapper_buffers_follow_the_unit_device():
    from qdrop_mm.core.qwt import wrap_unit
    unit = QuantLayer(nn.Conv2d(3, 4, 3, padding=1), 4, a_bits=4).to('meta')
    wrapper = wrap_unit(unit)
    assert wrapper.compensation_stride.device.type == 'meta'


def test_token_units_are_reported_not_compensable():
    from torch import nn
    from qdrop_mm.core import PTQCallbacks, QuantLayer, Unit
    torch.manual_seed(0)
    model = nn.Sequential(QuantLayer(nn.Linear(8, 8), 4, a_bits=4, w_observer='minmax', a_observer='minmax'))
    units = [Unit('0', model[0], 'layer')]

    class Seen(PTQCallbacks):
        skipped, fitted = [], []

        def after_method_step(self, unit, record, message):
            (self.skipped if record is None else self.fitted).append(unit.name)
            assert message.startswith(f'[QwT] {unit.name}: left uncompensated: its input or output is not an NCHW')
    cb = Seen()
    result = run_ptq(model, units, [torch.randn(2, 5, 8) for _ in range(2)], lambda m, b: m(b),
                     build_method('qwt'), cb)
    assert cb.skipped == ['0'] and cb.fitted == [] and result.records == []
