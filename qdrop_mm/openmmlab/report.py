"""The PTQ report: settings, per-unit reconstruction results and final metrics."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from mmengine.dist import get_world_size

from qdrop_mm.core import PTQResult, Unit
from qdrop_mm.core.bit_budget import act_bit_counts, average_bits, merge_counts, weight_bit_counts
from qdrop_mm.core.quant_state import act_quantizers, weight_quantizers

from .settings import PTQSettings


def unit_bits(unit: Unit) -> Dict[str, List[int]]:
    return {'w_bits': sorted({q.bits for q in weight_quantizers(unit.module)}),
            'a_bits': sorted({q.bits for q in act_quantizers(unit.module)})}


FP_BITS = 32


def bits_summary(units: Sequence[Unit], num_fp_weights: int = 0) -> Dict[str, Any]:
    """Average bits over the units: weights weighted by weight count, activations by quantizer count.

    ``num_fp_weights`` (weights in scope left FP) count as 32-bit in ``avg_w_bits_fp_as_32``;
    ``quantized_weight_share`` is the fraction of the weights in scope that are quantized.
    """
    w = merge_counts(weight_bit_counts(u.module) for u in units)
    a = merge_counts(act_bit_counts(u.module) for u in units)
    avg_w, avg_a = average_bits(w), average_bits(a)
    n_q = sum(w.values())
    with_fp = average_bits(merge_counts([w, {FP_BITS: num_fp_weights}] if num_fp_weights else [w]))
    return {'avg_w_bits_weighted_by_num_weights': round(avg_w, 4) if avg_w is not None else None,
            'avg_w_bits_fp_as_32': round(with_fp, 4) if with_fp is not None else None,
            'quantized_weight_share': round(n_q / (n_q + num_fp_weights), 4) if n_q + num_fp_weights else None,
            'num_fp_weights': num_fp_weights,
            'avg_a_bits_weighted_by_num_act_quantizers': round(avg_a, 4) if avg_a is not None else None,
            'num_weights_per_bits': {str(b): n for b, n in sorted(w.items())},
            'num_act_quantizers_per_bits': {str(b): n for b, n in sorted(a.items())}}


def build_report(settings: PTQSettings, units: Sequence[Unit], result: Optional[PTQResult],
                 metrics: Dict[str, Any], timings: Dict[str, float], extra: Optional[Dict[str, Any]] = None,
                 fp_layers: Sequence[Dict[str, Any]] = (), unfolded_norms: Sequence[Sequence[str]] = ()
                 ) -> Dict[str, Any]:
    """A JSON-ready dict; ``metrics`` keeps the evaluator's own keys (e.g. coco/bbox_mAP, mIoU).

    ``fp_layers`` (name, type, num_weights) are the weight layers in scope left FP; ``unfolded_norms``
    (layer path, norm type) the norms kept FP after their quantized layer.
    """
    by_name = {u.name: u for u in units}
    rows = []
    for rec in (result.records if result else []):
        r = rec.result
        rows.append({'name': rec.name, 'kind': rec.kind, 'stage': rec.stage, **unit_bits(by_name[rec.name]),
                     'iters': r.iters, 'loss_before': r.loss_before, 'loss_after': r.loss_after,
                     'rel_error_before': r.rel_error_before, 'rel_error_after': r.rel_error_after,
                     'stopped_early': r.stopped_early, **r.movement, 'seconds': round(r.seconds, 3),
                     'cache_mb': round(rec.cache_bytes / 2 ** 20, 3), 'curve': r.curve})
    method = result.method if result else settings.build_method().to_dict()
    report = {
        'settings': settings.to_dict(),
        'method': method,
        'schedule': schedule_summary(method),
        'metrics': plain_metrics(metrics),
        'units': rows,
        'plan': [{'name': u.name, 'kind': u.kind, **unit_bits(u),
                  'num_weights': sum(weight_bit_counts(u.module).values())} for u in units],
        'bits': bits_summary(units, sum(f['num_weights'] for f in fp_layers)),
        'fp_layers': [dict(f) for f in fp_layers],
        'unfolded_norms': [list(n) for n in unfolded_norms],
        'plots': [],
        'timings': {k: round(v, 3) for k, v in timings.items()},
    }
    if extra:
        report.update(extra)
    return report


def schedule_summary(method: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per stage: schedule name, the learning rates it resolved to, and the effective batch.

    Effective batch = batch × accum_steps × world size (every rank averages its gradients each step).
    """
    world = get_world_size()
    return [{'schedule': st['schedule'], 'iters': st['iters'], 'w_lr': st['effective_w_lr'],
             'a_lr': st['effective_a_lr'], 'batch_size': st['batch_size'], 'accum_steps': st['accum_steps'],
             'world_size': world, 'effective_batch': st['batch_size'] * st['accum_steps'] * world}
            for st in method['stages']]


def _plain(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v if isinstance(v, (str, int, list, dict)) or v is None else str(v)


def plain_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """An evaluator's metrics as JSON-ready values (numbers as floats)."""
    return {k: _plain(v) for k, v in metrics.items()}


SUMMARY_MAX_ROWS = 20


def format_bits(w_bits: Sequence[int], a_bits: Sequence[int]) -> str:
    """'w4a4', 'w4/8a4'; no 'a' part for a unit without activation quantizers (e.g. FPN output convs)."""
    w = 'w' + ('/'.join(map(str, w_bits)) if w_bits else '-')
    return w + ('a' + '/'.join(map(str, a_bits)) if a_bits else '')


def _rel_error_after(row: Dict[str, Any]) -> float:
    v = row.get('rel_error_after')
    return float(v) if v is not None else float('-inf')


def format_summary(report: Dict[str, Any], max_rows: int = SUMMARY_MAX_ROWS) -> str:
    """A one-screen text summary of a report: settings, average bits, per-unit rows, metrics, timings.

    With more than ``max_rows`` rows (units x stages), the ``max_rows`` with the largest relative
    error after reconstruction are listed, in network order, plus totals over all rows.
    """
    s = report['settings']
    lines = [f"qdrop_mm PTQ: method={s['method']} W{s['w_bits']}A{s['a_bits']} "
             f"(first layer {s['first_layer_bits'] or s['w_bits']}-bit), {s['num_images']} calibration images, "
             f"{s['iters']} iters/unit, {len(report['plan'])} units"]
    for i, st in enumerate(report.get('schedule') or []):
        lines.append(f"stage {i}: {st['schedule']} schedule, {st['iters']} it, w_lr {st['w_lr']:.3g}, "
                     f"a_lr {st['a_lr']:.3g}, effective batch {st['effective_batch']} "
                     f"({st['batch_size']} x {st['accum_steps']} accumulated x {st['world_size']} processes)")
    bits = report.get('bits') or {}
    if bits.get('avg_w_bits_weighted_by_num_weights') is not None:
        n_w = sum(bits['num_weights_per_bits'].values())
        n_a = sum(bits['num_act_quantizers_per_bits'].values())
        a_avg = bits['avg_a_bits_weighted_by_num_act_quantizers']
        overrides = ', '.join(f"{prefix} " + ''.join(f'{k[0]}{v}' for k, v in b.items() if v)
                              for prefix, b in (s.get('overrides') or {}).items())
        fp_part = '' if not bits.get('num_fp_weights') else (
            f"; {100 * bits['quantized_weight_share']:.1f}% of the weights in scope quantized, "
            f"{bits['avg_w_bits_fp_as_32']:.3f} counting the {bits['num_fp_weights']} FP weights as 32-bit")
        lines.append(f"average bits: weights {bits['avg_w_bits_weighted_by_num_weights']:.3f} (per quantized weight, "
                     f"{n_w} weights{fp_part}), activations {'-' if a_avg is None else f'{a_avg:.3f}'} "
                     f"(per quantizer, {n_a} quantizers)" + (f'; overrides: {overrides}' if overrides else ''))
    fp_layers = report.get('fp_layers') or []
    if fp_layers:
        lines.append(f"left FP (no rule quantizes them): {len(fp_layers)} layer(s), "
                     f"{sum(f['num_weights'] for f in fp_layers)} weights, e.g. "
                     + ', '.join(f"{f['name']} ({f['type']})" for f in fp_layers[:3]))
    rows = report['units']
    if rows:
        top = set(sorted(range(len(rows)), key=lambda i: _rel_error_after(rows[i]), reverse=True)[:max_rows])
        shown = [r for i, r in enumerate(rows) if i in top]
        lines.append(f"{'unit':<36} {'st':>2} {'bits':>8} {'loss before':>12} {'loss after':>12} "
                     f"{'rel err after':>13} {'s':>7}")
        for u in shown:
            rel = u.get('rel_error_after')
            lines.append(f"{u['name'][:36]:<36} {u['stage']:>2} {format_bits(u['w_bits'], u['a_bits']):>8} "
                         f"{u['loss_before']:>12.4g} {u['loss_after']:>12.4g} "
                         f"{'-' if rel is None else format(rel, '.3e'):>13} {u['seconds']:>7.1f}")
        if len(shown) < len(rows):
            lines.append(f'... {len(rows) - len(shown)} more rows not shown: listed are the {len(shown)} with the '
                         f'largest relative error after (all rows in ptq_report.json)')
        worst = max(rows, key=_rel_error_after)
        where = worst['name'] + ('' if len({u['stage'] for u in rows}) == 1 else f" (st {worst['stage']})")
        lines.append(f"all {len(rows)} rows: {sum(u['seconds'] for u in rows):.1f} s; largest relative error "
                     f"after: {where} "
                     f"{'-' if worst.get('rel_error_after') is None else format(worst['rel_error_after'], '.3e')}")
    if report.get('plots'):
        lines.append('plots (in the work dir): ' + ', '.join(report['plots']))
    fe = report.get('feature_error')
    if fe:
        lines.append(f"feature error vs FP: calibration {fe['calibration']:.4g}, held-out {fe['held_out']:.4g} "
                     f"({fe['held_out_images']} images)")
    lines.append('metrics: ' + ', '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                         for k, v in report['metrics'].items()))
    lines.append('timings: ' + ', '.join(f'{k}={v:.1f}s' for k, v in report['timings'].items()))
    return '\n'.join(lines)
