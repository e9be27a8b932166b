"""Block output MSE of RTN / AdaRound / BRECQ / QDrop (or any method with options) on seeded residual networks.

Plain PyTorch (the core only): a seeded ToyNet (stem + two BasicBlocks), its
units quantized and reconstructed on calibration batches, then the output MSE
of the last block against FP on *held-out* batches. With ``--seeds N`` every
cell is the mean ± sample std over N seeds (network, data, drop masks and
batch order all follow the seed). Prints a table and writes JSON.

    python tools/bench_block_mse.py [--iters 2000] [--seeds 3] [--bits 4/4 2/4]
        [--methods rtn qdrop qdrop:schedule=budget qdrop:schedule=budget,accum_steps=8] [--out ...]

A method is a registered name, optionally followed by ``:key=value,...`` with
``build_method`` keywords (``schedule``, ``w_lr``, ``a_lr``, ``learn_bias``,
``accum_steps``, ``drop_prob``, ``act_calibration``, ``iters`` ...).
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
import platform
import statistics
import sys
import time
from itertools import product
from typing import Any, Dict, Tuple

import torch

from qdrop_mm.benchmarks.speed import write_json
from qdrop_mm.core import build_method, output_mse, run_ptq
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, smooth_images, toy_forward

METHODS = ('rtn', 'adaround', 'brecq', 'qdrop')


def parse_method(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'qdrop:schedule=budget,w_lr=0.01' -> ('qdrop', {'schedule': 'budget', 'w_lr': 0.01})."""
    name, _, rest = spec.partition(':')
    options: Dict[str, Any] = {}
    for item in filter(None, rest.split(',')):
        key, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'error: --methods {spec!r}: options are key=value, got {item!r}')
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def held_out_mse(net, ref, batches) -> float:
    with torch.no_grad():
        return sum(output_mse(toy_forward(net, b), ref.features(b)).item() for b in batches) / len(batches)


def run_cell(spec: str, w_bits: int, a_bits: int, seed: int, args) -> Dict[str, Any]:
    """One method at one bit width on the network and data of one seed."""
    name, options = parse_method(spec)
    fp, calib = make_toy_setup(seed=seed, num_batches=args.calib_batches, batch_size=args.batch_size, size=32)
    g = torch.Generator().manual_seed(seed + 1000)
    held_out = [smooth_images(8, 32, g) for _ in range(8)]
    kw = {'iters': args.iters, 'act_iters': max(1, args.iters // 4), 'batch_size': args.batch_size, **options}
    try:
        method = build_method(name, **kw)
    except ValueError as err:
        raise SystemExit(f'error: --methods {spec!r}: {err}') from None
    torch.manual_seed(seed)
    net = copy.deepcopy(fp)
    units = quantize_toy_net(net, w_bits, a_bits)
    t0 = time.perf_counter()
    run_ptq(net, units, calib, toy_forward, method)
    return {'method': spec, 'w_bits': w_bits, 'a_bits': a_bits, 'seed': seed,
            'held_out_mse': held_out_mse(net, fp, held_out), 'calib_mse': held_out_mse(net, fp, calib),
            'seconds': time.perf_counter() - t0}


def summary(rows, spec: str, w: int, a: int) -> str:
    vals = [r['held_out_mse'] for r in rows if r['method'] == spec and (r['w_bits'], r['a_bits']) == (w, a)]
    if len(vals) < 2:
        return f'{vals[0]:.4f}' if vals else '-'
    return f'{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}'


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--iters', type=int, default=2000, help='reconstruction iterations per unit')
    p.add_argument('--seed', type=int, default=0, help='first seed')
    p.add_argument('--seeds', type=int, default=1, help='seeds per cell: --seed … --seed + N - 1')
    p.add_argument('--bits', nargs='+', default=['4/4', '2/4'], help='W/A pairs')
    p.add_argument('--methods', nargs='+', default=list(METHODS), help='name[:key=value,...]')
    p.add_argument('--calib-batches', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--out', default='work_dirs/bench_block_mse.json')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.methods:
        parse_method(spec)
    bits = [tuple(int(b) for b in pair.split('/')) for pair in args.bits]
    rows = []
    for (w_bits, a_bits), spec, seed in product(bits, args.methods, range(args.seed, args.seed + args.seeds)):
        rows.append(run_cell(spec, w_bits, a_bits, seed, args))
        print(f'W{w_bits}A{a_bits} {spec:<40} seed {seed} held-out MSE {rows[-1]["held_out_mse"]:.4f} '
              f'({rows[-1]["seconds"]:.1f} s)', flush=True)
    result = {'iters_per_unit': args.iters, 'seeds': list(range(args.seed, args.seed + args.seeds)),
              'calib_batches': args.calib_batches, 'batch_size': args.batch_size,
              'command': 'python tools/bench_block_mse.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
              'machine': f'{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}', 'rows': rows}
    print('\n| method | ' + ' | '.join(f'W{w}A{a}' for w, a in bits) + ' |\n|---|' + '---|' * len(bits))
    for spec in args.methods:
        print(f'| {spec} | ' + ' | '.join(summary(rows, spec, w, a) for w, a in bits) + ' |')
    return write_json(result, args.out)

