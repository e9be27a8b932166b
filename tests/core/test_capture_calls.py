"""Units called several times per forward (a head conv shared by the pyramid levels): every call is a sample."""
import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, Unit, build_method, capture_inputs, run_ptq


class SharedHead(nn.Module):
    """One conv applied to three 'levels' of different size, like a dense head over an FPN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list:
        y = torch.relu(self.stem(x))
        return [self.head(torch.nn.functional.avg_pool2d(y, 2 ** i)) for i in range(3)]


def _forward(model, batch):
    return model(batch)


def test_capture_hands_every_call_in_order_and_checks_the_count():
    torch.manual_seed(0)
    net = SharedHead().eval()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    got = []
    assert capture_inputs(net, net.head, batches, _forward, got.append, calls=3) == 6
    assert [tuple(t.shape[2:]) for t in got] == [(16, 16), (8, 8), (4, 4)] * 2
    with torch.no_grad():
        y = torch.relu(net.stem(batches[1]))
    assert torch.equal(got[4], torch.nn.functional.avg_pool2d(y, 2))
    with pytest.raises(RuntimeError, match='called 3 time\\(s\\) by forward_fn, expected 4'):
        capture_inputs(net, net.head, batches, _forward, got.append, calls=4)


def test_a_shared_unit_is_reconstructed_on_all_its_calls(one_thread):
    torch.manual_seed(0)
    net = SharedHead().eval()
    net.stem = QuantLayer(net.stem, 8, activation=nn.ReLU(), a_bits=4, w_observer='minmax', a_observer='minmax')
    net.head = QuantLayer(net.head, 2, w_observer='minmax', a_observer='minmax')
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    units = [Unit('stem', net.stem), Unit('head', net.head, calls=3)]
    result = run_ptq(net, units, batches, _forward, build_method('qdrop', iters=40, batch_size=4,
                                                                   schedule='paper'))
    head = next(r for r in result.records if r.name == 'head')
    assert head.result.loss_after < head.result.loss_before
    assert head.result.iters == 40
