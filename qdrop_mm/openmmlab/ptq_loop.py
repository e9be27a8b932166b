"""PTQLoop: an mmengine test loop that quantizes the model before evaluating it.

``Runner.from_cfg(cfg).test()`` with ``test_cfg = dict(type='qdrop_mm.PTQLoop')``
calibrates and reconstructs the model with the config's ``ptq`` settings
(or loads a saved quantized model), saves ``quantized.pth``, then runs the
standard test loop and evaluator unchanged and writes ``ptq_report.json``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import torch
from mmengine.model import is_model_wrapper
from mmengine.runner import TestLoop
from mmengine.utils import ProgressBar

from qdrop_mm.core import PTQCallbacks, Unit, UnitRecord, run_ptq

from . import block_rules  # noqa: F401  (registers the OpenMMLab block rules)
from .block_plan import ModelPlan, plan_model
from .calibration import build_calibration_batches, feature_forward, num_images
from .checkpoint import atomic_save, quantized_checkpoint, safe_load
from .registry import LOOPS
from .report import build_report, format_summary, unit_bits, write_report
from .settings import PTQSettings

QUANTIZED_FILE = 'quantized.pth'
REPORT_FILE = 'ptq_report.json'


class LoggingCallbacks(PTQCallbacks):
    """mmengine-style log lines per phase and unit, with a progress bar per unit."""

    def __init__(self, logger, num_units: int, num_stages: int) -> None:
        self.logger = logger
        self.num_units = num_units
        self.num_stages = num_stages
        self._bar: Optional[ProgressBar] = None
        self._done = 0
        self._index = 0

    def before_calibration(self, num_quantizers: int) -> None:
        self.logger.info(f'calibrating {num_quantizers} activation quantizers (L2.4 range search on FP activations)')

    def before_unit(self, stage_idx: int, unit: Unit) -> None:
        self._index = self._index % self.num_units + 1
        bits = unit_bits(unit)
        self.logger.info(f'[stage {stage_idx + 1}/{self.num_stages}] unit {self._index}/{self.num_units} '
                         f'{unit.name} ({unit.kind}, w{bits["w_bits"]} a{bits["a_bits"]})')
        self._bar, self._done = None, 0

    def progress(self, it: int, total: int, loss: float) -> None:
        if self._bar is None:
            self._bar = ProgressBar(total)
        self._bar.update(it - self._done)
        self._done = it

    def after_unit(self, record: UnitRecord) -> None:
        r = record.result
        self.logger.info(f'{record.name}: output MSE {r.loss_before:.5g} -> {r.loss_after:.5g} '
                         f'({r.iters} it, {r.seconds:.1f} s, cache {record.cache_bytes / 2 ** 20:.1f} MiB)')


@LOOPS.register_module()
class PTQLoop(TestLoop):
    """Quantize (or load a quantized model), then evaluate like ``TestLoop``."""

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, ptq: Optional[dict] = None,
                 load_quantized: Optional[str] = None) -> None:
        super().__init__(runner, dataloader, evaluator, fp16)
        self.settings = PTQSettings.from_cfg(ptq if ptq is not None else runner.cfg.get('ptq', {}))
        self.load_quantized = load_quantized
        self.plan: Optional[ModelPlan] = None

    @property
    def model(self) -> torch.nn.Module:
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    def quantize(self) -> Dict[str, Any]:
        """Calibrate and reconstruct in place; returns timings and the core's result."""
        logger, settings, model = self.runner.logger, self.settings, self.model
        method = settings.build_method()
        t0 = time.perf_counter()
        torch.manual_seed(settings.seed)
        batches = build_calibration_batches(self.runner.cfg, settings)
        logger.info(f'calibration: {num_images(batches)} train images in {len(batches)} batches of '
                    f'{settings.batch_size}, input shapes {sorted({tuple(b["inputs"][0].shape) for b in batches})[:3]}')
        t1 = time.perf_counter()
        model.eval()
        self.plan = plan_model(model, settings, lambda: feature_forward(model, batches[0]))
        logger.info(f'block plan: {len(self.plan.units)} units in {list(settings.scope)} '
                    f'({sum(u.kind == "block" for u in self.plan.units)} blocks); method {method.name}, '
                    f'{len(method.stages)} stage(s)')
        if self.plan.uncalled:
            logger.warning(f'not on the feature path, quantized by rounding only: {self.plan.uncalled}')
        torch.manual_seed(settings.seed)
        callbacks = LoggingCallbacks(logger, len(self.plan.units), len(method.stages))
        result = run_ptq(model, self.plan.units, batches, feature_forward, method, callbacks)
        t2 = time.perf_counter()
        path = os.path.join(self.runner.work_dir, QUANTIZED_FILE)
        meta = {'ptq': settings.to_dict(), 'method': method.to_dict(),
                'units': [u.name for u in self.plan.units]}
        atomic_save(quantized_checkpoint(model.state_dict(), meta), path)
        logger.info(f'saved quantized model to {path}')
        return {'result': result, 'timings': {'calibration_data': t1 - t0, 'reconstruction': t2 - t1}}

    def load(self, path: str) -> Dict[str, Any]:
        """Rebuild the quantized structure and load a saved quantized state dict."""
        ckpt = safe_load(path)
        if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
            raise ValueError(f'{path} is not a qdrop_mm quantized checkpoint (no state_dict)')
        saved = ckpt.get('meta', {}).get('ptq')
        if saved is not None:
            self.settings = PTQSettings.from_cfg(saved)
        self.plan = plan_model(self.model, self.settings)
        missing, unexpected = self.model.load_state_dict(ckpt['state_dict'], strict=False)
        if missing or unexpected:
            raise ValueError(f'{path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), '
                             f'{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')
        self.runner.logger.info(f'loaded quantized model from {path}')
        return {'result': None, 'timings': {}}

    def run(self) -> dict:
        t0 = time.perf_counter()
        done = self.load(self.load_quantized) if self.load_quantized else self.quantize()
        t1 = time.perf_counter()
        metrics = super().run()
        timings = dict(done['timings'], evaluation=time.perf_counter() - t1, total=time.perf_counter() - t0)
        report = build_report(self.settings, self.plan.units, done['result'], metrics, timings,
                              extra={'loaded_from': self.load_quantized})
        write_report(report, os.path.join(self.runner.work_dir, REPORT_FILE))
        self.runner.logger.info('\n' + format_summary(report))
        return metrics
