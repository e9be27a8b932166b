"""Reconstruction speed and memory: seconds per iteration against a plain FP fwd+bwd of the same unit.

    python tools/bench_speed.py [--scale 1.0] [--iters 50] [--variants reference fused ...]
        [--e2e-images 4] [--e2e-iters 100] [--device-budget-gb 8] [--out work_dirs/bench_speed.json]
    python tools/bench_speed.py --cpu-blocks [--cpu-iters 200] [--variants reference fused fused_eager]
        [--out docs/results/speed_cpu.json]

Core only (plain PyTorch, ``qdrop_mm.core.reference_models``: the layer
shapes of mmdet's ResNet-50, FPN and MobileNetV2), so it runs on any machine
with torch, a GPU machine without mmcv included.

1. Units: a ResNet-50 Bottleneck (layer1.0; input 2x64 at 800x1344/4) and a
   MobileNetV2 InvertedResidual (layer2.1; input 2x24 at 608x1024/4), each
   side scaled by --scale. For each: FP fwd+bwd seconds, QDrop
   reconstruction seconds per iteration for each variant and its ratio to
   FP: ``reference`` (LSQ + drop as separate autograd ops), ``fused`` (one
   autograd function: the default), ``host_cache`` (fused, with the cache in
   pinned host memory, copied ahead on a side stream, instead of on the
   device), ``channels_last``, ``compile`` (``method_options.compile``:
   torch.compile of the unit's training forward); cache bytes per image, the
   cost of recomputing the FP target instead of caching it, peak memory.
2. End to end: ResNet-50 + FPN (25 units) at the same scale, --e2e-images
   smooth random images in batches of 2, --e2e-iters per unit, cache under
   --device-budget-gb: per-unit seconds per iteration and peak memory, and
   the estimate for Faster R-CNN R50-FPN W4A4 at the authors' settings (256
   images, 20 000 iterations per unit): per-unit steady s/it x 20 000, plus
   the first iterations' extra time (compilation, autotuning), plus capture
   time scaled to 256 images.
3. ``--cpu-blocks`` (instead of 1 and 2): CPU, one thread, a ResNet-18
   BasicBlock and the ResNet-50 layer1.0 Bottleneck at batch 8, 64 channels
   in, 56x56, W4A4, QDrop p = 0.5, --cpu-iters iterations, BN statistics
   calibrated on the seeded images. Each variant runs in its own process (so
   its peak RSS is its own) and times a plain FP fwd+bwd of the same
   BN-folded block (quantizers off, weights and input requiring grad; and
   without the input gradient, which reconstruction does not need) three
   times after each timing window of --cpu-iters/10 iterations; the ratio is
   the median over windows (the first, with compilation, left out) of the
   window's s/it over the FP steps timed right after it, so both saw the same
   machine load.
Variants: ``reference`` (separate autograd ops, ``rand_like`` masks),
``fused`` (one-pass kernels of ``qdrop_mm.core.fused`` through
``torch.compile``: the default), ``fused_eager`` (the same kernels without
compiling: what a failed compile falls back to).
Iteration times are steady-state: measured over the iterations after the
first log point.
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import os.path as osp
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List

import torch
from torch import nn

from qdrop_mm.core import (PTQCallbacks, act_quantizers, build_method, calibrate_activations, reconstruct_unit,
                           weight_quantizers)
from qdrop_mm.core import run_ptq
from qdrop_mm.core.ptq import build_unit_cache
from qdrop_mm.core.reference_models import (Bottleneck, InvertedResidual, ResNet50FPN, calibrate_bn_statistics,
                                            features_forward, quantize_bottleneck, quantize_inverted_residual,
                                            quantize_resnet50_fpn)
from qdrop_mm.core.toy_network import BasicBlock, quantize_toy_block, smooth_images
from qdrop_mm.core.unit_cache import GiB, CachePolicy

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

VARIANTS = ('reference', 'fused', 'fused_eager', 'host_cache', 'channels_last', 'compile')
CPU_BLOCKS = ('resnet18 BasicBlock', 'resnet50 layer1.0 Bottleneck')
FULL_ITERS, FULL_IMAGES = 20000, 256


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], None], repeat: int, device: torch.device) -> float:
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def padded(side: float, scale: float, stride: int = 32) -> int:
    return max(stride, int(round(side * scale / stride)) * stride)


def bench_unit(name: str, fp_module: nn.Module, quant_module: nn.Module, x_shape, args, device) -> dict:
    fp_module, quant_module = fp_module.to(device), quant_module.to(device)
    g = torch.Generator().manual_seed(0)
    images = [torch.relu(torch.randn(x_shape, generator=g)).to(device) for _ in range(max(1, args.num_images // 2))]

    def fp_step():
        x = images[0].clone().requires_grad_(True)
        fp_module.zero_grad(set_to_none=True)
        fp_module(x).pow(2).mean().backward()

    def fp_forward():
        with torch.no_grad():
            fp_module(images[0])

    row = {'unit': name, 'input': list(x_shape), 'fp_fwd_bwd_s': timed(fp_step, args.iters, device),
           'fp_forward_s': timed(fp_forward, args.iters, device)}
    ident = lambda m, b: m(b)  # noqa: E731
    calibrate_activations(quant_module, images, ident)
    base_stage = build_method('qdrop', iters=2 * args.iters, log_interval=args.iters).stages[0]
    state = {k: v.clone() for k, v in quant_module.state_dict().items()}
    on_device = CachePolicy(device_budget=int(args.device_budget_gb * GiB))
    for variant in args.variants:
        module, batch = quant_module, images
        if variant == 'channels_last':
            module = quant_module.to(memory_format=torch.channels_last)
            batch = [b.contiguous(memory_format=torch.channels_last) for b in images]
        set_implementation(quant_module, variant)
        policy = CachePolicy() if variant == 'host_cache' else on_device
        stage = replace(base_stage, compile=variant == 'compile')
        try:
            cache = build_unit_cache(module, module, batch, ident, base_stage, policy)
            row['cache_bytes_per_image'] = cache.num_bytes() / (len(images) * x_shape[0])
            reset_peak(device)
            quant_module.load_state_dict(state)
            clock = SteadyClock()
            reconstruct_unit(module, cache, stage, progress=clock)
            per_iter = clock.seconds_per_iter()
            cache.close()
        except Exception as err:  # a variant that fails on this machine is reported, not fatal
            row[f'{variant}_error'] = f'{type(err).__name__}: {err}'[:300]
            per_iter = float('nan')
        finally:
            quant_module.load_state_dict(state)
            quant_module.to(memory_format=torch.contiguous_format)
        row[f'{variant}_s_per_iter'] = per_iter
        row[f'{variant}_ratio'] = per_iter / row['fp_fwd_bwd_s']
        row[f'{variant}_peak_mb'] = peak_memory_mb(device)
    return row


def set_implementation(module: nn.Module, variant: str) -> None:
    """Quantizer implementation of a variant: reference ops, fused kernels compiled, or fused kernels eagerly."""
    for q in act_quantizers(module) + weight_quantizers(module):
        q.fused = variant != 'reference'
        q.compiled = variant != 'fused_eager'


def folded_fp(quant_module: nn.Module) -> nn.Module:
    """The BN-folded FP block: a copy with every quantizer off and its weights and biases requiring grad."""
    fp = copy.deepcopy(quant_module)
    for q in act_quantizers(fp) + weight_quantizers(fp):
        q.enabled = False
    for name, buf in fp.named_buffers():
        if name.endswith('weight') or name.endswith('bias'):
            buf.requires_grad_(True)
    return fp


def cpu_block(name: str, images: List[torch.Tensor]) -> nn.Module:
    """Seeded W4A4 block with BN statistics from ``images``, quantizers calibrated on them."""
    torch.manual_seed(0)
    fp = BasicBlock(64, 64) if name == CPU_BLOCKS[0] else Bottleneck(64, 64)
    for m in fp.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    calibrate_bn_statistics(fp, images, lambda m, b: m(b))
    quant = (quantize_toy_block if name == CPU_BLOCKS[0] else quantize_bottleneck)(fp, 4, 4)
    calibrate_activations(quant, images, lambda m, b: m(b))
    return quant


def bench_cpu_one(block: str, variant: str, iters: int) -> dict:
    """One block and variant, in this process: reconstruction s/it and FP fwd+bwd s/it timed in between."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = [torch.relu(torch.randn(8, 64, 56, 56, generator=g)) for _ in range(2)]
    quant = cpu_block(block, images)
    fp = folded_fp(quant)
    set_implementation(quant, variant)
    stage = replace(build_method('qdrop', iters=iters, log_interval=max(1, iters // 10)).stages[0], batch_size=8)
    cache = build_unit_cache(quant, quant, images, lambda m, b: m(b), stage)
    kinds = {'fp_fwd_bwd': True, 'fp_fwd_bwd_no_input_grad': False}
    fp_times: Dict[str, List[List[float]]] = {k: [] for k in kinds}
    windows: List[float] = []
    last = {'it': 0, 't': 0.0}

    def fp_step(input_grad: bool) -> float:
        x = images[1].clone().requires_grad_(input_grad)
        t0 = time.perf_counter()
        fp(x).pow(2).mean().backward()
        seconds = time.perf_counter() - t0
        for buf in fp.buffers():
            buf.grad = None
        return seconds

    def between_windows(it: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if last['it']:
            windows.append((now - last['t']) / (it - last['it']))
            for k, input_grad in kinds.items():
                fp_times[k].append([fp_step(input_grad) for _ in range(3)])
        else:
            fp_step(True)
        last['it'], last['t'] = it, time.perf_counter()

    t0 = time.perf_counter()
    result = reconstruct_unit(quant, cache, stage, progress=between_windows)
    steady = slice(1, None) if len(windows) > 1 else slice(None)
    row = {'unit': block, 'variant': variant, 'input': [8, 64, 56, 56], 'iters': iters,
           's_per_iter': statistics.median(windows[steady]), 'window_s_per_iter': windows,
           'wall_s': time.perf_counter() - t0, 'loss_before': result.loss_before, 'loss_after': result.loss_after,
           'peak_rss_mb': peak_memory_mb(torch.device('cpu'))}
    for k in kinds:
        fp_window = [statistics.median(t) for t in fp_times[k]]
        row[k + '_s'] = statistics.median(fp_window[steady])
        row['window_' + k + '_s'] = fp_window
        # each window against the FP steps timed right after it, so both saw the same machine load
        row['ratio' if k == 'fp_fwd_bwd' else 'ratio_no_input_grad'] = statistics.median(
            w / f for w, f in zip(windows[steady], fp_window[steady]))
    return row


def bench_cpu_blocks(args) -> dict:
    """Every CPU block and variant, each in a fresh one-thread process."""
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    for block in CPU_BLOCKS:
        for variant in args.variants:
            cmd = [sys.executable, osp.join(REPO, 'tools', 'bench_speed.py'), '--cpu-one', block, variant, '--cpu-iters', str(args.cpu_iters)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                        {'unit': block, 'variant': variant, 'error': out.stderr.strip().splitlines()[-1][:300]})
    return {'device': device_name(torch.device('cpu')) + ', one thread', 'torch': torch.__version__,
            'case': 'cpu_blocks', 'method': 'qdrop W4A4 p=0.5', 'batch': 8, 'iters': args.cpu_iters,
            'variants': list(args.variants), 'rows': rows}


def print_cpu_table(result: dict) -> None:
    print(f"device: {result['device']}; torch {result['torch']}; {result['method']}, batch {result['batch']}, "
          f"{result['iters']} iterations")
    print(f"{'unit':<30} {'variant':<12} {'FP f+b ms':>9} {'recon ms/it':>11} {'ratio':>6} "
          f"{'ratio (FP w/o input grad)':>25} {'peak RSS MB':>11}")
    for r in result['rows']:
        if 'error' in r:
            print(f"{r['unit']:<30} {r['variant']:<12} error: {r['error']}")
            continue
        print(f"{r['unit']:<30} {r['variant']:<12} {r['fp_fwd_bwd_s'] * 1e3:>9.1f} {r['s_per_iter'] * 1e3:>11.1f} "
              f"{r['ratio']:>6.2f} {r['ratio_no_input_grad']:>25.2f} {r['peak_rss_mb']:>11.0f}")


def build_units(scale: float) -> List[tuple]:
    torch.manual_seed(0)
    r50 = Bottleneck(64, 64).eval()
    mb = InvertedResidual(24, 24, 1, 6).eval()
    return [('resnet50 layer1.0 Bottleneck', r50, quantize_bottleneck(copy.deepcopy(r50), 4, 4),
             (2, 64, padded(800, scale) // 4, padded(1333, scale) // 4)),
            ('mobilenetv2 layer2.1 InvertedResidual', mb, quantize_inverted_residual(copy.deepcopy(mb), 4, 4),
             (2, 24, padded(600, scale) // 4, padded(1000, scale) // 4))]


class SteadyClock:
    """Progress callback that times the iterations after the first log point (compilation and autotuning done).

    The loop reads the loss at each log point (a device sync), so host clock readings there are exact.
    """

    def __init__(self) -> None:
        self.marks: List[tuple] = []

    def __call__(self, it: int, total: int, loss: float) -> None:
        self.marks.append((it, time.perf_counter()))

    def seconds_per_iter(self) -> float:
        (i0, t0), (i1, t1) = self.marks[-2], self.marks[-1]
        return (t1 - t0) / (i1 - i0)


class UnitMeter(PTQCallbacks):
    """Per unit: seconds (capture + reconstruction), reconstruction s/it, peak memory, cache bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: List[Dict] = []
        self.compensation: List[Dict] = []
        self._t0 = 0.0
        self.progress = SteadyClock()  # the run's progress callback: this unit's steady-state clock

    def before_unit(self, stage_idx, unit) -> None:
        sync(self.device)
        reset_peak(self.device)
        self._t0 = time.perf_counter()
        self.progress = SteadyClock()

    def after_unit(self, record) -> None:
        sync(self.device)
        total = time.perf_counter() - self._t0
        r = record.result
        steady = self.progress.seconds_per_iter()
        self.rows.append({'unit': record.name, 'recon_s_per_iter': steady,
                          'first_iters_overhead_s': r.seconds - steady * r.iters,
                          'capture_and_eval_s': total - r.seconds, 'cache_mb': record.cache_bytes / 2 ** 20,
                          'cache_usage_mb': {k: v / 2 ** 20 for k, v in record.cache_usage.items()},
                          'peak_mb': peak_memory_mb(self.device), 'loss_before': r.loss_before,
                          'loss_after': r.loss_after})

    def after_method_step(self, unit, record, message: str) -> None:
        if record is not None:
            r = record.result
            self.compensation.append({'unit': record.name, 'fit_s': r.seconds,
                                      'rel_error_before': r.rel_error_before, 'rel_error_after': r.rel_error_after})


def bench_e2e(args, device) -> dict:
    torch.manual_seed(0)
    h, w = padded(800, args.scale), padded(1333, args.scale)
    g = torch.Generator().manual_seed(0)
    widths = [w, padded(1216, args.scale)] if args.mixed_shapes else [w]
    batches = [smooth_images(2, max(h, w), g)[:, :, :h, :widths[i % len(widths)]].contiguous().to(device)
               for i in range(max(1, args.e2e_images // 2))]
    net = ResNet50FPN().to(device)
    calibrate_bn_statistics(net, batches, features_forward)
    units = quantize_resnet50_fpn(net, 4, 4)
    net.to(device)
    meter = UnitMeter(device)
    policy = CachePolicy(dtype=args.cache_dtype, device_budget=int(args.device_budget_gb * GiB),
                         host_budget=int(args.host_budget_gb * GiB), spill_dir=args.spill_dir)
    t0 = time.perf_counter()
    run_ptq(net, units, batches, features_forward,
            build_method(args.e2e_method, iters=args.e2e_iters, log_interval=max(1, args.e2e_iters // 2),
                         compile=args.compile), meter, policy)
    sync(device)
    wall = time.perf_counter() - t0
    images = 2 * len(batches)
    estimate_s = sum(r['recon_s_per_iter'] * FULL_ITERS + max(r['first_iters_overhead_s'], 0.0)
                     + r['capture_and_eval_s'] * FULL_IMAGES / images for r in meter.rows)
    estimate_s += sum(r['fit_s'] for r in meter.compensation) * FULL_IMAGES / images
    return {'input': [2, 3, h, w], 'widths': widths, 'method': args.e2e_method, 'compile': args.compile,
            'images': images,
            'iters_per_unit': args.e2e_iters, 'wall_s': wall,
            'cache_policy': {'dtype': args.cache_dtype, 'device_budget_gb': args.device_budget_gb,
                             'host_budget_gb': args.host_budget_gb},
            'units': meter.rows, 'compensation': meter.compensation,
            'estimate_20k_iters_256_images_h': estimate_s / 3600}


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores'


def print_tables(result: dict) -> None:
    print(f"device: {result['device']}; torch {result['torch']}; side scale {result['scale']}; "
          f"{result['iters']} timed iterations")
    variants = result['variants']
    head = f"{'unit':<38} {'input':>16} {'FP f+b ms':>9}" + ''.join(f' {v[:13]:>13}' for v in variants)
    print(head + f" {'cache MB/img':>12} {'recompute tgt':>13}")
    for r in result['rows']:
        cells = ''.join(f" {r[v + '_s_per_iter'] * 1e3:>7.1f} x{r[v + '_ratio']:<4.2f}" for v in variants)
        print(f"{r['unit']:<38} {'x'.join(map(str, r['input'])):>16} {r['fp_fwd_bwd_s'] * 1e3:>9.1f}{cells} "
              f"{r['cache_bytes_per_image'] / 2 ** 20:>12.1f} {r['fp_forward_s'] * 1e3:>10.1f} ms")
    if e2e := result.get('e2e'):
        print(f"\nend to end: ResNet-50 + FPN, input {'x'.join(map(str, e2e['input']))} (widths {e2e['widths']}), "
              f"{e2e['images']} images, {e2e['method']}, {e2e['iters_per_unit']} it/unit, compile={e2e['compile']}, "
              f"cache {e2e['cache_policy']}: wall {e2e['wall_s']:.1f} s")
        print(f"{'unit':<12} {'recon ms/it':>11} {'warm-up s':>9} {'capture s':>9} {'cache MB':>9} {'peak MB':>9}")
        for r in e2e['units']:
            print(f"{r['unit']:<12} {r['recon_s_per_iter'] * 1e3:>11.1f} "
                  f"{max(r['first_iters_overhead_s'], 0.0):>9.2f} {r['capture_and_eval_s']:>9.2f} "
                  f"{r['cache_mb']:>9.1f} {r['peak_mb']:>9.0f}")
        if fits := e2e['compensation']:
            print(f"QwT compensation: {len(fits)} units fitted in {sum(r['fit_s'] for r in fits):.1f} s; relative "
                  f"output error summed over units {sum(r['rel_error_before'] for r in fits):.3f} -> "
                  f"{sum(r['rel_error_after'] for r in fits):.3f}")
        print(f"estimate, Faster R-CNN R50-FPN W4A4 backbone+neck at {FULL_ITERS} it/unit and {FULL_IMAGES} "
              f"images: {e2e['estimate_20k_iters_256_images_h']:.2f} h")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--scale', type=float, default=0.25, help='fraction of the full input side (1 = 800x1333)')
    p.add_argument('--iters', type=int, default=20, help='timed iterations per unit benchmark')
    p.add_argument('--num-images', type=int, default=8, help='images cached for the unit benchmarks')
    p.add_argument('--variants', nargs='+', default=['reference', 'fused'], choices=VARIANTS)
    p.add_argument('--e2e-images', type=int, default=0, help='images for the end-to-end run (0: skip it)')
    p.add_argument('--e2e-iters', type=int, default=20, help='reconstruction iterations per unit end to end')
    p.add_argument('--e2e-method', default='qdrop', help='method of the end-to-end run (e.g. qwt: no iterations)')
    p.add_argument('--compile', action='store_true', help='end to end with method_options.compile=True')
    p.add_argument('--mixed-shapes', action='store_true', help='end to end with two image widths (as keep-ratio '
                   'resizing gives), so batches differ in shape')
    p.add_argument('--cache-dtype', default='float32', choices=('float32', 'float16', 'bfloat16'))
    p.add_argument('--device-budget-gb', type=float, default=24.0, help='cache budget on a GPU (unit and e2e runs)')
    p.add_argument('--host-budget-gb', type=float, default=16.0)
    p.add_argument('--spill-dir', default=None)
    p.add_argument('--cudnn-benchmark', action='store_true')
    p.add_argument('--cpu-blocks', action='store_true', help='the CPU one-thread block case only (see above)')
    p.add_argument('--cpu-iters', type=int, default=200, help='reconstruction iterations per CPU block run')
    p.add_argument('--cpu-one', nargs=2, metavar=('BLOCK', 'VARIANT'), help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help='JSON path (default work_dirs/bench_speed.json, '
                   'docs/results/speed_cpu.json with --cpu-blocks)')
    args = p.parse_args(argv)
    if args.cpu_one:
        print(json.dumps(bench_cpu_one(*args.cpu_one, iters=args.cpu_iters)))
        return {}
    if args.cpu_blocks:
        result = bench_cpu_blocks(args)
        print_cpu_table(result)
        return write_json(result, args.out or 'docs/results/speed_cpu.json')
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    rows = [bench_unit(n, fp, q, shape, args, device) for n, fp, q, shape in build_units(args.scale)]
    result = {'device': device_name(device), 'torch': torch.__version__, 'scale': args.scale, 'iters': args.iters,
              'variants': list(args.variants), 'cudnn_benchmark': args.cudnn_benchmark,
              'tf32_conv': torch.backends.cudnn.allow_tf32, 'rows': rows}
    if args.e2e_images:
        result['e2e'] = bench_e2e(args, device)
    print_tables(result)
    return write_json(result, args.out or 'work_dirs/bench_speed.json')


def write_json(result: dict, path: str) -> dict:
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {path}')
    return result

