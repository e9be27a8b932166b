"""Sensitivity analysis: each unit's (or activation quantizer's) effect when only it is quantized, and a
mixed-precision suggestion.

``SensitivityLoop`` (``type='qdrop_mm.SensitivityLoop'``, run by ``tools/sensitivity.py``) builds the
calibration batches and the block plan exactly as ``PTQLoop`` does, quantizes with RTN (nearest
rounding, activation steps calibrated by the config's observer, the config's bits and overrides) or
loads a saved quantized model (``quantized``: e.g. reconstructed by QDrop), then for each part
switches on only that part's quantizers and measures the relative error of the feature maps
(``extract_feat``: backbone + neck outputs) against FP on held-out calibration images. A part is a unit
(``parts='units'``) or one activation quantizer with every weight FP (``parts='activations'``: what each
low-bit activation costs on its own). With ``metric`` the config's evaluator also runs once for FP, once
with every part quantized and once per part (slow: parts + 2 full evaluations). The ranking gives
``ptq.overrides`` that keep the ``keep_8bit`` most sensitive units (those of the most sensitive
activations) at 8-bit weights and activations.
"""
from __future__ import annotations

import copy
import dataclasses
import os.path as osp
import pprint
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmengine.config import ConfigDict
from mmengine.runner import TestLoop

from qdrop_mm.core import Unit, calibrate_activations, quant_state
from qdrop_mm.core.bit_budget import act_bit_counts, average_bits, merge_counts, weight_bit_counts
from qdrop_mm.core.lsq import LSQActQuantizer
from qdrop_mm.core.sensitivity import all_quantized, measure_sensitivity

from .atomic_io import atomic_write, atomic_write_json
from .block_plan import plan_model
from .calibration import build_calibration_batches, calibration_forward, feature_forward, num_images, split_batches
from .ptq_loop import PTQLoop, _CheckpointFitHook, checked_scope, rebuild_quantized
from .registry import LOOPS
from .report import format_bits, plain_metrics, unit_bits
from .report_plots import SENSITIVITY_FILE, write_sensitivity_plot
from .resume import seed_everything
from .settings import PTQConfigError, PTQSettings, config_errors

SENSITIVITY_JSON = 'sensitivity.json'
MIXED_PRECISION_CONFIG = 'mixed_precision_config.py'
PREFERRED_METRICS = ('coco/bbox_mAP', 'coco/segm_mAP', 'mIoU')
KEEP_BITS = 8
PARTS = {'units': 'unit', 'activations': 'activation quantizer'}


def choose_metric(metrics: Dict[str, Any], wanted: str) -> str:
    """``wanted`` if the evaluator reports it; 'auto': box mAP, mask mAP or mIoU, else the first number."""
    if wanted != 'auto':
        if wanted not in metrics:
            raise PTQConfigError(f'--metric {wanted!r}: the evaluator reports {sorted(metrics)}; pass one of them')
        return wanted
    candidates = [k for k in PREFERRED_METRICS if k in metrics] + [
        k for k, v in metrics.items() if isinstance(v, (int, float))]
    if not candidates:
        raise PTQConfigError(f'--metric: the evaluator reports no number ({sorted(metrics)})')
    return candidates[0]


def rank_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Most sensitive first: by metric drop when measured (ties by feature error), else by feature error."""
    def key(r: Dict[str, Any]) -> Tuple[float, float]:
        return (r['metric_drop'] if r.get('metric_drop') is not None else 0.0, r['rel_error'])
    return [dict(r, rank=i) for i, r in enumerate(sorted(rows, key=key, reverse=True), start=1)]


def suggest_overrides(ranked: Sequence[Dict[str, Any]], keep: int) -> Dict[str, Dict[str, int]]:
    """``ptq.overrides`` entries for the ``keep`` most sensitive units not already at ``KEEP_BITS`` everywhere
    (a row of an activation quantizer names its unit under ``unit``)."""
    chosen = [r.get('unit', r['name']) for r in ranked
              if not (all(b >= KEEP_BITS for b in r['w_bits']) and all(b >= KEEP_BITS for b in r['a_bits']))]
    return {name: {'w_bits': KEEP_BITS, 'a_bits': KEEP_BITS} for name in dict.fromkeys(chosen[:keep])}


def overrides_cfg_options(overrides: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """The overrides as ``--cfg-options`` keys (``ptq.overrides.<module path>.w_bits=8``)."""
    return {f'ptq.overrides.{name}.{k}': v for name, bits in overrides.items() for k, v in bits.items()}


def cfg_options_give(ptq_cfg: Dict[str, Any], options: Dict[str, int], expected: Dict[str, Dict[str, int]]) -> bool:
    """Whether merging ``options`` into the ``ptq`` section yields ``expected`` among the validated overrides.

    mmengine turns the dots of a module path in a ``--cfg-options`` key into nested dicts; whether
    ``ptq.overrides`` accepts that form depends on the settings parser, so it is checked, not assumed.
    """
    from mmengine.config import Config
    trial = Config(dict(ptq=copy.deepcopy(dict(ptq_cfg))))
    trial.merge_from_dict(options)
    try:
        got = PTQSettings.from_cfg(trial.ptq).to_dict()['overrides']
    except (PTQConfigError, TypeError, ValueError):
        return False
    return all(got.get(name, {}).get(k) == v for name, bits in expected.items() for k, v in bits.items())


def write_mixed_precision_config(path: str, base_config: str, ptq_cfg: Dict[str, Any],
                                 load_from: Optional[str] = None) -> None:
    """A config that inherits ``base_config`` and sets the whole ``ptq`` section (with the suggested overrides).

    ``tools/ptq.py`` runs it as is; other keys set with --cfg-options (e.g. data roots) must be passed again.
    """
    text = (f'# Written by tools/sensitivity.py: {osp.basename(base_config)} with the ptq section of the '
            f'analysed run\n# and the suggested mixed-precision ptq.overrides.\n'
            f'_base_ = [{osp.abspath(base_config)!r}]\n'
            + (f'load_from = {load_from!r}\n' if load_from else '')
            + f'ptq = {pprint.pformat(ptq_cfg, sort_dicts=False)}\n')
    atomic_write(path, lambda f: f.write(text), binary=False)


def bits_with_overrides(units: Sequence[Unit], overrides: Dict[str, Dict[str, int]]) -> Dict[str, Optional[float]]:
    """Average weight bits (per weight) and activation bits (per quantizer) with ``overrides`` on whole units."""
    w, a = [], []
    for u in units:
        wc, ac = weight_bit_counts(u.module), act_bit_counts(u.module)
        if u.name in overrides:
            wc = {overrides[u.name]['w_bits']: sum(wc.values())} if wc else {}
            ac = {overrides[u.name]['a_bits']: sum(ac.values())} if ac else {}
        w.append(wc)
        a.append(ac)
    return {'avg_w_bits_weighted_by_num_weights': average_bits(merge_counts(w)),
            'avg_a_bits_weighted_by_num_act_quantizers': average_bits(merge_counts(a))}


def format_table(report: Dict[str, Any]) -> str:
    """The ranked units, the all-units error, the suggestion with its average bits."""
    metric = report.get('metric')
    head = f"{'rank':>4}  {report['part'][:36]:<36} {'bits':>8} {'weights':>9} {'rel feat err':>12}"
    if metric:
        head += f" {metric[:14]:>14} {'drop':>8}"
    lines = [f"sensitivity ({report['measure']}), {report['num_eval_images']} held-out images:", head]
    for r in report['units']:
        line = (f"{r['rank']:>4}  {r['name'][:36]:<36} {format_bits(r['w_bits'], r['a_bits']):>8} "
                f"{r['num_weights']:>9} {r['rel_error']:>12.4e}")
        if metric:
            line += f" {r['metric']:>14.4f} {r['metric_drop']:>8.4f}"
        lines.append(line)
    lines.append(f"every {report['part']} quantized: rel feat err {report['all_units']['rel_error']:.4e} (sum of "
                 f"the single-{report['part']} errors {sum(r['rel_error'] for r in report['units']):.4e})")
    if metric:
        fp, every = report['fp']['metric'], report['all_units']['metric']
        lines.append(f"{metric}: FP {fp:.4f}, every {report['part']} quantized {every:.4f} (drop {fp - every:.4f}, "
                     f"sum of the single-{report['part']} drops {sum(r['metric_drop'] for r in report['units']):.4f})")
    before, after = report['bits'], report['bits_with_suggestion']
    lines.append(f"keep the {len(report['suggested_overrides'])} most sensitive unit(s) at {KEEP_BITS} bits: "
                 f"average weight bits {_num(before['avg_w_bits_weighted_by_num_weights'])} -> "
                 f"{_num(after['avg_w_bits_weighted_by_num_weights'])} (per weight), activation bits "
                 f"{_num(before['avg_a_bits_weighted_by_num_act_quantizers'])} -> "
                 f"{_num(after['avg_a_bits_weighted_by_num_act_quantizers'])} (per quantizer)")
    lines.append(f"config: ptq = dict(overrides={report['config_overrides']!r})")
    if report.get('mixed_precision_config'):
        lines.append(f"ready to run: tools/ptq.py {report['mixed_precision_config']} (the analysed ptq section "
                     f"and checkpoint plus these overrides; pass other --cfg-options such as data roots again)")
    if report['cfg_options']:
        lines.append(f"tools/ptq.py ... --cfg-options {report['cfg_options']}")
    else:
        lines.append('(--cfg-options cannot set these overrides here: ptq.overrides does not take the nested form '
                     'that dotted module paths become; use the config or the file above)')
    return '\n'.join(lines)


def _num(v: Optional[float]) -> str:
    return '-' if v is None else f'{v:.3f}'


@LOOPS.register_module()
class SensitivityLoop(TestLoop):
    """Measure per-unit (or per-activation-quantizer) sensitivity instead of quantizing; see the module docstring."""

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, ptq: Optional[dict] = None,
                 eval_images: int = 4, keep_8bit: int = 2, metric: Optional[str] = None, parts: str = 'units',
                 quantized: Optional[str] = None) -> None:
        super().__init__(runner, dataloader, evaluator, fp16)
        self.ptq_cfg = dict(ptq if ptq is not None else runner.cfg.get('ptq', {}))
        self.settings = PTQSettings.from_cfg(self.ptq_cfg)
        if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images <= 0:
            raise PTQConfigError(f'--eval-images must be a positive integer, got {eval_images!r}')
        if isinstance(keep_8bit, bool) or not isinstance(keep_8bit, int) or keep_8bit < 0:
            raise PTQConfigError(f'--keep-8bit must be an integer >= 0, got {keep_8bit!r}')
        if parts not in PARTS:
            raise PTQConfigError(f'--parts must be one of {sorted(PARTS)}, got {parts!r}')
        if quantized is not None and not osp.isfile(quantized):
            raise PTQConfigError(f'--quantized file not found: {quantized}')
        self.eval_images, self.keep_8bit, self.metric, self.parts = eval_images, keep_8bit, metric, parts
        self.quantized = quantized
        self.load_quantized = None  # the FP checkpoint is loaded (and checked) first in either case
        runner.register_hook(_CheckpointFitHook(self))

    model = PTQLoop.model  # the runner's model without its wrapper

    def run(self) -> Dict[str, Any]:
        logger, work_dir = self.runner.logger, self.runner.work_dir
        t0 = time.perf_counter()
        for name in (SENSITIVITY_JSON, SENSITIVITY_FILE, MIXED_PRECISION_CONFIG):  # never an earlier run's result
            Path(work_dir, name).unlink(missing_ok=True)
        units, held_out, forward = self._quantize()
        settings = self.settings  # with --quantized: the saved model's own
        parts, owner = self._parts(units)
        part = PARTS[self.parts]
        outputs = 'extract_feat outputs' if forward is feature_forward else 'raw head outputs (model._forward)'

        def progress(i: int, n: int, name: str, err: float) -> None:
            logger.info(f'{part} {i}/{n} {name} alone quantized: relative error of the {outputs} {err:.4e}')
        sens = measure_sensitivity(self.model, parts, held_out, forward, progress)
        rows = [{'name': p.name, 'kind': p.kind, **unit_bits(p), 'rel_error': sens.unit_errors[p.name],
                 'num_weights': sum(weight_bit_counts(p.module).values()),
                 **({'unit': owner[p.name]} if p.name in owner else {})} for p in parts]
        source = f'loaded from {self.quantized}' if self.quantized else 'RTN'
        report: Dict[str, Any] = {
            'measure': f'relative feature error ||F_q - F||^2 / ||F||^2 over the {outputs}, '
                       f'only this {part} quantized ({source}{", weights FP" if owner else ""})',
            'part': part, 'quantized': source,
            'num_calibration_images': settings.num_images, 'num_eval_images': num_images(held_out),
            'all_units': {'rel_error': sens.all_units_error}, 'metric': None}
        if self.metric:
            self._measure_metric(parts, rows, report)
        ranked = rank_rows(rows)
        suggestion = suggest_overrides(ranked, self.keep_8bit)
        options = overrides_cfg_options(suggestion)
        report.update({
            'settings': settings.to_dict(), 'units': ranked, 'keep_8bit': self.keep_8bit,
            'bits': bits_with_overrides(units, {}), 'bits_with_suggestion': bits_with_overrides(units, suggestion),
            'suggested_overrides': suggestion,
            'config_overrides': {**settings.to_dict()['overrides'], **suggestion},
            'cfg_options': ' '.join(f'{k}={v}' for k, v in options.items())
            if suggestion and cfg_options_give(self.ptq_cfg, options, suggestion) else '',
            'seconds': round(time.perf_counter() - t0, 3)})
        self._write_outputs(report)
        logger.info('\n' + format_table(report))
        logger.info(f'wrote {osp.join(work_dir, SENSITIVITY_JSON)}' + ''.join(f', {n}' for n in report['plots'])
                    + (f', {MIXED_PRECISION_CONFIG}' if report['mixed_precision_config'] else ''))
        return report

    def _parts(self, units: Sequence[Unit]) -> Tuple[List[Unit], Dict[str, str]]:
        """What is measured one at a time: the units, or every activation quantizer in them (with its unit's name)."""
        if self.parts == 'units':
            return list(units), {}
        parts = [(Unit(f'{u.name}.{n}', q, 'act_quantizer'), u.name)
                 for u in units for n, q in u.module.named_modules() if isinstance(q, LSQActQuantizer)]
        return [p for p, _ in parts], {p.name: unit for p, unit in parts}

    def _quantize(self) -> Tuple[List[Unit], List[dict], Any]:
        """(the quantized model's units, the held-out batches, the forward that reaches every unit in scope (the
        model's own forward when heads are in it)): RTN (the block plan like PTQLoop, calibrated activation
        steps), or the model saved in ``quantized`` (e.g. reconstructed by QDrop)."""
        logger, model = self.runner.logger, self.model
        if self.quantized:  # its own settings pick the scope and the held-out images
            self.settings, plan = rebuild_quantized(model, self.quantized, self.settings)
        settings = self.settings
        paths = checked_scope(model, settings.scope)  # no method runs: PD-Quant's own check on heads does not apply
        seed_everything(settings.seed)
        wanted = dataclasses.replace(settings, num_images=settings.num_images + self.eval_images)
        try:
            batches = build_calibration_batches(self.runner.cfg, wanted)
        except PTQConfigError as err:
            raise PTQConfigError(f'{err} (the sensitivity analysis needs ptq.num_images={settings.num_images} '
                                 f'calibration images plus --eval-images {self.eval_images} held-out images: '
                                 f'lower either)') from None
        calib, held_out = split_batches(batches, settings.num_images)
        model.eval()
        forward = calibration_forward(model, paths, calib + held_out)
        if self.quantized:
            logger.info(f'sensitivity: {len(plan.units)} units of the quantized model {self.quantized}, '
                        f'measuring on {num_images(held_out)} held-out images')
            return plan.units, held_out, forward
        with config_errors():
            plan = plan_model(model, settings, lambda: forward(model, calib[0]))
        logger.info(f'sensitivity: {len(plan.units)} units, RTN W{settings.w_bits}A{settings.a_bits}; calibrating '
                    f'activations on {num_images(calib)} images, measuring on {num_images(held_out)} held-out images')
        calibrate_activations(model, calib, forward)
        return plan.units, held_out, forward

    def _write_outputs(self, report: Dict[str, Any]) -> None:
        """sensitivity.png, the mixed-precision config (when something is suggested), sensitivity.json."""
        work_dir, settings = self.runner.work_dir, self.settings
        title = (f"sensitivity, {report['quantized']} W{settings.w_bits}A{settings.a_bits}: only this "
                 f"{report['part']} quantized")
        plot = dict(key='metric_drop', xlabel=f"drop of {report['metric']} with only this {report['part']} quantized") \
            if report['metric'] else {}
        written = write_sensitivity_plot(report['units'], osp.join(work_dir, SENSITIVITY_FILE), title,
                                         warn=self.runner.logger.warning, **plot)
        report['plots'] = [SENSITIVITY_FILE] if written else []
        base = getattr(self.runner.cfg, 'filename', None)
        report['mixed_precision_config'] = None
        if report['suggested_overrides'] and base and osp.isfile(base):
            path = osp.abspath(osp.join(work_dir, MIXED_PRECISION_CONFIG))
            ptq = dict(ConfigDict(self.ptq_cfg).to_dict(), overrides=report['config_overrides'])
            write_mixed_precision_config(path, base, ptq, self.runner.cfg.get('load_from'))
            report['mixed_precision_config'] = path
        atomic_write_json(report, osp.join(work_dir, SENSITIVITY_JSON))

    def _measure_metric(self, units: Sequence[Unit], rows: List[Dict[str, Any]], report: Dict[str, Any]) -> None:
        """The evaluator's metric for FP, every part quantized and each part alone (parts + 2 evaluations)."""
        with quant_state(self.model, weight=False, act=False):  # only what is switched on below is quantized
            fp_metrics = TestLoop.run(self)
            key = choose_metric(fp_metrics, self.metric)
            report['metric'] = key
            report['fp'] = {'metric': float(fp_metrics[key]), 'metrics': plain_metrics(fp_metrics)}
            with all_quantized(units):
                all_metrics = TestLoop.run(self)
            report['all_units'].update(metric=float(all_metrics[key]), metrics=plain_metrics(all_metrics))
            for i, (unit, row) in enumerate(zip(units, rows)):
                with quant_state(unit.module, weight=True, act=True, drop_prob=1.0):
                    value = float(TestLoop.run(self)[key])
                row['metric'], row['metric_drop'] = value, report['fp']['metric'] - value
                self.runner.logger.info(f'[{key}] {report["part"]} {i + 1}/{len(units)} {unit.name} alone quantized: '
                                        f'{value:.4f} (FP {report["fp"]["metric"]:.4f})')

