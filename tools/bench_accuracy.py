"""Accuracy benchmark on the demo models: FP vs RTN / AdaRound / BRECQ / QDrop at several bit widths.

    python tools/bench_accuracy.py [--models faster_rcnn_r18_fpn_shapes ...] [--bits 4/4 2/4 8/8]
        [--methods rtn adaround brecq qdrop] [--iters 500] [--num-images 32]

Trains (or reuses) each demo FP model, runs tools/ptq.py for every method and
bit width with the given iterations per unit, prints a table like the papers'
and writes work_dirs/bench_accuracy/results.json and accuracy.png.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)

METRIC = {'faster_rcnn_r18_fpn_shapes': 'coco/bbox_mAP', 'retinanet_r18_fpn_shapes': 'coco/bbox_mAP',
          'sem_fpn_r18_shapes': 'mIoU'}


def run_one(model: str, method: str, w_bits: int, a_bits: int, args, fp_ckpt: str) -> dict:
    from tools.ptq import main as ptq_main
    cfg = osp.join(REPO, 'configs/demo', f'{model}.py')
    work = osp.join(args.out, model, f'{method}_w{w_bits}a{a_bits}')
    opts = [f'ptq.method={method}', f'ptq.w_bits={w_bits}', f'ptq.a_bits={a_bits}', f'ptq.iters={args.iters}',
            f'ptq.act_iters={max(1, args.iters // 4)}', f'ptq.num_images={args.num_images}',
            'ptq.calib_num_workers=0']
    t0 = time.perf_counter()
    metrics = ptq_main([cfg, '--checkpoint', fp_ckpt, '--work-dir', work, '--cfg-options', *opts])
    return {'model': model, 'method': method, 'w_bits': w_bits, 'a_bits': a_bits,
            'metrics': {k: float(v) for k, v in metrics.items()}, 'seconds': time.perf_counter() - t0}


def table(results: dict, methods, bits) -> str:
    lines = []
    for model, res in results['models'].items():
        key = METRIC.get(model, 'coco/bbox_mAP')
        lines.append(f"\n{model} ({key}; FP {res['fp'].get(key, float('nan')):.3f})")
        lines.append(f"{'method':<10}" + ''.join(f'{"W%dA%d" % wa:>10}' for wa in bits))
        for m in methods:
            vals = {(r['w_bits'], r['a_bits']): r['metrics'].get(key) for r in res['runs'] if r['method'] == m}
            lines.append(f'{m:<10}' + ''.join(f'{vals[wa]:>10.3f}' if vals.get(wa) is not None else f'{"-":>10}'
                                              for wa in bits))
    return '\n'.join(lines)


def plot(results: dict, methods, bits, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = list(results['models'])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        res, key = results['models'][model], METRIC.get(model, 'coco/bbox_mAP')
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [next((r['metrics'].get(key, 0) for r in res['runs'] if r['method'] == m
                          and (r['w_bits'], r['a_bits']) == wa), 0) for wa in bits]
            ax.bar([j + i * width for j in range(len(bits))], vals, width, label=m)
        ax.axhline(res['fp'].get(key, 0), color='k', linestyle='--', label='FP')
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], [f'W{w}A{a}' for w, a in bits])
        ax.set_title(f'{model}\n{key}')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['faster_rcnn_r18_fpn_shapes'])
    p.add_argument('--methods', nargs='+', default=['rtn', 'adaround', 'brecq', 'qdrop'])
    p.add_argument('--bits', nargs='+', default=['4/4', '2/4', '8/8'])
    p.add_argument('--iters', type=int, default=500)
    p.add_argument('--num-images', type=int, default=32)
    p.add_argument('--out', default=osp.join(REPO, 'work_dirs/bench_accuracy'))
    args = p.parse_args(argv)
    from qdrop_mm.demo.training import train_fp_model
    bits = [tuple(int(b) for b in wa.split('/')) for wa in args.bits]
    os.makedirs(args.out, exist_ok=True)
    results = {'iters_per_unit': args.iters, 'num_images': args.num_images,
               'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'models': {}}
    for model in args.models:
        fp = train_fp_model(osp.join(REPO, 'configs/demo', f'{model}.py'), osp.join(REPO, 'work_dirs/demo', model))
        res = results['models'][model] = {'fp': fp['metrics'], 'runs': []}
        for w_bits, a_bits in bits:
            for method in args.methods:
                res['runs'].append(run_one(model, method, w_bits, a_bits, args, fp['checkpoint']))
                with open(osp.join(args.out, 'results.json'), 'w') as f:
                    json.dump(results, f, indent=2)
    text = table(results, args.methods, bits)
    print(text)
    plot(results, args.methods, bits, osp.join(args.out, 'accuracy.png'))
    print(f"wrote {osp.join(args.out, 'results.json')} and accuracy.png")
    return results


if __name__ == '__main__':
    main()
