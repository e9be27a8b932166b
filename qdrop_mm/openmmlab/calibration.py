"""Calibration data from the config's *train* split, and the feature forward used for capture."""
from __future__ import annotations

import copy
import inspect
import os.path as osp
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.config import ConfigDict
from mmengine.runner import Runner
from torch import Tensor, nn

from .settings import PTQConfigError, PTQSettings


def calibration_dataloader_cfg(cfg: ConfigDict, settings: PTQSettings) -> Dict[str, Any]:
    """The train dataloader config, re-batched for calibration and shuffled with the PTQ seed."""
    if 'train_dataloader' not in cfg or cfg.train_dataloader is None:
        raise PTQConfigError('the config has no train_dataloader: calibration uses the train split '
                             '(never val); define train_dataloader or inherit it from an mmdet/mmseg base config')
    dl = copy.deepcopy(cfg.train_dataloader)
    dl['batch_size'] = settings.calibration_batch_size
    dl['num_workers'] = settings.calib_num_workers
    dl['persistent_workers'] = False
    dl['sampler'] = dict(type='DefaultSampler', shuffle=True, seed=settings.seed)
    dl.pop('batch_sampler', None)
    return dl


def build_calibration_batches(cfg: ConfigDict, settings: PTQSettings) -> List[dict]:
    """``settings.num_images`` train images through the train pipeline, in batches of ``calibration_batch_size``.

    Deterministic for a given ``ptq.seed``: the sampler is seeded, dataloader workers are seeded by
    mmengine from the same seed, and the caller seeds the main process' RNGs (random transforms
    such as RandomFlip run there when ``calib_num_workers`` is 0). The data paths are checked
    by the caller (``PTQLoop.preflight``) before any resume state is touched.
    """
    loader = Runner.build_dataloader(calibration_dataloader_cfg(cfg, settings), seed=settings.seed)
    available = len(loader.dataset)
    if available < settings.num_images:
        raise PTQConfigError(_too_few(cfg, settings, available))
    wanted = images_for_this_rank(settings.num_images)
    batches, seen = [], 0
    for batch in loader:
        take = min(len(batch['inputs']), wanted - seen)
        batches.append({k: v[:take] for k, v in batch.items()})
        seen += take
        if seen >= wanted:
            break
    if seen < wanted:
        raise PTQConfigError(_too_few(cfg, settings, seen))
    return batches


def images_for_this_rank(num_images: int) -> int:
    """This process' share of the calibration images (the sampler already shards by rank)."""
    from mmengine.dist import get_rank, get_world_size
    world, rank = get_world_size(), get_rank()
    return num_images // world + (1 if rank < num_images % world else 0)


def _too_few(cfg: ConfigDict, settings: PTQSettings, available: int) -> str:
    root = (cfg.train_dataloader.get('dataset') or {}).get('data_root')
    return (f'ptq.num_images={settings.num_images} but the train split (train_dataloader.dataset, '
            f'data_root={root!r}) yields only {available} images; ptq.num_images must be from 1 to {available}')


def _is_remote(path: str) -> bool:
    return '://' in path


def _join(root: Optional[str], path: str) -> str:
    return path if root is None or osp.isabs(path) or _is_remote(path) else osp.join(root, path)


def check_dataset_paths(dataset: Any, key: str) -> None:
    """Fail early, naming the config key, when a dataset's data_root, ann_file or image folder is missing.

    Follows wrapped datasets (``dataset`` / ``datasets`` of RepeatDataset, ConcatDataset, ...). Paths
    are resolved like mmengine's BaseDataset: relative ones under data_root; remote ones are skipped.
    """
    if not isinstance(dataset, Mapping):
        return
    if isinstance(dataset.get('dataset'), Mapping):
        check_dataset_paths(dataset['dataset'], f'{key}.dataset')
    if isinstance(dataset.get('datasets'), (list, tuple)):
        for i, sub in enumerate(dataset['datasets']):
            check_dataset_paths(sub, f'{key}.datasets.{i}')
    root = dataset.get('data_root')
    if isinstance(root, str) and root and not _is_remote(root) and not osp.isdir(root):
        raise PTQConfigError(f'{key}.data_root: directory not found: {root!r} (must be an existing folder; '
                             f'set it with --cfg-options {key}.data_root=DIR)')
    root = root if isinstance(root, str) and root else None
    prefix = dataset.get('data_prefix')
    paths = [('ann_file', dataset.get('ann_file'), osp.isfile, 'file not found', 'file')] + [
        (f'data_prefix.{name}', prefix.get(name), osp.isdir, 'image folder not found', 'folder')
        for name in ('img', 'img_path') if isinstance(prefix, Mapping)]
    for name, sub, exists, what, kind in paths:
        if isinstance(sub, str) and sub and not _is_remote(_join(root, sub)) and not exists(_join(root, sub)):
            raise PTQConfigError(f'{key}.{name}: {what}: {_join(root, sub)!r} (must be an existing {kind}, '
                                 f'relative to data_root={root!r})')


def check_evaluator_paths(evaluator: Any, key: str = 'test_evaluator') -> None:
    """The evaluator's ground-truth file (e.g. CocoMetric's ann_file) must exist before hours of PTQ."""
    items = evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]
    for i, ev in enumerate(items):
        ann = ev.get('ann_file') if isinstance(ev, Mapping) else None
        name = key if len(items) == 1 else f'{key}.{i}'
        if isinstance(ann, str) and ann and not _is_remote(ann) and not osp.isfile(ann):
            raise PTQConfigError(f'{name}.ann_file: file not found: {ann!r} (must be an existing file)')


def preprocess_features(model: nn.Module, batch: dict) -> Tuple[dict, Any]:
    """(the data preprocessor's output for a data batch, the detector's / segmentor's features of it)."""
    data = model.data_preprocessor(batch, False)
    return data, model.extract_feat(data['inputs'])


def feature_forward(model: nn.Module, batch: dict) -> Any:
    """Preprocess a data batch and run the detector's / segmentor's feature extraction."""
    return preprocess_features(model, batch)[1]


def model_forward(model: nn.Module, batch: dict) -> Any:
    """Preprocess a data batch and run the whole network up to its raw head outputs (``model._forward``)."""
    data = model.data_preprocessor(batch, False)
    return model._forward(data['inputs'], data['data_samples'])


FEATURE_MODULES = ('backbone', 'neck')


ROI_CROPS = ('_bbox_forward', '_mask_forward')
_OTHER_CROPS = 'FixedProposalForward: the RoI head crops other boxes than on the FP pass (more, fewer or other shapes)'


@contextmanager
def _crops_through(roi_head: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, every box/mask crop of ``roi_head`` (its ``_bbox_forward`` / ``_mask_forward`` calls)
    crops ``fn(rois)`` instead of ``rois``: the instance's methods are shadowed and restored on exit."""
    def shadow(method):
        signature = inspect.signature(method)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.arguments['rois'] = fn(bound.arguments['rois'])
            return method(*bound.args, **bound.kwargs)
        return call
    names = [n for n in ROI_CROPS if 'rois' in inspect.signature(getattr(roi_head, n, lambda: None)).parameters]
    for name in names:
        setattr(roi_head, name, shadow(getattr(roi_head, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(roi_head, name)


class FixedProposalForward:
    """``model_forward`` of a two-stage detector whose RoI head crops, for each batch, the FP network's boxes.

    A RoI head's input is the features at the RPN's proposals (and, in a cascade, at the boxes each stage
    regresses for the next), and quantizing the network moves them: the FP and the quantized pass would crop
    different boxes and the RoI head's quantized inputs would have no FP target. The proposals and the RoIs of
    every box/mask crop are recorded once here, with every quantizer off, and both passes crop those, call by
    call. Returns the RPN's raw outputs (its units are captured as usual) and the RoI head's.
    """

    def __init__(self, model: nn.Module, batches: Sequence[dict]) -> None:
        from qdrop_mm.core import quant_state
        self._batches = list(batches)  # keeps the ids below unique
        self._fixed: Dict[int, Tuple[Any, List[Tensor]]] = {}
        with torch.no_grad(), quant_state(model, weight=False, act=False):
            for batch in self._batches:
                data, x = preprocess_features(model, batch)
                proposals = model.rpn_head.predict(x, data['data_samples'], rescale=False)
                crops: List[Tensor] = []
                with _crops_through(model.roi_head, lambda rois: crops.append(rois) or rois):
                    model.roi_head.forward(x, proposals, data['data_samples'])
                self._fixed[id(batch)] = (proposals, crops)

    def __call__(self, model: nn.Module, batch: dict) -> Any:
        if id(batch) not in self._fixed:
            raise KeyError('FixedProposalForward: a batch it was not built with (no FP proposals for it)')
        proposals, crops = self._fixed[id(batch)]
        replay = iter(crops)

        def replayed(rois: Tensor) -> Tensor:
            fixed = next(replay, None)
            if fixed is None or fixed.shape != rois.shape:
                raise RuntimeError(_OTHER_CROPS)
            return fixed
        data, x = preprocess_features(model, batch)
        with _crops_through(model.roi_head, replayed):
            out = model.rpn_head(x), model.roi_head.forward(x, proposals, data['data_samples'])
        if next(replay, None) is not None:
            raise RuntimeError(_OTHER_CROPS)
        return out


def roi_head_of(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The mmdet RoI head that ``path`` is or lies in, else None."""
    try:
        from mmdet.models.roi_heads import BaseRoIHead
    except ImportError:  # an mmseg-only install: no RoI heads
        return None
    parts = path.split('.')
    owners = [model.get_submodule('.'.join(parts[:i])) for i in range(1, len(parts) + 1)]
    return next((m for m in owners if isinstance(m, BaseRoIHead)), None)


def calibration_forward(model: nn.Module, scope: Sequence[str], batches: Sequence[dict]) -> Any:
    """How calibration and capture drive ``model`` over a batch: ``feature_forward`` when every scope path lies
    in the backbone or neck (extract_feat runs them); with a RoI head in scope of a detector with an RPN,
    :class:`FixedProposalForward` over ``batches`` (call it on the FP model); else ``model_forward``: heads
    in scope see their inputs through the model's own forward."""
    if all(p.split('.')[0] in FEATURE_MODULES for p in scope):
        return feature_forward
    if getattr(model, 'with_rpn', False) and any(roi_head_of(model, p) is not None for p in scope):
        return FixedProposalForward(model, batches)
    return model_forward


def num_images(batches: List[dict]) -> int:
    return sum(len(b['inputs']) for b in batches)


def split_batches(batches: Sequence[dict], n_images: int) -> Tuple[List[dict], List[dict]]:
    """The first ``n_images`` images of ``batches`` and the rest, splitting a batch where needed."""
    first, rest, seen = [], [], 0
    for batch in batches:
        n = len(batch['inputs'])
        take = min(n, max(n_images - seen, 0))
        if take == n:
            first.append(batch)
        elif take == 0:
            rest.append(batch)
        else:
            first.append({k: v[:take] for k, v in batch.items()})
            rest.append({k: v[take:] for k, v in batch.items()})
        seen += take
    return first, rest
