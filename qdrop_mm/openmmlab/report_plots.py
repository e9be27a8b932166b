"""PNG plots for the work dir: reconstruction loss curves, per-unit relative output error, sensitivity.

matplotlib is imported only when a plot is drawn (object API with the Agg canvas, no pyplot state),
so a missing or broken matplotlib skips the plots with a warning instead of failing a finished run.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .atomic_io import atomic_write

RECON_CURVES_FILE = 'recon_curves.png'
UNIT_ERRORS_FILE = 'unit_errors.png'
SENSITIVITY_FILE = 'sensitivity.png'

WarnFn = Callable[[str], None]


def row_label(row: Dict[str, Any], num_stages: int) -> str:
    """The unit name, with the stage when a method has several, or 'QwT' for a compensation row."""
    if row['stage'] >= num_stages:
        return f"{row['name']} [QwT]"
    return f"{row['name']} [s{row['stage'] + 1}]" if num_stages > 1 else row['name']


def _labels(report: Dict[str, Any]) -> List[str]:
    num_stages = len(report.get('method', {}).get('stages', []))
    return [row_label(r, num_stages) for r in report['units']]


def curve_series(report: Dict[str, Any]) -> List[Tuple[str, List[float], List[float]]]:
    """(label, iterations, losses) for every row with a reconstruction curve: what recon_curves.png draws."""
    return [(label, [p[0] for p in r['curve']], [p[1] for p in r['curve']])
            for label, r in zip(_labels(report), report['units']) if r.get('curve')]


def error_bars(report: Dict[str, Any]) -> Tuple[List[str], List[float], List[float]]:
    """(labels, relative error before, after) for every row that has both: what unit_errors.png draws."""
    rows = [(label, r) for label, r in zip(_labels(report), report['units'])
            if r.get('rel_error_before') is not None and r.get('rel_error_after') is not None]
    return ([label for label, _ in rows], [float(r['rel_error_before']) for _, r in rows],
            [float(r['rel_error_after']) for _, r in rows])


def _axes(width: float, height: float):
    """The one Axes of a new figure on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig.add_subplot(1, 1, 1)


def _save(ax, path: str) -> None:
    atomic_write(path, lambda f: ax.figure.savefig(f, format='png', bbox_inches='tight'))


def _positive(values: Sequence[float]) -> List[float]:
    """Non-positive and non-finite values become NaN: a log axis cannot place them."""
    return [v if v > 0 and math.isfinite(v) else float('nan') for v in values]


def plot_recon_curves(series: Sequence[Tuple[str, Sequence[float], Sequence[float]]], path: str,
                      title: str) -> None:
    from matplotlib import colormaps
    ax, cmap = _axes(11, 6), colormaps['viridis']
    for i, (label, its, losses) in enumerate(series):
        ax.plot(its, _positive(losses), label=label, linewidth=1.0, color=cmap(i / max(len(series) - 1, 1)))
    ax.set_yscale('log')
    ax.set_xlabel('iteration')
    ax.set_ylabel('reconstruction loss (output MSE, training batch)')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.01, 1.0), ncol=max(1, math.ceil(len(series) / 40)))
    _save(ax, path)


def plot_bars(labels: Sequence[str], groups: Sequence[Tuple[str, Sequence[float]]], path: str, title: str,
              xlabel: str, log: bool = True) -> None:
    """Horizontal grouped bars, one row per label, top to bottom in the given order."""
    n = len(labels)
    ax = _axes(10, max(3.0, 0.18 * n * max(len(groups), 1) + 1.5))
    height = 0.8 / max(len(groups), 1)
    for g, (name, values) in enumerate(groups):
        ys = [i + (g - (len(groups) - 1) / 2) * height for i in range(n)]
        ax.barh(ys, _positive(values) if log else list(values), height=height, label=name)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    if log:
        ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis='x', which='both', alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8)
    _save(ax, path)


def write_report_plots(report: Dict[str, Any], work_dir: str, warn: Optional[WarnFn] = None) -> List[str]:
    """Write recon_curves.png and unit_errors.png into ``work_dir``; returns the file names written.

    Nothing to draw, no matplotlib, or a failed write: a warning, and the file is left out.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        warn(f'plots skipped: matplotlib is not importable ({err}); pip install matplotlib to get '
             f'{RECON_CURVES_FILE} and {UNIT_ERRORS_FILE}')
        return []
    written = []
    series = curve_series(report)
    labels, before, after = error_bars(report)
    s = report['settings']
    run = f"{s['method']} W{s['w_bits']}A{s['a_bits']}, {s['iters']} iters/unit"
    jobs = []
    if series:
        jobs.append((RECON_CURVES_FILE, lambda p: plot_recon_curves(
            series, p, f'reconstruction loss per unit ({run})')))
    if labels:
        jobs.append((UNIT_ERRORS_FILE, lambda p: plot_bars(
            labels, [('before', before), ('after', after)], p,
            f'relative output error per unit, ||y_q - y||² / ||y||² ({run})', 'relative output error (log)')))
    for name, draw in jobs:
        try:
            draw(os.path.join(work_dir, name))
            written.append(name)
        except Exception as err:  # noqa: BLE001  a plot must never lose a finished quantization run
            warn(f'plot {name} skipped: {type(err).__name__}: {err}')
    return written


def write_sensitivity_plot(rows: Sequence[Dict[str, Any]], path: str, title: str, key: str = 'rel_error',
                           xlabel: str = 'relative feature error with only this unit quantized (log)',
                           warn: Optional[WarnFn] = None) -> bool:
    """A bar per unit of ``row[key]``, in the given (ranked) order; False when skipped."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    try:
        plot_bars([r['name'] for r in rows], [(key, [float(r[key]) for r in rows])], path, title, xlabel,
                  log=key == 'rel_error')
        return True
    except ImportError as err:
        warn(f'plot {os.path.basename(path)} skipped: matplotlib is not importable ({err})')
    except Exception as err:  # noqa: BLE001  the JSON and the table are the result; the plot is extra
        warn(f'plot {os.path.basename(path)} skipped: {type(err).__name__}: {err}')
    return False
