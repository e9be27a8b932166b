"""Block output MSE of RTN / AdaRound / BRECQ / QDrop on one seeded residual network.

Plain PyTorch (the core only): a seeded ToyNet (stem + two BasicBlocks), its
units quantized and reconstructed on calibration batches, then the output MSE
of the last block against FP on *held-out* batches. Prints a table and writes
JSON.

    python tools/bench_block_mse.py [--iters 2000] [--out work_dirs/bench_block_mse.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import os.path as osp
import platform
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from qdrop_mm.core import build_method, output_mse, run_ptq  # noqa: E402
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, smooth_images, toy_forward  # noqa: E402

METHODS = ('rtn', 'adaround', 'brecq', 'qdrop')


def held_out_mse(net, ref, batches) -> float:
    with torch.no_grad():
        return sum(output_mse(toy_forward(net, b), ref.features(b)).item() for b in batches) / len(batches)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--iters', type=int, default=2000, help='reconstruction iterations per unit')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--bits', nargs='+', default=['4/4', '2/4'], help='W/A pairs')
    p.add_argument('--out', default='work_dirs/bench_block_mse.json')
    args = p.parse_args(argv)
    fp, calib = make_toy_setup(seed=args.seed, num_batches=16, batch_size=8, size=32)
    g = torch.Generator().manual_seed(args.seed + 1000)
    held_out = [smooth_images(8, 32, g) for _ in range(8)]
    rows = []
    for pair in args.bits:
        w_bits, a_bits = (int(b) for b in pair.split('/'))
        for name in METHODS:
            torch.manual_seed(args.seed)
            net = copy.deepcopy(fp)
            units = quantize_toy_net(net, w_bits, a_bits)
            t0 = time.perf_counter()
            run_ptq(net, units, calib, toy_forward, build_method(name, iters=args.iters, act_iters=args.iters // 4,
                                                                  batch_size=8))
            rows.append({'method': name, 'w_bits': w_bits, 'a_bits': a_bits,
                         'held_out_mse': held_out_mse(net, fp, held_out),
                         'calib_mse': held_out_mse(net, fp, calib), 'seconds': time.perf_counter() - t0})
            print(f'W{w_bits}A{a_bits} {name:<9} held-out MSE {rows[-1]["held_out_mse"]:.4f}', flush=True)
    result = {'iters_per_unit': args.iters, 'seed': args.seed, 'machine': f'{platform.machine()}, '
              f'{os.cpu_count()} cores, torch {torch.__version__}', 'rows': rows}
    print(f'\n| W/A | {" | ".join(METHODS)} |\n|---|' + '---|' * len(METHODS))
    for pair in args.bits:
        w, a = (int(b) for b in pair.split('/'))
        vals = [r['held_out_mse'] for m in METHODS for r in rows if r['method'] == m and (r['w_bits'], r['a_bits']) == (w, a)]
        print(f'| W{w}A{a} | ' + ' | '.join(f'{v:.4f}' for v in vals) + ' |')
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
