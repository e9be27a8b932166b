"""Calibration data from the config's *train* split, and the feature forward used for capture."""
from __future__ import annotations

import copy
from typing import Any, Dict, List

import torch
from mmengine.config import ConfigDict
from mmengine.runner import Runner
from torch import nn

from .settings import PTQSettings


def calibration_dataloader_cfg(cfg: ConfigDict, settings: PTQSettings) -> Dict[str, Any]:
    """The train dataloader config, re-batched for calibration and shuffled with the PTQ seed."""
    if 'train_dataloader' not in cfg or cfg.train_dataloader is None:
        raise ValueError('the config has no train_dataloader: calibration uses the train split '
                         '(never val); define train_dataloader or inherit it from an mmdet/mmseg base config')
    dl = copy.deepcopy(cfg.train_dataloader)
    dl['batch_size'] = settings.batch_size
    dl['num_workers'] = settings.calib_num_workers
    dl['persistent_workers'] = False
    dl['sampler'] = dict(type='DefaultSampler', shuffle=True, seed=settings.seed)
    dl.pop('batch_sampler', None)
    return dl


def build_calibration_batches(cfg: ConfigDict, settings: PTQSettings) -> List[dict]:
    """``settings.num_images`` train images through the train pipeline, in batches of ``batch_size``."""
    loader = Runner.build_dataloader(calibration_dataloader_cfg(cfg, settings), seed=settings.seed)
    available = len(loader.dataset)
    if available < settings.num_images:
        raise ValueError(f'ptq.num_images={settings.num_images} but the train split has only {available} images '
                         f'(data_root={cfg.train_dataloader.dataset.get("data_root")!r}); lower ptq.num_images')
    batches, seen = [], 0
    for batch in loader:
        take = min(len(batch['inputs']), settings.num_images - seen)
        batches.append({k: v[:take] for k, v in batch.items()})
        seen += take
        if seen >= settings.num_images:
            break
    return batches


def feature_forward(model: nn.Module, batch: dict) -> Any:
    """Preprocess a data batch and run the detector's / segmentor's feature extraction."""
    data = model.data_preprocessor(batch, False)
    return model.extract_feat(data['inputs'])


def num_images(batches: List[dict]) -> int:
    return sum(len(b['inputs']) for b in batches)
