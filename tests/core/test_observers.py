import torch

from qdrop_mm.core.fake_quant import fake_quantize
from qdrop_mm.core.observers import MinMaxObserver, MSEObserver, lp_error


def _err(x, obs):
    scale, zp = obs.compute()
    return (fake_quantize(x, scale, zp, obs.qmax) - x).abs().pow(2.4).mean().item()


def test_minmax_covers_running_extremes():
    obs = MinMaxObserver(4, ch_axis=0)
    obs.observe(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    obs.observe(torch.tensor([[3.0, 0.0], [0.1, 0.2]]))
    assert torch.allclose(obs.min_val, torch.tensor([-2.0, 0.1]))
    assert obs.max_val.tolist() == [3.0, 0.5]
    scale, zp = obs.compute()
    assert torch.allclose(scale, torch.tensor([5 / 15, 0.5 / 15]))
    assert zp.tolist() == [6.0, 0.0]


def test_mse_beats_minmax_on_long_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
    mse, mm = MSEObserver(4), MinMaxObserver(4)
    mse.observe(x)
    mm.observe(x)
    assert _err(x, mse) < 0.5 * _err(x, mm)


def test_mse_one_sided_keeps_zero_point_zero():
    x = torch.relu(torch.randn(5000))
    obs = MSEObserver(4)
    obs.observe(x)
    _, zp = obs.compute()
    assert zp.item() == 0.0


def test_mse_is_best_of_its_candidates_per_channel():
    torch.manual_seed(1)
    w = torch.randn(4, 64) * torch.tensor([[0.1], [1.0], [5.0], [0.01]]) + torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    obs = MSEObserver(3, ch_axis=0, num=50)
    best_min, best_max = obs.search(w)
    best = lp_error(w, best_min, best_max, 7, 2.4)
    full = lp_error(w, w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0), 7, 2.4)
    assert (best <= full + 1e-9).all()
    assert (best < full).any()


def test_mse_averages_over_batches():
    obs = MSEObserver(4)
    a, b = torch.rand(1000), torch.rand(1000) * 3
    obs.observe(a)
    lo_a, hi_a = obs.min_val.clone(), obs.max_val.clone()
    obs.observe(b)
    lo_b, hi_b = MSEObserver(4).search(b)
    assert torch.allclose(obs.max_val, (hi_a + hi_b) / 2)
