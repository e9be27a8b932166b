"""Evaluate predictors on a config's test split with the config's own evaluator (e.g. COCO bbox mAP).

Used to compare the PyTorch fake-quant model with the exported graph run in onnxruntime on the same
data: both go through the same dataloader, ``data_preprocessor`` and metric, in one pass.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

Predictor = Callable[[dict], List[Any]]


def evaluate(cfg: Any, predictors: Dict[str, Predictor], max_images: Optional[int] = None,
             batch_size: Optional[int] = None) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List[Any]]]:
    """{name: metrics} of each predictor on ``cfg.test_dataloader`` with its own ``cfg.test_evaluator``, and
    {name: its data samples with predictions, in dataloader order}.

    ``predict(batch)`` gets its own copy of one dataloader batch (``inputs`` and ``data_samples`` before the
    data_preprocessor) and returns the data samples with predictions, as ``model.test_step`` does. One
    process, no workers. ``max_images``: only the first images; ``batch_size``: override the config's.
    """
    from mmengine.evaluator import Evaluator
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.update(num_workers=0, persistent_workers=False)
    if batch_size is not None:
        loader_cfg['batch_size'] = batch_size
    if max_images is not None:
        loader_cfg['dataset']['indices'] = max_images
    loader = Runner.build_dataloader(loader_cfg)
    evaluators = {name: Evaluator(copy.deepcopy(cfg.test_evaluator)) for name in predictors}
    for evaluator in evaluators.values():
        evaluator.dataset_meta = loader.dataset.metainfo
    predictions: Dict[str, List[Any]] = {name: [] for name in predictors}
    with torch.no_grad():
        for batch in loader:
            for name, predict in predictors.items():
                samples = predict(copy.deepcopy(batch))  # a predictor may write into the samples
                predictions[name].extend(samples)
                evaluators[name].process(data_samples=samples, data_batch=batch)
    return {name: e.evaluate(len(loader.dataset)) for name, e in evaluators.items()}, predictions
