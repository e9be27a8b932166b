"""Two CPU processes on gloo: sharded calibration, reduced observers and gradients, identical weights."""
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qdrop_mm.core import build_method, run_ptq
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=4, size=16)
        shard = batches[rank::world]
        torch.manual_seed(100 + rank)  # different drop masks and samples per rank, as in real runs
        q = copy.deepcopy(net)
        run_ptq(q, quantize_toy_net(q, 4, 4), shard, toy_forward, build_method('qdrop', iters=15))
        torch.save(q.state_dict(), os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_identical_quantized_weights(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / 'rank0.pth', weights_only=True)
    b = torch.load(tmp_path / 'rank1.pth', weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the ranks saw different data: a single-process run on rank 0's shard alone differs
    net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=4, size=16)
    torch.manual_seed(100)
    q = copy.deepcopy(net)
    run_ptq(q, quantize_toy_net(q, 4, 4), batches[0::2], toy_forward, build_method('qdrop', iters=15))
    single = q.state_dict()
    assert any(not torch.equal(single[k], a[k]) for k in a if k.endswith(('scale', 'alpha')))
