"""Peers side by side: the demo Faster R-CNN quantized by AIMET, Brevitas and MQBench (W4A4, W2A4).

    bash tools/setup_peers.sh                          # once: .venv-peers (peers on top of .venv)
    python tools/bench_peers.py [--cells aimet:adaround brevitas mqbench:qdrop ...] [--bits 4/4 2/4]
        [--seeds 0 1 2] [--iters 300] [--num-images 32] [--out work_dirs/bench_peers/results.json]
    python tools/bench_peers.py --table                # the table of --out

Each cell runs in a child process of the peer venv (.venv-peers/bin/python, --python to change);
the logic is in qdrop_mm/benchmarks/peers.py. Errors of the benchmark itself: one line `error: ...`.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.benchmarks.peers import PeerBenchError, main  # noqa: E402

if __name__ == '__main__':
    try:
        sys.exit(main())
    except PeerBenchError as err:
        sys.exit(f'error: {err}')
