"""Shared fixtures for the export tests."""
import pytest
import torch

from qdrop_mm.core import build_method, run_ptq
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


@pytest.fixture(scope='session')
def hardened_toy():
    """ToyNet W4A4 (stem 8-bit) after a short QDrop run: hard rounding, calibrated and learned steps."""
    net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=2, size=16, width=8)
    units = quantize_toy_net(net, w_bits=4, a_bits=4)
    torch.manual_seed(0)
    run_ptq(net, units, batches, toy_forward, build_method('qdrop', iters=10))
    return net, batches
