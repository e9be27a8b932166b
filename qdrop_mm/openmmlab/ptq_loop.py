"""PTQLoop: an mmengine test loop that quantizes the model before evaluating it.

``Runner.from_cfg(cfg).test()`` with ``test_cfg = dict(type='qdrop_mm.PTQLoop')``
calibrates and reconstructs the model with the config's ``ptq`` settings
(or loads a saved quantized model), saves ``quantized.pth``, then runs the
standard test loop and evaluator unchanged and writes ``ptq_report.json``.

Reliability:

- Cheap checks first: the ``ptq`` settings, the quantization scope, the FP
  checkpoint's keys against the model, the data paths; each failure is a
  :class:`~qdrop_mm.openmmlab.settings.PTQError` with a one-line message.
- Resume: after calibration and after every finished (stage, unit) the state
  is saved in ``<work_dir>/ptq_resume`` (see :mod:`.resume`);
  ``resume=True`` (``tools/ptq.py --resume``) continues from the last
  finished unit and gives the same weights as an uninterrupted run.
- Determinism: torch, numpy and python's ``random`` are seeded from
  ``ptq.seed`` before the calibration data is built (random train
  transforms such as RandomFlip draw from them) and again before
  reconstruction. The core draws random numbers only inside a unit's
  reconstruction (cache sampling, input mixing, drop masks), so the RNG
  states saved after each unit and restored on resume make the remaining
  units draw exactly what an uninterrupted run draws.
- A NaN/inf reconstruction loss stops the run with the unit and iteration;
  the finished units stay saved for ``--resume``.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import TestLoop
from mmengine.utils import ProgressBar

from qdrop_mm.core import NonFiniteLossError, PTQCallbacks, Unit, UnitRecord, run_ptq
from qdrop_mm.core.method_hooks import MethodHooks
from qdrop_mm.core.methods import MethodConfig
from qdrop_mm.core.quant_state import act_quantizers
from qdrop_mm.core.sensitivity import quantized_error

from . import block_rules  # noqa: F401  (registers the OpenMMLab block rules)
from .atomic_io import atomic_write_json
from .block_plan import ModelPlan, plan_model, resolve_scope, scope_paths
from .calibration import (build_calibration_batches, calibration_forward, check_dataset_paths,
                          feature_forward, images_for_this_rank, num_images, roi_head_of, split_batches)
from .checkpoint import atomic_save, check_checkpoint_fits, quantized_checkpoint, safe_load
from .prediction_tail import PREDICTION_SOURCE
from .registry import LOOPS
from .report import build_report, format_summary, unit_bits
from .report_plots import RECON_CURVES_FILE, UNIT_ERRORS_FILE, write_report_plots
from .resume import ResumeSession, seed_everything
from .settings import PTQConfigError, PTQError, PTQSettings, config_errors

QUANTIZED_FILE = 'quantized.pth'
REPORT_FILE = 'ptq_report.json'


def rebuild_quantized(model: torch.nn.Module, path: str, settings: PTQSettings) -> Tuple[PTQSettings, ModelPlan]:
    """Convert ``model`` in place to the quantized structure saved in ``path`` and load its state.

    The settings stored in the checkpoint win over ``settings`` (those of the config). Raises
    ``PTQConfigError`` with a one-line message when the file is not a quantized checkpoint of this model.
    """
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise PTQConfigError(f'{path} is not a qdrop_mm quantized checkpoint (no state_dict)')
    meta = ckpt.get('meta', {})
    if meta.get('ptq') is not None:
        settings = PTQSettings.from_cfg(meta['ptq'])
    with config_errors(f'{path}: '):
        plan = plan_model(model, settings, unit_order=meta.get('units'))
    try:
        missing, unexpected = model.load_state_dict(ckpt['state_dict'], strict=False)
    except RuntimeError as err:
        shapes = [line.strip() for line in str(err).splitlines() if 'size mismatch' in line]
        raise PTQConfigError(f'{path} does not fit this model: {len(shapes)} tensors of another shape '
                             f'(e.g. {shapes[0] if shapes else str(err).splitlines()[0]})') from None
    if missing or unexpected:
        raise PTQConfigError(f'{path} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), '
                             f'{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')
    return settings, plan


def log_plan_coverage(logger, plan: ModelPlan) -> None:
    """WARNING for every weight layer in scope left FP; INFO for norms kept FP (not foldable)."""
    line = plan.fp_summary()
    if line:
        logger.warning(line + ' (all listed under fp_layers in ptq_report.json)')
    if plan.unfolded_norms:
        kinds = sorted({t for _, t in plan.unfolded_norms})
        logger.info(f'{len(plan.unfolded_norms)} norm(s) that cannot be folded ({", ".join(kinds)}) stay FP between '
                    f'their quantized layer and its activation quantizer, e.g. {plan.unfolded_norms[0][0]}')


def drop_weight_swapping_hooks(runner) -> None:
    """Remove hooks that swap FP weight copies into the model around the test loop (mmengine's EMAHook).

    RTMDet/YOLOX configs register EMAHook, which keeps an FP copy of every parameter and swaps it in
    before testing: with a quantized model the structures differ and the swap fails (or would put FP
    weights back). The checkpoint's ``state_dict`` already holds the EMA weights (mmengine swaps them
    in when saving), so without the hook the same weights are quantized and evaluated.
    """
    from mmengine.hooks import EMAHook
    removed = [type(h).__name__ for h in runner._hooks if isinstance(h, EMAHook)]
    if removed:
        runner._hooks[:] = [h for h in runner._hooks if not isinstance(h, EMAHook)]
        runner.logger.warning(f'removed training-only hook(s) {removed}: they swap FP weight copies into the model '
                              f'at test time; the checkpoint state_dict already holds the EMA weights')


def check_roi_head_scope(model: torch.nn.Module, paths: Sequence[str]) -> None:
    """RoI heads in scope must crop boxes that :class:`~.calibration.FixedProposalForward` can fix to the FP
    network's: those of a StandardRoIHead (Faster/Mask R-CNN) or a CascadeRoIHead (Cascade R-CNN; subclasses
    such as HTC untested), whose every crop goes through ``_bbox_forward`` / ``_mask_forward``."""
    try:
        from mmdet.models.roi_heads import CascadeRoIHead, SparseRoIHead, StandardRoIHead
    except ImportError:  # an mmseg-only install: no RoI heads
        return
    for path in paths:
        head = roi_head_of(model, path)
        if head is not None and (not isinstance(head, (StandardRoIHead, CascadeRoIHead))
                                 or isinstance(head, SparseRoIHead) or not getattr(model, 'with_rpn', False)):
            raise PTQConfigError(f'ptq.scope entry {path!r} is (in) a {type(head).__name__}: its inputs are '
                                 f'crops at boxes that only StandardRoIHead / CascadeRoIHead behind an RPN '
                                 f'let be fixed to the FP network\'s, so they have no FP target here')



def checked_scope(model: torch.nn.Module, scope: Sequence[str]) -> Tuple[str, ...]:
    """The paths of ``ptq.scope`` once each names a module and no RoI head in it lacks FP targets; else a
    one-line PTQConfigError."""
    with config_errors():
        paths = tuple(path for path, _ in resolve_scope(model, scope))
    check_roi_head_scope(model, paths)
    return paths

class NonFiniteUnitError(PTQError, FloatingPointError):
    """A unit's reconstruction loss became NaN/inf; the finished units are kept for --resume."""


class LoopCallbacks(PTQCallbacks):
    """mmengine-style log lines per phase and unit (a progress bar per unit), and the resume session:
    restored units are skipped, the state is saved after calibration and after each unit."""

    def __init__(self, logger, units: Sequence[Unit], num_stages: int, session: ResumeSession) -> None:
        self.logger, self.num_stages, self.session = logger, num_stages, session
        self.num_units = len(units)
        self._position = {u.name: i for i, u in enumerate(units)}
        self._bar: Optional[ProgressBar] = None
        self._done = self._index = 0
        self.current: Optional[Tuple[int, Unit]] = None

    def before_calibration(self, num_quantizers: int) -> None:
        self.logger.info(f'{num_quantizers} activation quantizers restored from the resume state (calibrated)'
                         if self.session.calibrated else
                         f'calibrating {num_quantizers} activation quantizers (L2.4 range search on FP activations)')

    def after_calibration(self) -> None:
        self.session.save_calibration()

    def restored(self, stage_idx: int, unit: Unit) -> Optional[UnitRecord]:
        return self.session.restored(stage_idx, unit.name)

    def before_unit(self, stage_idx: int, unit: Unit) -> None:
        self._index = self._position[unit.name] + 1 if unit.name in self._position else \
            self._index % self.num_units + 1
        bits = unit_bits(unit)
        self.logger.info(f'[stage {stage_idx + 1}/{self.num_stages}] unit {self._index}/{self.num_units} '
                         f'{unit.name} ({unit.kind}, w{bits["w_bits"]} a{bits["a_bits"]})')
        self._bar, self._done = None, 0
        self.current = (stage_idx, unit)

    def progress(self, it: int, total: int, loss: float) -> None:
        if self._bar is None:
            self._bar = ProgressBar(total)
        self._bar.update(it - self._done)
        self._done = it

    def after_unit(self, record: UnitRecord) -> None:
        r = record.result
        self.logger.info(f'{record.name}: output MSE {r.loss_before:.5g} -> {r.loss_after:.5g} '
                         f'({r.iters} it, {r.seconds:.1f} s, cache {record.cache_bytes / 2 ** 20:.1f} MiB)')
        if r.extra:
            self.logger.info(f'{record.name}: ' + ', '.join(f'{k} {v:.5g}' for k, v in r.extra.items()))
        self.session.save_unit(record, self.current[1].module)
        self.current = None
        if all(self.session.restored(record.stage, u) for u in self._position):
            self.logger.info(f'stage {record.stage + 1}/{self.num_stages} done; resume state in {self.session.dir}')

    def after_method_step(self, unit: Unit, record: Optional[UnitRecord], message: str) -> None:
        (self.logger.info if record is not None else self.logger.warning)(message)


class _CheckpointFitHook(Hook):
    """Checks the FP checkpoint's keys against the model when mmengine loads ``load_from``."""

    priority = 'VERY_HIGH'

    def __init__(self, loop: 'PTQLoop') -> None:
        self.loop = loop

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.loop.load_quantized is None:
            check_checkpoint_fits(self.loop.model, checkpoint, str(getattr(runner, '_load_from', None)))


@LOOPS.register_module()
class PTQLoop(TestLoop):
    """Quantize (or load a quantized model), then evaluate like ``TestLoop``."""

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, ptq: Optional[dict] = None,
                 load_quantized: Optional[str] = None, resume: bool = False) -> None:
        super().__init__(runner, dataloader, evaluator, fp16)
        self.settings = PTQSettings.from_cfg(ptq if ptq is not None else runner.cfg.get('ptq', {}))
        self.load_quantized = load_quantized
        if resume and load_quantized:
            raise PTQConfigError('resume and load_quantized exclude each other: --resume continues a '
                                 'reconstruction, --load-quantized skips it')
        self.plan: Optional[ModelPlan] = None
        self.report: Optional[Dict[str, Any]] = None
        self.quantized_path: Optional[str] = load_quantized
        self.session = ResumeSession(runner.work_dir, runner.logger, resume)
        runner.register_hook(_CheckpointFitHook(self))
        drop_weight_swapping_hooks(runner)

    @property
    def model(self) -> torch.nn.Module:
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    def preflight(self) -> Tuple[MethodConfig, List[MethodHooks]]:
        """Checks that need the built model but no data (scope, the method's own checks, train data paths);
        returns the method and the hooks ``quantize`` runs."""
        paths = checked_scope(self.model, self.settings.scope)
        method = self.settings.build_method()
        hooks = method.build_hooks(PREDICTION_SOURCE)
        for hook in hooks:
            with config_errors(f'ptq.method={self.settings.method}: '):
                hook.check(self.model, paths)
        cfg = self.runner.cfg
        if cfg.get('train_dataloader') is not None:
            check_dataset_paths(cfg.train_dataloader.get('dataset'), 'train_dataloader.dataset')
        return method, hooks

    def quantize(self, method: MethodConfig, hooks: List[MethodHooks]) -> Dict[str, Any]:
        """Calibrate and reconstruct in place (continuing a saved run when resuming)."""
        logger, settings, model, session = self.runner.logger, self.settings, self.model, self.session
        session.open()
        t0 = time.perf_counter()
        seed_everything(settings.seed)
        batches = build_calibration_batches(
            self.runner.cfg, replace(settings, num_images=settings.num_images + settings.holdout_images))
        batches, held_out = split_batches(batches, images_for_this_rank(settings.num_images))
        logger.info(f'calibration: {num_images(batches)} train images in {len(batches)} batches of '
                    f'{settings.calibration_batch_size}, input shapes {sorted({tuple(b["inputs"][0].shape) for b in batches})[:3]}'
                    + (f'; {num_images(held_out)} held-out train images for the feature-error check' if held_out else ''))
        t1 = time.perf_counter()
        model.eval()
        for hook in hooks:
            hook.prepare(model)
        paths = scope_paths(model, settings.scope)
        forward = calibration_forward(model, paths, batches)
        with config_errors():
            self.plan = plan_model(model, settings, lambda: forward(model, batches[0]))
        logger.info(f'block plan: {len(self.plan.units)} units in {list(paths)} '
                    f'({sum(u.kind == "block" for u in self.plan.units)} blocks); method {method.name}, '
                    f'{len(method.stages)} stage(s)')
        log_plan_coverage(logger, self.plan)
        if self.plan.uncalled:
            unseen = [n for n in self.plan.uncalled if act_quantizers(model.get_submodule(n))]
            if unseen:
                raise PTQConfigError(
                    f'ptq.scope: {len(unseen)} unit(s) with activation quantizers are not run by the calibration '
                    f'forward (the model\'s {"extract_feat" if forward is feature_forward else "_forward"}), '
                    f'e.g. {unseen[:3]}: remove them from ptq.scope')
            logger.warning(f'not on the calibration forward\'s path, quantized by rounding only: {self.plan.uncalled}')
        shared = [f'{u.name} (x{u.calls})' for u in self.plan.units if u.calls > 1]
        if shared:
            logger.info(f'{len(shared)} unit(s) run several times per image (shared across pyramid levels), each '
                        f'call one reconstruction sample: {shared[:4]}{" ..." if len(shared) > 4 else ""}')
        session.start(model, settings, self.plan.units, batches, getattr(self.runner, '_load_from', None),
                      len(method.stages))
        for name in (QUANTIZED_FILE, REPORT_FILE, RECON_CURVES_FILE, UNIT_ERRORS_FILE):
            # a failed run must not leave an earlier run's results behind
            path = os.path.join(self.runner.work_dir, name)
            if is_main_process() and os.path.exists(path):
                os.unlink(path)
                logger.info(f'removed {path} of an earlier run')
        callbacks = LoopCallbacks(logger, self.plan.units, len(method.stages), session)
        try:
            result = run_ptq(model, self.plan.units, batches, forward, method, callbacks,
                             settings.cache_policy(self.runner.work_dir), hooks=hooks)
        except NonFiniteLossError as err:
            raise self._non_finite(err, callbacks, method) from None
        extra: Dict[str, Any] = {'resumed_units': session.resumed_units}
        if held_out:
            extra['feature_error'] = self._feature_error(batches, held_out)
        t2 = time.perf_counter()
        path = os.path.join(self.runner.work_dir, QUANTIZED_FILE)
        meta = {'ptq': settings.to_dict(), 'method': method.to_dict(),
                'units': [u.name for u in self.plan.units]}
        if is_main_process():
            atomic_save(quantized_checkpoint(model.state_dict(), meta), path)
        session.update(status='complete')
        self.quantized_path = path
        logger.info(f'saved quantized model to {path}')
        for hook in hooks:
            extra.update(hook.report(result))
        return {'result': result, 'timings': {'calibration_data': t1 - t0, 'reconstruction': t2 - t1}, 'extra': extra}

    @torch.no_grad()
    def _feature_error(self, calib: Sequence[dict], held_out: Sequence[dict]) -> Dict[str, Any]:
        """Relative error of the quantized model's features (extract_feat) against FP, calibration vs held-out.

        A reconstruction that lowers the first but not the second fits its calibration images.
        """
        errors = {name: quantized_error(self.model, batches, feature_forward)
                  for name, batches in (('calibration', calib), ('held_out', held_out))}
        errors['held_out_images'] = num_images(held_out)
        self.runner.logger.info(f"feature error (||F_q - F||^2 / ||F||^2 over extract_feat outputs): calibration "
                                f"{errors['calibration']:.4g}, held-out {errors['held_out']:.4g} "
                                f"({errors['held_out_images']} train images not used for calibration)")
        return errors

    def _non_finite(self, err: NonFiniteLossError, callbacks: LoopCallbacks,
                    method: MethodConfig) -> NonFiniteUnitError:
        stage_idx, unit = callbacks.current if callbacks.current else (0, None)
        name = unit.name if unit is not None else '?'
        index = [u.name for u in self.plan.units].index(name) + 1 if unit is not None else 0
        iters = method.stages[stage_idx].iters if method.stages else '?'
        done = len(self.session.finished)
        message = (f'non-finite reconstruction loss ({err.value}) in unit {name} '
                   f'(stage {stage_idx + 1}/{len(method.stages)}, unit {index}/{len(self.plan.units)}) at iteration '
                   f'{err.iteration + 1}/{iters}; {done} finished unit(s) are saved in {self.session.dir}: fix the '
                   f'cause (e.g. lower ptq.method_options.w_lr / a_lr, check the FP checkpoint for NaN/inf '
                   f'weights) and continue with --resume')
        self.session.update(last_error=message)
        return NonFiniteUnitError(message)

    def load(self, path: str) -> Dict[str, Any]:
        """Rebuild the quantized structure and load a saved quantized state dict."""
        self.settings, self.plan = rebuild_quantized(self.model, path, self.settings)
        self.runner.logger.info(f'loaded quantized model from {path}')
        log_plan_coverage(self.runner.logger, self.plan)
        return {'result': None, 'timings': {}, 'extra': {}}

    def run(self) -> dict:
        t0 = time.perf_counter()
        done = self.load(self.load_quantized) if self.load_quantized else self.quantize(*self.preflight())
        t1 = time.perf_counter()
        metrics = super().run()
        timings = dict(done['timings'], evaluation=time.perf_counter() - t1, total=time.perf_counter() - t0)
        report = build_report(self.settings, self.plan.units, done['result'], metrics, timings,
                              extra={'loaded_from': self.load_quantized, **done['extra']},
                              fp_layers=[asdict(f) for f in self.plan.fp_layers],
                              unfolded_norms=self.plan.unfolded_norms)
        if is_main_process():
            if report['units']:
                report['plots'] = write_report_plots(report, self.runner.work_dir, self.runner.logger.warning)
            atomic_write_json(report, os.path.join(self.runner.work_dir, REPORT_FILE))
        self.report = report
        self.runner.logger.info('\n' + format_summary(report))
        if not self.load_quantized and self.session.clear():
            self.runner.logger.info(f'run complete: removed the resume state {self.session.dir}')
        return metrics
