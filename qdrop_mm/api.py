"""The Python API: quantize an mmdet/mmseg model from its config, load a saved quantized model.

Every tool is a command-line shim over these functions, so a notebook gets exactly what
``tools/ptq.py`` does::

    import qdrop_mm
    run = qdrop_mm.quantize('configs/demo/faster_rcnn_r18_fpn_shapes_w4a4.py', 'fp_model.pth',
                            work_dir='work_dirs/w4a4', w_bits=4, a_bits=4, iters=300)
    run.metrics['coco/bbox_mAP'], run.report['summary'], run.model   # the quantized model

A user-fixable problem raises :class:`~qdrop_mm.openmmlab.settings.PTQError` (a ``ValueError``
for bad config keys) with a one-line message naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from .openmmlab.runner import ConfigLike, build_ptq_cfg, load_config, run_test_loop


@dataclass
class PTQRun:
    """What a run leaves: the quantized model, the evaluator's metrics, the report and where files went."""

    model: nn.Module
    metrics: Dict[str, float]
    report: Dict[str, Any]
    work_dir: str
    quantized: Optional[str]


def _finish(metrics: dict, runner: Any) -> PTQRun:
    loop = runner.test_loop  # a PTQLoop: it owns the unwrapped model, the report and the saved path
    return PTQRun(loop.model, dict(metrics), loop.report, str(runner.work_dir), loop.quantized_path)


def quantize(config: ConfigLike, checkpoint: Optional[str] = None, *, work_dir: Optional[str] = None,
             cfg_options: Optional[Mapping[str, Any]] = None, resume: bool = False, launcher: str = 'none',
             allow_unsafe_checkpoint: bool = False, **ptq: Any) -> PTQRun:
    """Calibrate, reconstruct and evaluate the model of ``config`` (a path or an mmengine ``Config``).

    ``checkpoint``: the FP weights (default: the config's ``load_from``). ``ptq``: keys of the config's
    ``ptq`` section (``w_bits=2``, ``method='brecq'``, ...); ``cfg_options``: any other dotted config key.
    Writes ``quantized.pth`` and ``ptq_report.json`` in ``work_dir``; ``resume`` continues an
    interrupted run there.
    """
    options = {**(cfg_options or {}), **{f'ptq.{key}': value for key, value in ptq.items()}}
    cfg = build_ptq_cfg(config, checkpoint, work_dir, options, resume=resume, launcher=launcher)
    return _finish(*run_test_loop(cfg, allow_unsafe_checkpoint))


def load_quantized(config: ConfigLike, quantized: str, *, work_dir: Optional[str] = None,
                   cfg_options: Optional[Mapping[str, Any]] = None, launcher: str = 'none',
                   allow_unsafe_checkpoint: bool = False) -> PTQRun:
    """Rebuild the quantized model saved in ``quantized`` (a ``quantized.pth``) and evaluate it."""
    cfg = build_ptq_cfg(config, None, work_dir, cfg_options, load_quantized=quantized, launcher=launcher)
    return _finish(*run_test_loop(cfg, allow_unsafe_checkpoint))


def build_quantized_model(config: ConfigLike, quantized: str,
                          cfg_options: Optional[Mapping[str, Any]] = None) -> Tuple[Any, nn.Module]:
    """(cfg, model in eval mode) with the structure and state of ``quantized``; no data, no evaluation (export)."""
    from mmengine.registry import MODELS, init_default_scope
    from .openmmlab.ptq_loop import rebuild_quantized
    from .openmmlab.settings import PTQSettings
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model).eval()
    rebuild_quantized(model, quantized, PTQSettings.from_cfg(cfg.get('ptq', {})))
    return cfg, model.eval()


def analyze_sensitivity(config: ConfigLike, checkpoint: Optional[str] = None, *, work_dir: Optional[str] = None,
                        cfg_options: Optional[Mapping[str, Any]] = None, eval_images: int = 4, keep_8bit: int = 2,
                        metric: Optional[str] = None, parts: str = 'units', quantized: Optional[str] = None,
                        allow_unsafe_checkpoint: bool = False) -> Dict[str, Any]:
    """Per-unit or per-activation-quantizer sensitivity (feature error, optionally the metric drop) of RTN or of
    the ``quantized`` model; writes sensitivity.json/.png."""
    from .openmmlab import sensitivity  # noqa: F401  (registers qdrop_mm.SensitivityLoop)
    cfg = build_ptq_cfg(config, checkpoint, work_dir, cfg_options, loop='qdrop_mm.SensitivityLoop',
                        eval_images=eval_images, keep_8bit=keep_8bit, metric=metric, parts=parts,
                        quantized=quantized)
    return run_test_loop(cfg, allow_unsafe_checkpoint)[0]
