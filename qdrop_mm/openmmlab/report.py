"""The PTQ report: settings, per-unit reconstruction results and final metrics."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from qdrop_mm.core import PTQResult, Unit
from qdrop_mm.core.quant_state import act_quantizers, weight_quantizers

from .atomic_io import atomic_write_json
from .settings import PTQSettings


def unit_bits(unit: Unit) -> Dict[str, List[int]]:
    return {'w_bits': sorted({q.bits for q in weight_quantizers(unit.module)}),
            'a_bits': sorted({q.bits for q in act_quantizers(unit.module)})}


def build_report(settings: PTQSettings, units: Sequence[Unit], result: Optional[PTQResult],
                 metrics: Dict[str, Any], timings: Dict[str, float], extra: Optional[Dict[str, Any]] = None
                 ) -> Dict[str, Any]:
    """A JSON-ready dict; ``metrics`` keeps the evaluator's own keys (e.g. coco/bbox_mAP, mIoU)."""
    by_name = {u.name: u for u in units}
    rows = []
    for rec in (result.records if result else []):
        r = rec.result
        rows.append({'name': rec.name, 'kind': rec.kind, 'stage': rec.stage, **unit_bits(by_name[rec.name]),
                     'iters': r.iters, 'loss_before': r.loss_before, 'loss_after': r.loss_after,
                     'rel_error_before': r.rel_error_before, 'rel_error_after': r.rel_error_after,
                     'stopped_early': r.stopped_early, 'seconds': round(r.seconds, 3), 'cache_mb': round(rec.cache_bytes / 2 ** 20, 3),
                     'curve': r.curve})
    report = {
        'settings': settings.to_dict(),
        'method': result.method if result else settings.build_method().to_dict(),
        'metrics': {k: _plain(v) for k, v in metrics.items()},
        'units': rows,
        'plan': [{'name': u.name, 'kind': u.kind, **unit_bits(u)} for u in units],
        'timings': {k: round(v, 3) for k, v in timings.items()},
    }
    if extra:
        report.update(extra)
    return report


def _plain(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v if isinstance(v, (str, int, list, dict)) or v is None else str(v)


def write_report(report: Dict[str, Any], path: str) -> None:
    atomic_write_json(report, path)


def format_summary(report: Dict[str, Any]) -> str:
    """A one-screen text summary of a report."""
    s = report['settings']
    lines = [f"qdrop_mm PTQ: method={s['method']} W{s['w_bits']}A{s['a_bits']} "
             f"(first layer {s['first_layer_bits'] or s['w_bits']}-bit), {s['num_images']} calibration images, "
             f"{s['iters']} iters/unit, {len(report['plan'])} units"]
    if report['units']:
        lines.append(f"{'unit':<36} {'kind':<6} {'st':>2} {'bits':>6} {'loss before':>12} {'loss after':>12} {'s':>7}")
        for u in report['units']:
            bits = f"w{'/'.join(map(str, u['w_bits']))}"
            lines.append(f"{u['name'][:36]:<36} {u['kind']:<6} {u['stage']:>2} {bits:>6} "
                         f"{u['loss_before']:>12.4g} {u['loss_after']:>12.4g} {u['seconds']:>7.1f}")
    lines.append('metrics: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                         for k, v in report['metrics'].items()))
    lines.append('timings: ' + ', '.join(f'{k}={v:.1f}s' for k, v in report['timings'].items()))
    return '\n'.join(lines)
