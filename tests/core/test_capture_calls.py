"""Units called several times per forward (a head conv shared by the pyramid levels): every call is a sample;
units called with plain values beside their input (a transformer block's hw_shape): kept per sample."""
import pytest
import torch
from torch import nn

from qdrop_mm.core import QuantLayer, Unit, build_method, capture_inputs, quant_state, run_ptq
from qdrop_mm.core.capture import NO_ARGS, CallArgs
from qdrop_mm.core.ptq import build_unit_cache


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
    assert capture_inputs(net, net.head, batches, _forward, lambda x, _call: got.append(x), calls=3) == 6
    assert [tuple(t.shape[2:]) for t in got] == [(16, 16), (8, 8), (4, 4)] * 2
    with torch.no_grad():
        y = torch.relu(net.stem(batches[1]))
    assert torch.equal(got[4], torch.nn.functional.avg_pool2d(y, 2))
    with pytest.raises(RuntimeError, match='called 3 time\\(s\\) by forward_fn, expected 4'):
        capture_inputs(net, net.head, batches, _forward, lambda x, _call: got.append(x), calls=4)


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


class TokenBlock(nn.Module):
    """A token block called as ``block(x, hw_shape)``, like a Swin/MiT transformer block: (B, H*W, C) tokens."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * c)
        self.mix = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.fc2 = nn.Linear(2 * c, c)

    def forward(self, x: torch.Tensor, hw_shape: tuple, scale: float = 1.0) -> torch.Tensor:
        b, n, _ = x.shape
        h, w = hw_shape
        y = self.fc1(x).transpose(1, 2).reshape(b, -1, h, w)
        y = torch.relu(self.mix(y)).flatten(2).transpose(1, 2)
        return x + scale * self.fc2(y)


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.block = TokenBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        hw = tuple(t.shape[2:])
        return self.block(t.flatten(2).transpose(1, 2), hw, scale=0.5)


def test_plain_arguments_beside_the_input_are_captured_per_call_and_more_tensors_refused():
    torch.manual_seed(0)
    net = TokenNet().eval()
    batches = [torch.randn(2, 3, 8, 12), torch.randn(2, 3, 12, 8)]
    got = []
    assert capture_inputs(net, net.block, batches, _forward, lambda x, call: got.append((x.shape, call))) == 2
    assert got == [((2, 24, 8), CallArgs(((4, 6),), {'scale': 0.5})), ((2, 24, 8), CallArgs(((6, 4),), {'scale': 0.5}))]
    with torch.no_grad():
        assert torch.equal(CallArgs(((4, 6),), {'scale': 0.5})(net.block, torch.ones(1, 24, 8)),
                           net.block(torch.ones(1, 24, 8), (4, 6), scale=0.5))
    plain = SharedHead().eval()
    seen = []
    capture_inputs(plain, plain.head, batches[:1], _forward, lambda x, call: seen.append(call), calls=3)
    assert seen == [NO_ARGS] * 3

    class TwoTensors(nn.Module):
        def forward(self, x, identity):
            return x + identity
    pair = TwoTensors()
    with pytest.raises(TypeError, match='exactly one tensor input'):
        capture_inputs(pair, pair, [torch.ones(2)], lambda m, b: m(b, identity=b), lambda x, call: None)


def _quantized_token_net(w_bits: int = 2):
    torch.manual_seed(0)
    net = TokenNet().eval()
    blk = net.block
    blk.fc1 = QuantLayer(blk.fc1, w_bits, a_bits=4, in_a_bits=4, w_observer='minmax', a_observer='minmax')
    blk.mix = QuantLayer(blk.mix, w_bits, activation=nn.ReLU(), a_bits=4, w_observer='minmax', a_observer='minmax')
    blk.fc2 = QuantLayer(blk.fc2, w_bits, w_observer='minmax', a_observer='minmax')
    return net


@pytest.mark.parametrize('sizes', [[(8, 12)] * 4, [(8, 12), (12, 8)] * 2])
def test_a_unit_called_with_hw_shape_is_reconstructed_with_each_entry_s_arguments(one_thread, sizes):
    """Same image size everywhere: rows sampled from the stacked cache; sizes differ: whole entries drawn."""
    net = _quantized_token_net()
    batches = [torch.randn(4, 3, *s) for s in sizes]
    method = build_method('qdrop', iters=200, batch_size=4)
    cache = build_unit_cache(net, net.block, batches, _forward, method.stages[0])
    assert [c.args for c in cache.call_args] == [((s[0] // 2, s[1] // 2),) for s in sizes]
    assert (cache._stacked is not None) == (len(set(sizes)) == 1)
    x_fp, _, target, call = cache.entry(1, torch.device('cpu'))
    with torch.no_grad(), quant_state(net, weight=False, act=False):
        assert torch.equal(call(net.block, x_fp), target)
    cache.close()
    result = run_ptq(net, [Unit('block', net.block, kind='block')], batches, _forward, method)
    rec = result.records[0].result
    assert rec.iters == 200 and rec.loss_after < 0.8 * rec.loss_before


def test_qwt_wraps_a_unit_called_with_hw_shape_and_leaves_tokens_uncompensated(one_thread):
    """QwT's wrapper passes the plain arguments through; tokens are no NCHW map, so no compensation is fitted."""
    from qdrop_mm.core import PTQCallbacks
    from qdrop_mm.core.qwt import Compensated

    class Recorder(PTQCallbacks):
        def __init__(self) -> None:
            super().__init__()
            self.not_possible = []

        def after_method_step(self, unit, record, message) -> None:
            if record is None:
                self.not_possible.append(unit.name)

    net = _quantized_token_net()
    batches = [torch.randn(4, 3, 8, 12) for _ in range(4)]
    cb = Recorder()
    result = run_ptq(net, [Unit('block', net.block, kind='block')], batches, _forward,
                     build_method('qdrop_qwt', iters=50, batch_size=4), cb)
    assert isinstance(net.block, Compensated) and net.block.compensation is None
    assert cb.not_possible == ['block'] and result.records[0].result.iters == 50
    x = torch.randn(2, 24, 8)
    with torch.no_grad():
        assert torch.equal(net.block(x, (4, 6), scale=0.5), net.block.unit(x, (4, 6), scale=0.5))
