"""Coverage of stock mmdet / mmseg configs: does PTQ run, reload identically, and quantize everything in scope?

    python tools/coverage.py [--cases retinanet_r18 rtmdet_tiny ...] [--iters 3] [--num-images 2]
        [--data-root ../shared/coco128] [--work-dir work_dirs/coverage] [--out docs/results/coverage.json]

For every case a random-weight model of the stock config (its own architecture, stock widths) is
quantized at W4A4 through ``tools/ptq.py``'s code path (the config's own hooks included) on tiny
images (128x96) from coco128: ``--num-images`` calibration images from the train split, ``--iters``
iterations per unit, ``--test-images`` test images. Then the saved ``quantized.pth`` is evaluated
with ``--load-quantized`` and the raw predictions of both runs are compared for bit identity.
Prints (and writes to ``--out``) one row per case: units (blocks / layers), layers left FP and their
share of the weights in scope, BatchNorms left unfolded in scope, run ok, reload identical.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_DATA = osp.join(osp.dirname(REPO), 'shared', 'coco128')
IMAGE_SCALE = (128, 96)


@dataclass(frozen=True)
class Case:
    """A stock config to cover: ``package`` is 'mmdet' or 'mmseg', ``config`` its path under .mim/configs."""

    name: str
    family: str
    package: str
    config: str
    model: Tuple[Tuple[str, Any], ...] = ()  # model keys changed for the tiny input (what and why in CASES)
    keep_all_boxes: bool = True  # detectors: score_thr=0 so random weights still predict boxes to compare


CASES = [
    Case('retinanet_r18', 'ResNet', 'mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py'),
    Case('faster_rcnn_r50', 'ResNet', 'mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'),
    Case('faster_rcnn_x101', 'ResNeXt', 'mmdet', 'faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py'),
    Case('faster_rcnn_regnetx', 'RegNet', 'mmdet', 'regnet/faster-rcnn_regnetx-3.2GF_fpn_1x_coco.py'),
    Case('cascade_rcnn_r50', 'ResNet', 'mmdet', 'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py'),
    Case('fcos_r50', 'ResNet (caffe)', 'mmdet', 'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'),
    Case('atss_r50', 'ResNet', 'mmdet', 'atss/atss_r50_fpn_1x_coco.py'),
    Case('rtmdet_tiny', 'CSPNeXt', 'mmdet', 'rtmdet/rtmdet_tiny_8xb32-300e_coco.py'),
    Case('yolox_s', 'CSPDarknet', 'mmdet', 'yolox/yolox_s_8xb8-300e_coco.py'),
    # mask pasting fails on the degenerate low-score boxes random weights give: stock score_thr
    Case('mask_rcnn_swin_t', 'Swin', 'mmdet', 'swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', keep_all_boxes=False),
    # 900 queries need more than the 256 encoder tokens a 128x96 image gives: 100 queries
    Case('dino_r50', 'ResNet + GN neck', 'mmdet', 'dino/dino-4scale_r50_8xb2-12e_coco.py',
         (('num_queries', 100),)),
    Case('segformer_b0', 'MiT', 'mmseg', 'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'),
    Case('fcn_hr18s', 'HRNet', 'mmseg', 'hrnet/fcn_hr18s_4xb2-40k_cityscapes-512x1024.py'),
    Case('deeplabv3plus_r50', 'ResNetV1c', 'mmseg', 'deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    Case('pspnet_r50', 'ResNetV1c', 'mmseg', 'pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'),
    Case('fast_scnn', 'Fast-SCNN', 'mmseg', 'fastscnn/fast_scnn_8xb4-160k_cityscapes-512x1024.py'),
]


@dataclass
class Row:
    """One line of the coverage table."""

    case: str
    family: str
    config: str
    blocks: int = 0
    layers: int = 0
    fp_layers: int = 0
    fp_share: float = 0.0
    unfolded_bn: int = 0
    unfolded_norms: int = 0
    run_ok: bool = False
    reload_identical: bool = False
    compared: str = ''  # what the identity check compared (boxes or pixels), so an empty result shows
    seconds: float = 0.0
    error: str = ''
    fp_names: List[str] = field(default_factory=list)


def stock_config_path(case: Case) -> str:
    """The stock config file inside the installed package (``.mim/configs``)."""
    import importlib
    pkg = importlib.import_module(case.package)
    path = osp.join(osp.dirname(pkg.__file__), '.mim', 'configs', case.config)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{case.package} has no config {case.config}')
    return path


def _det_dataset(root: str, split: str) -> Dict[str, Any]:
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=IMAGE_SCALE, keep_ratio=True),
                dict(type='Pad', size_divisor=32), dict(type='LoadAnnotations', with_bbox=True),
                dict(type='PackDetInputs')]
    return dict(type='CocoDataset', data_root=root, ann_file=f'annotations/instances_{split}.json',
                data_prefix=dict(img=f'{split}/'), filter_cfg=dict(filter_empty_gt=False), pipeline=pipeline,
                test_mode=split == 'val2017')


def _seg_dataset(root: str, split: str, ann_file: str, num_classes: int) -> Dict[str, Any]:
    """A BaseSegDataset of the coco128 images of ``split`` that have a semantic mask, written to ``ann_file``."""
    names = sorted(osp.splitext(f)[0] for f in os.listdir(osp.join(root, 'stuff', split)) if f.endswith('.png'))
    with open(ann_file, 'w') as f:
        f.write('\n'.join(names) + '\n')
    pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=IMAGE_SCALE, keep_ratio=False),
                dict(type='LoadAnnotations'), dict(type='PackSegInputs')]
    return dict(type='BaseSegDataset', data_root=root, ann_file=ann_file, img_suffix='.jpg', seg_map_suffix='.png',
                data_prefix=dict(img_path=split, seg_map_path=f'stuff/{split}'), pipeline=pipeline,
                metainfo=dict(classes=tuple(f'class{i}' for i in range(num_classes))))


def keep_all_scores(cfg: Any) -> Any:
    """``cfg`` (a model's test_cfg) with every ``score_thr`` set to 0: random weights score below the stock
    thresholds, and an empty prediction would make the reload comparison vacuous."""
    if isinstance(cfg, dict):
        return {k: 0.0 if k == 'score_thr' else keep_all_scores(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(keep_all_scores(v) for v in cfg)
    return cfg


def write_case_config(case: Case, work_dir: str, data_root: str, test_images: int) -> str:
    """A config inheriting the stock one and qdrop_mm's ptq base, on tiny coco128 images, random init."""
    from mmengine.config import Config
    stock = stock_config_path(case)
    base = Config.fromfile(stock)
    root = osp.abspath(data_root) + '/'
    work_dir = osp.abspath(work_dir)  # the segmentation lists are ann_files: a relative one would be under data_root
    os.makedirs(work_dir, exist_ok=True)
    loader = dict(_delete_=True, batch_size=1, num_workers=0, persistent_workers=False,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    if case.package == 'mmdet':
        model = dict(backbone=dict(init_cfg=None))
        if case.keep_all_boxes and base.model.get('test_cfg') is not None:
            model['test_cfg'] = keep_all_scores(base.model.test_cfg.to_dict())
        train_set, test_set = _det_dataset(root, 'train2017'), _det_dataset(root, 'val2017')
        evaluator = dict(_delete_=True, type='CocoMetric', ann_file=root + 'annotations/instances_val2017.json',
                         metric='bbox')
    else:
        num_classes = base.model.decode_head.num_classes
        model = dict(pretrained=None, backbone=dict(init_cfg=None))
        train_set, test_set = (_seg_dataset(root, f'{s}2017', osp.join(work_dir, f'{s}.txt'), num_classes)
                               for s in ('train', 'val'))
        evaluator = dict(_delete_=True, type='IoUMetric', iou_metrics=['mIoU'])
    model.update(dict(case.model))
    test = dict(loader, dataset=dict(test_set, indices=test_images))
    assignments = dict(_base_=[stock, osp.join(REPO, 'configs', '_base_', 'ptq_qdrop.py')], model=model,
                       train_dataloader=dict(loader, batch_size=2, dataset=train_set), test_dataloader=test,
                       val_dataloader=test, test_evaluator=evaluator, val_evaluator=evaluator)
    path = osp.join(work_dir, f'{case.name}.py')
    with open(path, 'w') as f:
        f.writelines(f'{k} = {v!r}\n' for k, v in assignments.items())
        f.write("test_cfg = dict(type='qdrop_mm.PTQLoop')\n")
    return path


def save_random_checkpoint(config: str, path: str, seed: int = 0) -> str:
    """Random weights of the config's model, with non-degenerate BatchNorm statistics."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from torch import nn
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) * 0.8 + 0.4)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    torch.save({'state_dict': model.state_dict(), 'meta': {'note': 'random weights (tools/coverage.py)'}}, path)
    return path


def _prediction_tensors(sample: Any) -> Dict[str, Any]:
    return {f'{key}.{k}': v.detach().cpu().clone() if hasattr(v, 'detach') else v
            for key in ('pred_instances', 'pred_sem_seg', 'seg_logits') if getattr(sample, key, None) is not None
            for k, v in getattr(sample, key).items()}


def run_ptq(config: str, checkpoint: str, work_dir: str, options: List[str],
            load_quantized: Optional[str] = None) -> Tuple[Any, List[Dict[str, Any]], Dict[str, Any]]:
    """tools/ptq.py's path (the run's config, Runner, test loop) plus a hook keeping the raw predictions.

    Returns (the runner, predictions per test image, metrics). Errors surface as tools/ptq.py's
    ``SystemExit('error: ...')``.
    """
    from mmengine.hooks import Hook
    from qdrop_mm.openmmlab.runner import build_ptq_cfg, exit_on_error, parse_cfg_options, run_test_loop

    class KeepPredictions(Hook):
        def __init__(self) -> None:
            self.predictions: List[Dict[str, Any]] = []

        def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self.predictions += [_prediction_tensors(o) for o in outputs or []]

    keep = KeepPredictions()
    cfg = exit_on_error(build_ptq_cfg, config, None if load_quantized else checkpoint, work_dir,
                        parse_cfg_options(options), load_quantized=load_quantized)
    metrics, runner = exit_on_error(run_test_loop, cfg, hooks=[keep])
    return runner, keep.predictions, metrics


def plan_row(runner: Any, row: Row) -> None:
    """Fill ``row`` from the PTQ loop's plan: units, FP layers, BatchNorms left in scope."""
    from torch import nn
    from qdrop_mm.openmmlab.block_plan import scope_paths
    loop = runner.test_loop
    plan, model = loop.plan, loop.model
    row.blocks = sum(u.kind == 'block' for u in plan.units)
    row.layers = sum(u.kind == 'layer' for u in plan.units)
    row.fp_layers = len(plan.fp_layers)
    quantized, fp = plan.num_weights()
    row.fp_share = round(fp / max(quantized + fp, 1), 4)
    row.fp_names = [f'{f.name} ({f.type})' for f in plan.fp_layers]
    row.unfolded_norms = len(plan.unfolded_norms)
    row.unfolded_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for p in scope_paths(model, loop.settings.scope)
                          for m in model.get_submodule(p).modules())


def compared_items(predictions: List[Dict[str, Any]]) -> str:
    """'N boxes' (detection) or 'N pixels' (segmentation) over the test images."""
    boxes = sum(len(p['pred_instances.bboxes']) for p in predictions if 'pred_instances.bboxes' in p)
    if boxes or any('pred_instances.bboxes' in p for p in predictions):
        return f'{boxes} boxes'
    return f"{sum(p['pred_sem_seg.data'].numel() for p in predictions if 'pred_sem_seg.data' in p)} pixels"


def identical(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> bool:
    """As many images (at least one), the same keys, tensors equal in shape and value, other values equal."""
    import torch

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        return x == y

    return len(a) == len(b) > 0 and all(x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))


def run_case(case: Case, work_root: str, data_root: str = DEFAULT_DATA, iters: int = 3, num_images: int = 2,
             test_images: int = 2, extra_options: Tuple[str, ...] = ()) -> Row:
    """Quantize, reload and compare one case; a failure is recorded in ``row.error`` (one line)."""
    row = Row(case.name, case.family, case.config)
    start = time.perf_counter()
    work = osp.join(work_root, case.name)
    try:
        config = write_case_config(case, work, data_root, test_images)
        ckpt = save_random_checkpoint(config, osp.join(work, 'fp.pth'))
        options = [f'ptq.num_images={num_images}', f'ptq.iters={iters}', 'ptq.batch_size=2',
                   'ptq.calib_num_workers=0', 'ptq.w_observer=minmax', 'ptq.a_observer=minmax', *extra_options]
        runner, first, _ = run_ptq(config, ckpt, osp.join(work, 'ptq'), options)
        plan_row(runner, row)
        row.run_ok = True
        _, second, _ = run_ptq(config, ckpt, osp.join(work, 'load'), options,
                               load_quantized=osp.join(work, 'ptq', 'quantized.pth'))
        row.reload_identical = identical(first, second)
        row.compared = compared_items(first)
        if not row.reload_identical:
            row.error = 'predictions after --load-quantized differ from the quantizing run'
    except SystemExit as err:
        row.error = str(err)
    except Exception as err:  # noqa: BLE001  building the case itself failed
        row.error = f'{type(err).__name__}: {(str(err).splitlines() or [""])[0][:300]}'
    row.seconds = round(time.perf_counter() - start, 1)
    return row


def format_table(rows: List[Row]) -> str:
    """The README's markdown table."""
    lines = ['| family | config | units: blocks / layers | layers left FP (share of weights) | BN unfolded | '
             'norms kept FP | run ok | reload identical (predictions compared) |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        fp = f'{r.fp_layers} ({100 * r.fp_share:.1f} %)' if r.run_ok else '-'
        lines.append(f'| {r.family} | `{r.config}` | {r.blocks} / {r.layers} | {fp} | '
                     f'{r.unfolded_bn if r.run_ok else "-"} | {r.unfolded_norms if r.run_ok else "-"} | '
                     f'{"yes" if r.run_ok else "no"} | {"yes" if r.reload_identical else "no"}'
                     f'{f" ({r.compared})" if r.compared else ""} |')
    errors = [f'- {r.case}: {r.error}' for r in rows if r.error]
    return '\n'.join(lines + ([''] + errors if errors else []))


def main(argv: Optional[List[str]] = None) -> List[Row]:
    p = argparse.ArgumentParser(description='PTQ coverage of stock mmdet/mmseg configs (random weights, tiny)')
    p.add_argument('--cases', nargs='+', choices=[c.name for c in CASES], help='default: all')
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--num-images', type=int, default=2)
    p.add_argument('--test-images', type=int, default=2)
    p.add_argument('--data-root', default=DEFAULT_DATA)
    p.add_argument('--work-dir', default=osp.join('work_dirs', 'coverage'))
    p.add_argument('--out', help='write the rows as JSON here')
    args = p.parse_args(argv)
    if not osp.isdir(args.data_root):
        raise SystemExit(f'error: --data-root {args.data_root} is not a folder (coco128 layout expected)')
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    rows = []
    for case in (c for c in CASES if not args.cases or c.name in args.cases):
        row = run_case(case, args.work_dir, args.data_root, args.iters, args.num_images, args.test_images)
        print(f'[coverage] {case.name}: {"ok" if row.run_ok else "FAILED"} ({row.seconds} s) {row.error}',
              flush=True)
        rows.append(row)
        if args.out:
            atomic_write_json([asdict(r) for r in rows], args.out, indent=1)
    print(format_table(rows))
    return rows

