"""Accuracy benchmark on the demo models: FP vs RTN / AdaRound / BRECQ / QDrop at several bit widths.

    python tools/bench_accuracy.py [--models faster_rcnn_r18_fpn_shapes ...] [--bits 4/4 2/4]
        [--methods rtn adaround brecq qdrop] [--sanity-bits 8/8] [--sanity-methods rtn qdrop]
        [--iters 300] [--num-images 32] [--seeds 3] [--threads 1] [--val-images 1000]
        [--curve 2/4] [--no-run] [--markdown]

Trains (or reuses) each demo FP model, runs tools/ptq.py for every method and
bit width with the given iterations per unit (plus the sanity bit widths for
the sanity methods) and each seed (``ptq.seed`` = 0 … N-1: calibration images,
drop masks, batch order), prints a table like the papers' (mean ± sample std
over the seeds; ``*`` where a row beats RTN by more than the two stds added, and
below each table every pair of rows one of which beats the other by more than
that combined spread) and writes work_dirs/bench_accuracy/results.json (every
run) and accuracy.png. Runs already in results.json with the same settings are
reused, so an interrupted benchmark continues and methods or seeds can be added later.
--val-images N evaluates on a generated val split of N images (a superset of the
default 100; its own table, FP re-evaluated there); a reconstruction already in a
run's work dir with the same settings is then only re-evaluated.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import statistics
import sys
import time
from itertools import permutations

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

METRIC = {'faster_rcnn_r18_fpn_shapes': 'coco/bbox_mAP', 'retinanet_r18_fpn_shapes': 'coco/bbox_mAP',
          'sem_fpn_r18_shapes': 'mIoU'}


def metric_key(model: str, res: dict) -> str:
    """The headline metric of a model's rows: known demo models by name, others by what their FP result holds."""
    return METRIC.get(base_model(model), 'mIoU' if 'mIoU' in res.get('fp', {}) else 'coco/bbox_mAP')


def run_key(run: dict) -> tuple:
    return (run['method'], run['w_bits'], run['a_bits'], run.get('iters'), run.get('num_images'),
            tuple(run.get('options', ())), run.get('seed', 0))


DEFAULT_NUM_IMAGES = 32


def label(run: dict) -> str:
    """Method name, with any extra options and a calibration set other than the default, as the table shows it."""
    short = [o.replace('ptq.', '').replace('method_options.', '') for o in run.get('options', ())]
    n = run.get('num_images', DEFAULT_NUM_IMAGES)
    return run['method'] + (f"[{','.join(short)}]" if short else '') + (
        f', {n} images' if n != DEFAULT_NUM_IMAGES else '')


def split_name(model: str, val_images) -> str:
    """The results entry of a model evaluated on another val split: its own table, its own FP row."""
    return f'{model}@val{val_images}' if val_images else model


def base_model(name: str) -> str:
    return name.split('@')[0]


def run_one(model: str, method: str, w_bits: int, a_bits: int, seed: int, args, fp_ckpt: str,
            config=None) -> dict:
    """Quantize and evaluate one cell's seed. ``config``: a Config for another val split (default: the demo
    config). A reconstruction already in the run's work dir with the same settings is only re-evaluated."""
    from qdrop_mm.api import load_quantized, quantize
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    from qdrop_mm.openmmlab.runner import exit_on_error, parse_cfg_options
    base = base_model(model)
    config = config if config is not None else osp.join(REPO, 'configs/demo', f'{base}.py')
    work = osp.join(args.out, base, f'{method}_w{w_bits}a{a_bits}_{args.iters}it' + ''.join(
        '_' + o.replace('ptq.', '').replace('=', '') for o in args.options) + (f'_seed{seed}' if seed else ''))
    opts = [f'ptq.method={method}', f'ptq.w_bits={w_bits}', f'ptq.a_bits={a_bits}', f'ptq.iters={args.iters}',
            f'ptq.act_iters={max(1, args.iters // 4)}', f'ptq.num_images={args.num_images}',
            f'ptq.seed={seed}', 'ptq.calib_num_workers=0', *args.options]
    recon = {'fp_checkpoint': osp.abspath(fp_ckpt), 'options': opts}
    record, quantized = osp.join(work, 'bench_run.json'), osp.join(work, 'quantized.pth')
    t0 = time.perf_counter()
    reused = osp.isfile(quantized) and osp.isfile(record) and load_results(record) == recon
    if reused:
        metrics = exit_on_error(load_quantized, config, quantized, work_dir=osp.join(work, f'eval_{model}'),
                                cfg_options=parse_cfg_options(opts)).metrics
    else:
        metrics = exit_on_error(quantize, config, fp_ckpt, work_dir=work, cfg_options=parse_cfg_options(opts)).metrics
        atomic_write_json(recon, record)
    return {'model': model, 'method': method, 'w_bits': w_bits, 'a_bits': a_bits, 'iters': args.iters,
            'num_images': args.num_images, 'options': list(args.options), 'seed': seed,
            'metrics': {k: float(v) for k, v in metrics.items()}, 'seconds': time.perf_counter() - t0,
            **({'reevaluated': quantized} if reused else {})}


NO_ITERATIONS = ('rtn', 'qwt')


def row_name(run: dict) -> str:
    return label(run) if run['method'] in NO_ITERATIONS else f"{label(run)}, {run.get('iters')} it"


def row_names(res: dict, methods) -> list:
    """Table rows: the given methods in order, one row per option set and iteration count."""
    return list(dict.fromkeys(row_name(r) for m in methods for r in res['runs'] if r['method'] == m))


class Cell:
    """The runs of one table cell (one row, one bit width), one value per seed: mean and sample std."""

    def __init__(self, values) -> None:
        self.values = list(values)
        self.mean = statistics.fmean(self.values)
        self.std = statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def beats(self, other: 'Cell') -> bool:
        """Both have >= 2 seeds and self's mean exceeds other's by more than the two stds added."""
        return min(len(self.values), len(other.values)) > 1 and self.mean - other.mean > self.std + other.std

    def text(self, digits: int) -> str:
        return f'{self.mean:.{digits}f}' + (f'±{self.std:.{digits}f}' if len(self.values) > 1 else '')


def cell(res: dict, name: str, wa: tuple, key: str):
    """The row's runs at bit width ``wa``, the last run of each seed; None when there are none."""
    by_seed = {r.get('seed', 0): r['metrics'].get(key) for r in res['runs']
               if row_name(r) == name and (r['w_bits'], r['a_bits']) == wa and key in r['metrics']}
    return Cell(by_seed.values()) if by_seed else None


def _cell_text(res: dict, name: str, wa: tuple, key: str, digits: int) -> str:
    """The row's cell at bit width ``wa``, '-' without runs; '*' marks where it beats RTN (same number of
    calibration images) by more than the combined spread."""
    c = cell(res, name, wa, key)
    if c is None:
        return '-'
    n = next((r.get('num_images', DEFAULT_NUM_IMAGES) for r in res['runs'] if row_name(r) == name), DEFAULT_NUM_IMAGES)
    base = cell(res, label({'method': 'rtn', 'num_images': n}), wa, key)
    return c.text(digits) + ('*' if base is not None and name != 'rtn' and c.beats(base) else '')


def significant_pairs(res: dict, methods, bits, key: str):
    """(bits, winner row, loser row, gap) for every pair of rows whose means differ by more than their stds added."""
    names = row_names(res, methods)
    out = []
    for wa in bits:
        cells = {n: cell(res, n, wa, key) for n in names}
        out += [(wa, a, b, cells[a].mean - cells[b].mean) for a, b in permutations(names, 2)
                if cells[a] is not None and cells[b] is not None and cells[a].beats(cells[b])]
    return out


def _seed_counts(res: dict, names, bits, key: str) -> str:
    counts = sorted({len(c.values) for n in names for wa in bits for c in [cell(res, n, wa, key)] if c})
    return '/'.join(map(str, counts)) or '0'


def _models(results: dict, methods):
    """(model, its results, headline metric, digits shown, table rows) for every model in ``results``."""
    for model, res in results['models'].items():
        key = metric_key(model, res)
        yield model, res, key, 2 if key == 'mIoU' else 3, row_names(res, methods)


def table(results: dict, methods, bits) -> str:
    lines = []
    for model, res, key, digits, names in _models(results, methods):
        lines.append(f"\n{model} ({key}; FP {res['fp'].get(key, float('nan')):.{digits}f}; "
                     f"seeds per cell: {_seed_counts(res, names, bits, key)})")
        lines.append(f"{'method':<34}" + ''.join(f'{"W%dA%d" % wa:>16}' for wa in bits))
        for name in names:
            lines.append(f'{name:<34}' + ''.join(f'{_cell_text(res, name, wa, key, digits):>16}' for wa in bits))
        for wa, a, b, gap in significant_pairs(res, methods, bits, key):
            lines.append(f'  W{wa[0]}A{wa[1]}: {a} > {b} by {gap:.{digits}f} (more than the combined std)')
    return '\n'.join(lines)


def markdown(results: dict, methods, bits) -> str:
    """The same table as `table`, one Markdown table per model, for the README."""
    out = []
    for model, res, key, digits, names in _models(results, methods):
        out += [f"\n**{model}** ({key}, FP {res['fp'].get(key, float('nan')):.{digits}f}; "
                f"seeds per cell: {_seed_counts(res, names, bits, key)})\n",
                '| method | ' + ' | '.join('W%dA%d' % wa for wa in bits) + ' | seconds per run |',
                '|---' * (len(bits) + 2) + '|']
        for name in names:
            secs = [r['seconds'] for r in res['runs'] if row_name(r) == name and (r['w_bits'], r['a_bits']) in bits
                    and not r.get('reevaluated')]  # a re-evaluation's seconds are the evaluation's alone
            out.append(f'| {name} | ' + ' | '.join(_cell_text(res, name, wa, key, digits) for wa in bits)
                       + (f' | {sum(secs) / len(secs):.0f} |' if secs else ' | - |'))
    return '\n'.join(out)


def plot(results: dict, methods, bits, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results['models']), figsize=(5 * len(results['models']), 3.5), squeeze=False)
    for ax, (model, res, key, _, names) in zip(axes[0], _models(results, methods)):
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            cells = [cell(res, name, wa, key) for wa in bits]
            ax.bar([j + i * width for j in range(len(bits))], [c.mean if c else 0 for c in cells], width,
                   yerr=[c.std if c else 0 for c in cells], capsize=2, label=name)
        ax.axhline(res['fp'].get(key, 0), color='k', linestyle='--', label='FP')
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], [f'W{w}A{a}' for w, a in bits])
        ax.set_title(f'{model}\n{key}')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 4), fontsize=7)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=100)


def curves(res: dict, wa: tuple, key: str) -> dict:
    """{method label: [(iterations, Cell)], ascending} for every method run at two or more budgets at ``wa``."""
    out: dict = {}
    for r in res['runs']:
        if r['method'] not in NO_ITERATIONS and (r['w_bits'], r['a_bits']) == wa and key in r['metrics']:
            out.setdefault(label(r), set()).add(r['iters'])
    return {name: [(it, cell(res, f'{name}, {it} it', wa, key)) for it in sorted(its)]
            for name, its in out.items() if len(its) > 1}


def curve_table(results: dict, wa: tuple) -> str:
    """Accuracy against iterations per unit; each point's gain over RTN as a share of the longest run's gain."""
    lines = []
    for model, res, key, digits, _ in _models(results, ()):
        rtn = cell(res, 'rtn', wa, key)
        for name, points in curves(res, wa, key).items():
            lines.append(f"\n{model} W{wa[0]}A{wa[1]} {name} ({key}; FP {res['fp'].get(key, float('nan')):.{digits}f}"
                         + (f'; RTN {rtn.text(digits)}' if rtn else '') + ')')
            top = points[-1][1].mean - rtn.mean if rtn else None
            for it, c in points:
                share = f'{100 * (c.mean - rtn.mean) / top:6.0f} % of the {points[-1][0]}-it gain' \
                    if top and top > 0 else ''
                lines.append(f'  {it:>6} it  {c.text(digits):>14}  {share}')
    return '\n'.join(lines)


def plot_curves(results: dict, wa: tuple, path: str) -> None:
    """The curves of `curves` on a log iteration axis, with RTN and FP as horizontal lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = [(model, res, key, curves(res, wa, key)) for model, res, key, _, _ in _models(results, ())]
    models = [m for m in models if m[3]]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, (model, res, key, model_curves) in zip(axes[0], models):
        for name, points in model_curves.items():
            ax.errorbar([p[0] for p in points], [p[1].mean for p in points], yerr=[p[1].std for p in points],
                        marker='o', capsize=2, label=name)
        rtn = cell(res, 'rtn', wa, key)
        if rtn:
            ax.axhline(rtn.mean, color='gray', linestyle=':', label='rtn')
        ax.axhline(res['fp'].get(key, 0), color='k', linestyle='--', label='FP')
        ax.set_xscale('log')
        ax.set_xlabel('iterations per unit')
        ax.set_title(f'{model} W{wa[0]}A{wa[1]}\n{key}')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def load_results(path: str) -> dict:
    with open(path) as f:
        results = json.load(f)
    if 'command' in results:
        results.setdefault('commands', []).append(results.pop('command'))
    return results


def check_same_fp_model(model: str, res: dict, digest, fp_metrics: dict, where: str) -> None:
    """Refuse to mix runs of two different FP models of `model` in one table.

    Results carry the FP config digest (``fp_digest``); files written before it was kept are
    matched on their FP metrics instead.
    """
    have = res.get('fp_digest')
    same = have == digest if have is not None and digest is not None else (
        not res.get('runs') or not res.get('fp') or not fp_metrics or res['fp'] == fp_metrics)
    if not same:
        raise SystemExit(f'error: {where} holds {model} runs of another FP model (digest {have or "unknown"}, '
                         f'FP {res.get("fp")}); the current one is {digest or "unknown"} (FP {fp_metrics}). '
                         'Use another --out, or remove that model from the file.')


def merge_results(into: dict, other: dict) -> None:
    """Add the runs of `other` that `into` lacks (same model, method, bits, iterations, images, options)."""
    into['commands'] = list(dict.fromkeys(into.get('commands', []) + other.get('commands', [])))
    for model, res in other['models'].items():
        mine = into['models'].setdefault(model, {'runs': []})
        mine.setdefault('fp', res.get('fp', {}))
        check_same_fp_model(model, mine, res.get('fp_digest'), res.get('fp', {}), 'the merged results')
        if res.get('fp_digest'):
            mine.setdefault('fp_digest', res['fp_digest'])
        have = {run_key(r) for r in mine['runs']}
        mine['runs'] += [r for r in res['runs'] if run_key(r) not in have]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['faster_rcnn_r18_fpn_shapes'])
    p.add_argument('--methods', nargs='+', default=['rtn', 'adaround', 'brecq', 'qdrop'])
    p.add_argument('--bits', nargs='+', default=['4/4', '2/4'])
    p.add_argument('--sanity-bits', nargs='*', default=['8/8'], help='extra bit widths run for --sanity-methods only')
    p.add_argument('--sanity-methods', nargs='*', default=['rtn', 'qdrop'])
    p.add_argument('--iters', type=int, default=300)
    p.add_argument('--num-images', type=int, default=DEFAULT_NUM_IMAGES)
    p.add_argument('--seeds', type=int, default=1, help='runs per cell with ptq.seed = 0 … N-1 (>= 3 for claims)')
    p.add_argument('--options', nargs='*', default=[], help='extra --cfg-options for every run, e.g. ptq.drop_prob=1.0 '
                   '(kept with each result and shown beside the method name)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (1: run several benchmarks at once)')
    p.add_argument('--val-images', type=int, default=None,
                   help='evaluate on a val split of this many generated images (default: the config\'s, 100); '
                        'a superset of the default split, for a smaller evaluation spread')
    p.add_argument('--out', default=osp.join(REPO, 'work_dirs/bench_accuracy'))
    p.add_argument('--merge', nargs='*', default=[], help='results.json files of earlier runs to add to --out first')
    p.add_argument('--no-run', action='store_true', help='only print the table and draw the chart of what --out holds')
    p.add_argument('--markdown', action='store_true', help='print the table as Markdown (for the README)')
    p.add_argument('--curve', metavar='W/A', help='also print and plot (curve.png) accuracy against iterations per '
                   'unit at these bits, for every method run at two or more --iters')
    args = p.parse_args(argv)
    import torch
    from qdrop_mm.demo.training import evaluate_fp_model, train_fp_model, with_val_split
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise SystemExit(f'error: --seeds must be >= 1, got {args.seeds}')
    parse = lambda pairs: [tuple(int(b) for b in wa.split('/')) for wa in pairs]  # noqa: E731
    bits, sanity = parse(args.bits), [wa for wa in parse(args.sanity_bits) if wa not in parse(args.bits)]
    plan = [(wa, m) for wa in bits for m in args.methods] + [(wa, m) for wa in sanity for m in args.sanity_methods]
    os.makedirs(args.out, exist_ok=True)
    path = osp.join(args.out, 'results.json')
    results = load_results(path) if osp.isfile(path) else {'models': {}}
    for other in args.merge:
        merge_results(results, load_results(other))
    results['machine'] = f'{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}'
    command = 'python tools/bench_accuracy.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    results['commands'] = list(dict.fromkeys(results.get('commands', []) + [command]))
    if args.merge:
        atomic_write_json(results, path)
    for base in ([] if args.no_run else args.models):
        cfg_path = osp.join(REPO, 'configs/demo', f'{base}.py')
        fp = train_fp_model(cfg_path, osp.join(REPO, 'work_dirs/demo', base))
        model, config, fp_metrics = split_name(base, args.val_images), None, fp['metrics']
        res = results['models'].setdefault(model, {'runs': []})
        digest = fp['record']['config_digest']
        if args.val_images:
            config = with_val_split(cfg_path, args.val_images)
            config.work_dir = osp.join(args.out, base)
            fp_metrics = res['fp'] if res.get('fp_digest') == digest else evaluate_fp_model(config, fp['checkpoint'])
        check_same_fp_model(model, res, digest, fp_metrics, path)
        res['fp'], res['fp_digest'] = fp_metrics, digest
        atomic_write_json(results, path)
        for seed in range(args.seeds):
            for (w_bits, a_bits), method in plan:
                key = (method, w_bits, a_bits, args.iters, args.num_images, tuple(args.options), seed)
                if any(run_key(r) == key for r in res['runs']):
                    continue
                res['runs'].append(run_one(model, method, w_bits, a_bits, seed, args, fp['checkpoint'], config))
                atomic_write_json(results, path)
    methods = list(dict.fromkeys(args.methods + args.sanity_methods))
    print((markdown if args.markdown else table)(results, methods, bits + sanity))
    plot(results, methods, bits + sanity, osp.join(args.out, 'accuracy.png'))
    if args.curve:
        wa = parse([args.curve])[0]
        print(curve_table(results, wa))
        plot_curves(results, wa, osp.join(args.out, 'curve.png'))
    print(f'wrote {path} and accuracy.png' + (' and curve.png' if args.curve else ''))
    return results
