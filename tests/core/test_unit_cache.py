import copy
import os

import pytest
import torch

from qdrop_mm.core import PTQCallbacks, build_method, run_ptq
from qdrop_mm.core.ptq import build_unit_cache, calibrate_activations
from qdrop_mm.core.reconstruct import unit_errors
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward
from qdrop_mm.core.unit_cache import CacheBudgetError, CachePolicy, UnitCache


def _tensors(n=4, shape=(2, 3, 5, 5), vary=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        s = (shape[0], shape[1], shape[2] + (i if vary else 0), shape[3])
        out.append(torch.randn(s, generator=g))
    return out


def test_float32_exact_and_float16_halves_bytes():
    xs = _tensors()
    exact = UnitCache.from_tensors(xs, xs, xs)
    half = UnitCache.from_tensors(xs, xs, xs, CachePolicy(dtype='float16'))
    assert half.num_bytes() * 2 == exact.num_bytes() == 3 * sum(x.numel() * 4 for x in xs)
    a, b, c, _ = exact.entry(2, torch.device('cpu'))
    assert torch.equal(a, xs[2])
    h, _, _, _ = half.entry(2, torch.device('cpu'))
    assert h.dtype == torch.float32 and (h - xs[2]).abs().max() < 2e-3


def test_spills_to_disk_beyond_host_budget_and_cleans_up(tmp_path):
    xs = _tensors(vary=True)
    per_entry = xs[0].numel() * 4
    policy = CachePolicy(host_budget=2 * per_entry, spill_dir=str(tmp_path))
    cache = UnitCache.from_tensors(xs, xs, xs, policy)
    usage = cache.usage()
    assert usage['host'] <= 2 * per_entry and usage['disk'] > 0 and usage['peak_in_memory'] <= 2 * per_entry
    spilled = [f for d in tmp_path.iterdir() for f in d.iterdir()]
    assert spilled
    for i in range(len(xs)):
        assert torch.equal(cache.entry(i, torch.device('cpu'))[2], xs[i])
    torch.manual_seed(0)
    seen = [cache.sample(None, torch.device('cpu'))[0].shape[2] for _ in range(12)]
    assert len(set(seen)) > 1
    cache.close()
    assert not any(tmp_path.iterdir())


def test_over_budget_without_spill_dir_is_an_error():
    xs = _tensors()
    with pytest.raises(CacheBudgetError, match='spill directory'):
        UnitCache.from_tensors(xs, xs, xs, CachePolicy(host_budget=10))


def test_spilled_cache_evaluates_like_in_memory_and_ptq_stays_in_budget(tmp_path):
    net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=4, size=16)
    q = copy.deepcopy(net)
    units = quantize_toy_net(q, 4, 4)
    calibrate_activations(q, batches, toy_forward)
    stage = build_method('qdrop', iters=10).stages[0]
    mem = build_unit_cache(q, units[1].module, batches, toy_forward, stage)
    budget = mem.num_bytes() // 3
    disk = build_unit_cache(q, units[1].module, batches, toy_forward, stage,
                            CachePolicy(host_budget=budget, spill_dir=str(tmp_path)))
    cpu = torch.device('cpu')
    assert unit_errors(units[1].module, mem, cpu, True) == unit_errors(units[1].module, disk, cpu, True)
    disk.close()

    peaks = []

    class Watch(PTQCallbacks):
        def after_unit(self, record):
            peaks.append(record.cache_usage['peak_in_memory'])

    policy = CachePolicy(host_budget=budget, spill_dir=str(tmp_path / 'ptq'))
    qn = copy.deepcopy(net)
    result = run_ptq(qn, quantize_toy_net(qn, 4, 4), batches, toy_forward, build_method('qdrop', iters=100),
                     Watch(), policy)
    assert len(peaks) == 3 and all(0 < p <= budget for p in peaks)
    assert any(r.cache_usage['disk'] > 0 for r in result.records)
    assert sum(r.result.loss_after for r in result.records) < sum(r.result.loss_before for r in result.records)
    assert not os.path.exists(tmp_path / 'ptq') or not any((tmp_path / 'ptq').iterdir())


def test_stacked_cache_shares_memory_with_its_entries():
    xs = _tensors()
    cache = UnitCache.from_tensors(xs, xs, xs)
    stacked = cache._stacked[0]
    assert stacked.shape[0] == sum(x.shape[0] for x in xs)
    assert cache.x_fp.load(1).untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert cache.num_bytes() == 3 * sum(x.numel() * 4 for x in xs)
    assert torch.equal(cache.x_fp.load(2), xs[2])
