"""Peers side by side: the demo Faster R-CNN quantized by AIMET, Brevitas and MQBench.

Each *cell* is one (tool, method, bits, seed). A cell runs in its own process (the peer virtualenv's
python, see tools/setup_peers.sh) so that a crash or an out-of-memory kill costs one cell, and its peak
memory is its own:

1. build the detector from the config with the model's own mmengine Runner and load the FP checkpoint;
2. take the calibration images exactly as ``tools/ptq.py`` does for ``ptq.seed`` = seed
   (``build_calibration_batches`` after ``seed_everything``: same sampler, same images, same flips);
3. fold every BatchNorm into the conv before it (as qdrop_mm does) and hand backbone + neck to the peer
   as one plain ``nn.Module`` (image tensor in, tuple of FPN maps out);
4. quantize it with the peer's public API (:data:`METHODS`), the first conv's weights at 8 bits;
5. put the quantized module back into the detector (heads stay FP) and run the config's test loop and
   evaluator (the val split our own runs use).

When the peer fails on backbone + neck, the backbone alone is tried (the neck stays FP) and the result
says so (``scope``); every failure is recorded as one line (``error``), never hidden.

Nothing here imports a peer at module level: the table and JSON logic runs without them installed.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import os.path as osp
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, astuple, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from qdrop_mm.benchmarks.accuracy import Cell

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_CONFIG = 'configs/demo/faster_rcnn_r18_fpn_shapes.py'
DEFAULT_CHECKPOINT = 'work_dirs/demo/faster_rcnn_r18_fpn_shapes/fp_model.pth'
DEFAULT_OUT = 'work_dirs/bench_peers/results.json'
METRIC = 'coco/bbox_mAP'
FIRST_CONV = 'backbone.conv1'  # the stem conv of mmdet's ResNet (3 input channels)
SCOPES = ('backbone+neck', 'backbone')

# (tool, method) -> the peer API it runs, in the peer's own words
METHODS: Dict[Tuple[str, str], str] = {
    ('aimet', 'adaround'): 'aimet_torch.adaround.Adaround.apply_adaround + QuantizationSimModel',
    ('aimet', 'seq_mse'): 'aimet_torch.seq_mse.apply_seq_mse + QuantizationSimModel',
    ('brevitas', 'gptq'): 'brevitas_examples ptq_common.quantize_model(layerwise) + brevitas.graph.gptq',
    ('brevitas', 'learned_round'): 'brevitas_examples ptq_common.quantize_model(layerwise) + '
                                   'learned_round_utils.apply_learned_round',
    ('mqbench', 'qdrop'): 'mqbench.prepare_by_platform(Academic) + advanced_ptq.ptq_reconstruction',
    ('mqbench', 'brecq'): 'mqbench.prepare_by_platform(Academic) + advanced_ptq.ptq_reconstruction',
}


class PeerBenchError(ValueError):
    """A bad argument of the benchmark itself (shown as one ``error:`` line)."""


@dataclass(frozen=True)
class CellSpec:
    """One benchmark cell: a peer method at some bits and seed, with the shared budget."""

    tool: str
    method: str
    w_bits: int
    a_bits: int
    seed: int = 0
    iters: int = 300
    num_images: int = 32
    batch_size: int = 2
    first_layer_bits: int = 8

    def key(self) -> Tuple:
        return astuple(self)

    def result(self, **fields: Any) -> Dict[str, Any]:
        """The cell's record in the results file (no metric, no error yet), then ``fields``."""
        return {'tool': self.tool, 'method': self.method, 'w_bits': self.w_bits, 'a_bits': self.a_bits,
                'seed': self.seed, 'iters': self.iters, 'num_images': self.num_images, 'spec_key': list(self.key()),
                'metrics': {}, 'error': None, 'notes': [], 'scope': None, **fields}

    @property
    def name(self) -> str:
        return f'{self.tool}_{self.method}_w{self.w_bits}a{self.a_bits}_seed{self.seed}'


def parse_bits(text: str) -> Tuple[int, int]:
    """'4/4' -> (4, 4); weights and activations from 2 to 8 bits."""
    try:
        w, a = (int(p) for p in text.split('/'))
    except ValueError:
        raise PeerBenchError(f'--bits takes W/A pairs such as 4/4, got {text!r}') from None
    if not (2 <= w <= 8 and 2 <= a <= 8):
        raise PeerBenchError(f'--bits {text}: weight and activation bits must be from 2 to 8')
    return w, a


def parse_cells(items: Sequence[str]) -> List[Tuple[str, str]]:
    """'aimet:adaround' / 'aimet' (all its methods) -> (tool, method) pairs, in :data:`METHODS` order."""
    out: List[Tuple[str, str]] = []
    for item in items:
        tool, _, method = item.partition(':')
        found = [tm for tm in METHODS if tm[0] == tool and (not method or tm[1] == method)]
        if not found:
            raise PeerBenchError(f'unknown peer method {item!r}; known: '
                                 f'{", ".join(f"{t}:{m}" for t, m in METHODS)}')
        out += [tm for tm in found if tm not in out]
    return out


def translate(spec: CellSpec) -> Dict[str, Any]:
    """The settings the peer receives for ``spec``: our budget and bits in the peer's own vocabulary.

    Raises :class:`PeerBenchError` for an unknown (tool, method). ``num_batches`` is the number of
    calibration batches (all ``num_images`` images, ``batch_size`` per batch).
    """
    if (spec.tool, spec.method) not in METHODS:
        raise PeerBenchError(f'unknown peer method {spec.tool}:{spec.method}')
    num_batches = -(-spec.num_images // spec.batch_size)
    w, a, first = spec.w_bits, spec.a_bits, spec.first_layer_bits
    own = {  # each aimet and brevitas method's own settings, after its tool's
        'adaround': dict(default_num_iterations=spec.iters, default_reg_param=0.01, default_beta_range=(20, 2),
                         default_warm_start=0.2, samples_per_iteration=spec.batch_size),
        'seq_mse': dict(num_candidates=20),
        'learned_round': dict(learned_round='hard_sigmoid', learned_round_mode='layerwise',
                              learned_round_iters=spec.iters, learned_round_lr=1e-3,
                              learned_round_batch_size=spec.batch_size),
        'gptq': dict(gptq_act_order=False, gpxq_use_quant_activations=True)}
    if spec.tool == 'aimet':
        return {'quant_scheme': 'post_training_tf_enhanced',  # AIMET's SQNR range search for activations
                'default_param_bw': w, 'default_output_bw': a, 'param_bw_override': {FIRST_CONV: first},
                'config_file': aimet_config(), 'num_batches': num_batches, **own[spec.method]}
    if spec.tool == 'brevitas':
        return {'quantize_model': dict(
            backend='layerwise', weight_bit_width=w, act_bit_width=a, bias_bit_width=None,
            weight_quant_granularity='per_channel', act_quant_percentile=99.999, act_quant_type='asym',
            scale_factor_type='float_scale', quant_format='int', layerwise_first_last_bit_width=first,
            weight_quant_type='asym', weight_param_method='mse', act_param_method='mse'),
            'num_batches': num_batches, **own[spec.method]}
    # mqbench, Academic backend: first and last layers 8-bit by its own rule; we keep only the first at 8
    return {
        'extra_qconfig_dict': {
            'w_observer': 'MSEObserver', 'a_observer': 'EMAMSEObserver',
            'w_fakequantize': 'AdaRoundFakeQuantize', 'a_fakequantize': 'QDropFakeQuantize',
            'w_qscheme': {'bit': w, 'symmetry': False, 'per_channel': True, 'pot_scale': False},
            'a_qscheme': {'bit': a, 'symmetry': False, 'per_channel': False, 'pot_scale': False}},
        'first_layer_w_bit': first,
        'reconstruction': {'pattern': 'block', 'scale_lr': 4e-5, 'warm_up': 0.2, 'weight': 0.01,
                           'max_count': spec.iters, 'b_range': [20, 2], 'keep_gpu': False,
                           'round_mode': 'learned_hard_sigmoid',
                           'prob': 0.5 if spec.method == 'qdrop' else 1.0},
        'num_batches': num_batches}


def aimet_config() -> Dict[str, Any]:
    """AIMET quantsim config: per-channel asymmetric weights, asymmetric activations, the input not quantized.

    AIMET's own default_config_per_channel.json with two changes to match qdrop_mm's scheme: weights
    asymmetric (``is_symmetric`` False) and the network input not quantized. Supergroups (Conv+Relu,
    Add+Relu) keep AIMET's placement of output quantizers.
    """
    return {
        'defaults': {'ops': {'is_output_quantized': 'True'},
                     'params': {'is_quantized': 'True', 'is_symmetric': 'False'},
                     'strict_symmetric': 'False', 'unsigned_symmetric': 'False',
                     'per_channel_quantization': 'True'},
        'params': {'bias': {'is_quantized': 'False'}},
        'op_type': {},
        'supergroups': [{'op_list': ['Conv', 'Relu']}, {'op_list': ['Add', 'Relu']}],
        'model_input': {},  # no input quantizer ('False' is rejected: it can only be set to True)
        'model_output': {}}


# --------------------------------------------------------------------------------------------------
# results: table and JSON


@dataclass
class Summary:
    """The runs of one (tool, method, bits) row: metric mean and sample std over seeds, errors."""

    tool: str
    method: str
    w_bits: int
    a_bits: int
    values: List[float]
    seeds: List[int]
    seconds: Optional[float]
    peak_mib: Optional[float]
    scopes: List[str]
    errors: List[str]

    def __post_init__(self) -> None:
        self.cell = Cell(self.values) if self.values else None
        self.mean, self.std = (self.cell.mean, self.cell.std) if self.cell else (None, None)

    def text(self, digits: int = 3) -> str:
        """'0.413±0.002 (3)', '0.413 (1)', or 'failed' when no run gave a metric."""
        return f'{self.cell.text(digits)} ({len(self.values)})' if self.cell else 'failed'


def summarize(runs: Iterable[Dict[str, Any]], metric: str = METRIC) -> List[Summary]:
    """Group runs by (tool, method, w_bits, a_bits), in first-seen order; the last run of each seed counts.

    A run with ``error`` set contributes its error, not a value; seconds (mean) and peak memory (largest)
    are over the runs that finished.
    """
    groups: Dict[Tuple, Dict[int, Dict[str, Any]]] = {}
    for run in runs:
        key = (run['tool'], run['method'], run['w_bits'], run['a_bits'])
        groups.setdefault(key, {})[run.get('seed', 0)] = run
    out = []
    for (tool, method, w, a), by_seed in groups.items():
        ok = {s: r for s, r in sorted(by_seed.items()) if not r.get('error') and metric in r.get('metrics', {})}
        errors = list(dict.fromkeys(r['error'] for r in by_seed.values() if r.get('error')))
        secs = [r['seconds'] for r in ok.values() if r.get('seconds') is not None]
        mem = [r['peak_mib'] for r in ok.values() if r.get('peak_mib') is not None]
        scopes = list(dict.fromkeys(r.get('scope', '') for r in ok.values() if r.get('scope')))
        out.append(Summary(tool, method, w, a, [float(r['metrics'][metric]) for r in ok.values()], list(ok),
                           statistics.fmean(secs) if secs else None, max(mem) if mem else None, scopes, errors))
    return out


def markdown_table(summaries: Sequence[Summary], digits: int = 3) -> str:
    """tool | method | one column per bit width (mean±std (n)) | seconds per run | peak memory | scope."""
    bits = sorted({(s.w_bits, s.a_bits) for s in summaries}, reverse=True)
    rows = list(dict.fromkeys((s.tool, s.method) for s in summaries))
    head = ['tool', 'method'] + [f'W{w}A{a} {METRIC.split("/")[-1]}' for w, a in bits] + \
        ['seconds per run', 'peak memory (MiB)', 'quantized']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for tool, method in rows:
        cells = {(s.w_bits, s.a_bits): s for s in summaries if (s.tool, s.method) == (tool, method)}
        mine = list(cells.values())
        secs = [s.seconds for s in mine if s.seconds is not None]
        mem = [s.peak_mib for s in mine if s.peak_mib is not None]
        scopes = list(dict.fromkeys(sc for s in mine for sc in s.scopes))
        lines.append('| ' + ' | '.join(
            [tool, method] + [cells[wa].text(digits) if wa in cells else '-' for wa in bits]
            + [f'{statistics.fmean(secs):.0f}' if secs else '-', f'{max(mem):.0f}' if mem else '-',
               ', '.join(scopes) or '-']) + ' |')
    return '\n'.join(lines)


def failures(summaries: Sequence[Summary]) -> List[str]:
    """One line per distinct recorded error: 'tool method WxAy: error'."""
    return [f'{s.tool} {s.method} W{s.w_bits}A{s.a_bits}: {e}' for s in summaries for e in s.errors]


def text_report(results: Dict[str, Any]) -> str:
    """The markdown table plus the recorded failures and notes of the results file."""
    summaries = summarize(results.get('runs', []))
    lines = [markdown_table(summaries)] if summaries else ['(no runs)']
    notes = list(dict.fromkeys(n for r in results.get('runs', []) for n in r.get('notes', [])))
    for title, items in (('recorded failures:', failures(summaries)), ('notes:', notes)):
        if items:
            lines += ['', title] + [f'- {x}' for x in items]
    return '\n'.join(lines)


def load_results(path: str) -> Dict[str, Any]:
    if not osp.isfile(path):
        return {'runs': [], 'commands': []}
    with open(path) as f:
        return json.load(f)


def save_results(results: Dict[str, Any], path: str) -> None:
    from qdrop_mm.openmmlab.atomic_io import atomic_write_json
    atomic_write_json(results, path, indent=1)


def record_run(results: Dict[str, Any], run: Dict[str, Any]) -> None:
    """Replace the run of the same cell, or append."""
    runs = [r for r in results.get('runs', []) if tuple(r.get('spec_key', ())) != tuple(run['spec_key'])]
    results['runs'] = runs + [run]


def one_line(err: BaseException) -> str:
    """'ExcType: first line of the message (at file.py:123 in func)' for a recorded failure."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f' (at {osp.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})' if frames else ''
    text = (str(err).strip().splitlines() or [''])[0][:400]
    return f'{type(err).__name__}: {text}{where}'


# --------------------------------------------------------------------------------------------------
# running one cell (inside the peer venv)


def import_torchvision_without_ops() -> Optional[str]:
    """Import torchvision even where its C ops cannot load; returns the original error or None.

    PyPI's torchvision wheels are CUDA builds: with a CPU torch, ``import torchvision`` fails with
    ``RuntimeError: operator torchvision::nms does not exist`` (its fake-kernel registrations need the
    ops its ``_C`` library would have defined). aimet_torch imports torchvision at top level (datasets and
    transforms for its examples, custom modules for RoIAlign/NMS). This benchmark never calls a
    torchvision op (mmdet uses mmcv's), so the registrations are skipped and the error returned for the
    results' notes.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass  # not installed: nothing to do
    except RuntimeError as err:
        import types
        for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
            del sys.modules[name]
        sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
        import torchvision  # noqa: F401,F811
        return one_line(err)
    return None


def fold_batchnorms(net: 'torch.nn.Module', example: 'torch.Tensor') -> int:
    """Fold every BatchNorm whose input is a conv's output into that conv (running statistics); returns the count.

    The pairs are found by running ``example`` through ``net`` with hooks, so it works for any module
    structure (mmdet's ResNet stem, blocks and downsample shortcuts). Each folded BN becomes ``nn.Identity``.
    """
    import torch
    from torch import nn
    from qdrop_mm.core.bn_fold import fold_bn
    produced: Dict[int, Tuple[nn.Module, Any]] = {}  # id(output) -> (conv, output: kept alive, so its id stays unique)
    pairs: Dict[nn.Module, nn.Module] = {}  # BN -> the conv whose output it normalizes (its first call's)

    def conv_hook(m, inp, out):
        produced[id(out)] = m, out

    def bn_hook(m, inp, out):
        if id(inp[0]) in produced:
            pairs.setdefault(m, produced[id(inp[0])][0])

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else bn_hook) for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    parents = {id(child): (parent, name) for parent in net.modules() for name, child in parent.named_children()}
    for bn, conv in pairs.items():
        w, b = fold_bn(conv.weight, conv.bias, bn)
        conv.weight.data.copy_(w)
        conv.bias = nn.Parameter(b)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
    return len(pairs)


def _feature_net(backbone, neck):
    from torch import nn

    class FeatureNet(nn.Module):
        """Backbone (+ neck): image tensor in, tuple of feature maps out (mmdet's extract_feat)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            if neck is not None:
                self.neck = neck

        def forward(self, x):
            feats = self.backbone(x)
            return tuple(self.neck(feats) if hasattr(self, 'neck') else feats)

    return FeatureNet()


class _AttrDict(dict):
    __getattr__ = dict.__getitem__


def quantize_aimet(net, calib, spec: CellSpec, settings: Dict[str, Any], work: str, notes: List[str]):
    """AIMET: AdaRound (weights) or Seq-MSE (weight encodings), then a QuantizationSimModel with activations."""
    import torch
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel
    # AIMET's documented first step: torch.fx rewrite so that functional ops (add, interpolate) and
    # modules called twice (ResNet's relu) get quantizers of their own
    try:
        net = prepare_model(net)
    except Exception as err:  # noqa: BLE001
        notes.append(f'aimet prepare_model failed, unprepared model used (no quantizers on functional ops; '
                     f'AIMET disables the quantizers of modules called twice): {one_line(err)}')
    cfg_path = osp.join(work, 'aimet_config.json')
    with open(cfg_path, 'w') as f:
        json.dump(settings['config_file'], f)
    dummy = calib[0][:1]
    loader = list(calib)[:settings['num_batches']]
    scheme = getattr(QuantScheme, settings['quant_scheme'])

    def forward_fn(model, x):
        return model(x)

    def calibrate(model, _):
        with torch.no_grad():
            for x in loader:
                model(x)

    def quantsim(model):
        sim = QuantizationSimModel(model, dummy, quant_scheme=scheme, default_output_bw=settings['default_output_bw'],
                                   default_param_bw=settings['default_param_bw'], config_file=cfg_path)
        for name, bw in settings['param_bw_override'].items():
            sim.model.get_submodule(name).param_quantizers['weight'].bitwidth = bw
        return sim

    if spec.method == 'adaround':
        from aimet_torch._base.adaround import adaround_optimizer
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
        # AIMET draws BATCH_SIZE = 32 cached samples per iteration (a module constant, no parameter); at
        # 32 calibration images that is 16x the images per iteration of every other row: set it to ours
        if adaround_optimizer.BATCH_SIZE != settings['samples_per_iteration']:
            notes.append(f'aimet AdaRound: samples per iteration set from its constant BATCH_SIZE = '
                         f'{adaround_optimizer.BATCH_SIZE} to {settings["samples_per_iteration"]} (ptq.batch_size of '
                         f'our runs), so that {spec.iters} iterations see as many images as ours')
            adaround_optimizer.BATCH_SIZE = settings['samples_per_iteration']
        params = AdaroundParameters(data_loader=loader, forward_fn=forward_fn, **{k: settings[k] for k in (
            'num_batches', 'default_num_iterations', 'default_reg_param', 'default_beta_range', 'default_warm_start')})
        overrides = [(net.get_submodule(n), bw) for n, bw in settings['param_bw_override'].items()]
        net = Adaround.apply_adaround(net, dummy, params, path=work, filename_prefix='adaround',
                                      default_param_bw=settings['default_param_bw'], param_bw_override_list=overrides,
                                      default_quant_scheme=scheme, default_config_file=cfg_path)
        sim = quantsim(net)
        sim.set_and_freeze_param_encodings(osp.join(work, 'adaround.encodings'))
    else:
        from aimet_torch.seq_mse import apply_seq_mse
        sim = quantsim(net)
        apply_seq_mse(sim, loader, num_candidates=settings['num_candidates'], forward_fn=forward_fn)
    sim.compute_encodings(calibrate, None)
    return sim.model


def quantize_brevitas(net, calib, spec: CellSpec, settings: Dict[str, Any], work: str, notes: List[str]):
    """Brevitas: layerwise quantization (Conv layers with input quantizers), calibration, then GPTQ or learned round."""
    import torch
    from brevitas_examples.imagenet_classification.ptq.ptq_common import calibrate, quantize_model
    loader = [(x, None) for x in calib[:settings['num_batches']]]  # brevitas_examples loaders yield (images, target)
    qnet = quantize_model(net, **settings['quantize_model'])
    calibrate(loader, qnet)
    with torch.no_grad():  # MSE weight scales are computed on the first forward after calibration
        qnet(calib[0])
    if spec.method == 'gptq':
        from brevitas_examples.imagenet_classification.ptq.ptq_common import apply_gptq
        apply_gptq(loader, qnet, act_order=settings['gptq_act_order'],
                   use_quant_activations=settings['gpxq_use_quant_activations'])
    else:
        from brevitas_examples.imagenet_classification.ptq.learned_round_utils import apply_learned_round
        from brevitas_examples.imagenet_classification.ptq.ptq_imagenet_args import create_args_parser
        args = create_args_parser().parse_args([])
        for key in [k for k in settings if k.startswith('learned_round')]:
            setattr(args, key, settings[key])
        apply_learned_round(qnet, loader, args)
    qnet.eval()
    return qnet


def quantize_mqbench(net, calib, spec: CellSpec, settings: Dict[str, Any], work: str, notes: List[str]):
    """MQBench: prepare_by_platform(Academic) (torch.fx), observers, then ptq_reconstruction (QDrop/BRECQ)."""
    import torch
    from mqbench.advanced_ptq import ptq_reconstruction
    from mqbench.prepare_by_platform import BackendType, prepare_by_platform
    from mqbench.utils.state import enable_calibration, enable_quantization
    data = calib[:settings['num_batches']]
    qnet = prepare_by_platform(net, BackendType.Academic, {'extra_qconfig_dict': settings['extra_qconfig_dict']})
    restored = _mqbench_last_layers_to_default(qnet, settings)
    if restored:
        notes.append(f'mqbench Academic backend puts the first and the last layers at 8 bits; the last layers '
                     f'({len(restored)}: the FPN output convs) were set back to W{spec.w_bits} to match the other rows')
    qnet.eval()
    enable_calibration(qnet)
    with torch.no_grad():
        for x in data:
            qnet(x)
    enable_quantization(qnet)
    if any(n.endswith('x_post_act_fake_quantizer') for n, _ in qnet.named_modules()):
        notes.append('mqbench Academic backend quantizes the network input at 8 bits (qdrop_mm, AIMET and '
                     'Brevitas-layerwise settings here: not quantized / 8-bit first-layer input)')
    qnet = ptq_reconstruction(qnet, data, _AttrDict(settings['reconstruction']))
    enable_quantization(qnet)
    return qnet


def _mqbench_last_layers_to_default(qnet, settings: Dict[str, Any]) -> List[str]:
    """Set every weight fake-quantizer at 8 bits except the first conv's back to the configured weight bits."""
    w = settings['extra_qconfig_dict']['w_qscheme']
    bits = w['bit']
    qmin, qmax = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if w['symmetry'] else (0, 2 ** bits - 1)
    first = FIRST_CONV.replace('.', '_')
    changed = []
    for name, mod in qnet.named_modules():
        fq = getattr(mod, 'weight_fake_quant', None)
        if fq is None or name in (FIRST_CONV, first) or getattr(fq, 'bitwidth', None) == bits:
            continue
        fq.bitwidth = bits
        for q in (fq, getattr(fq, 'activation_post_process', None)):  # the fake quantizer and its observer
            if q is not None:
                q.quant_min, q.quant_max = qmin, qmax
        changed.append(name)
    return changed


QUANTIZERS: Dict[str, Callable] = {'aimet': quantize_aimet, 'brevitas': quantize_brevitas, 'mqbench': quantize_mqbench}


def run_cell(spec: CellSpec, config: str, checkpoint: str, work: str, threads: int = 1) -> Dict[str, Any]:
    """Quantize backbone + neck with the peer and evaluate the detector; never raises for a peer failure."""
    t0 = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    result = spec.result(attempts=[])
    stage = 'setup'
    try:
        import torch
        torch.set_num_threads(threads)
        settings = translate(spec)
        result['settings'] = json.loads(json.dumps(settings, default=str))
        result['api'] = METHODS[(spec.tool, spec.method)]
        tv_error = import_torchvision_without_ops()
        if tv_error:
            result['notes'].append(f'import torchvision (aimet_torch and mmengine import it) fails with CPU torch: '
                                   f'{tv_error}; imported without its op registrations (no torchvision op is called)')
        stage = 'import'
        peer = importlib.import_module({'aimet': 'aimet_torch'}.get(spec.tool, spec.tool))  # the others: their own name
        result['version'] = str(getattr(peer, '__version__', '?'))
        stage = 'model'
        runner, model = _build_runner(config, checkpoint, work)
        stage = 'calibration data'
        calib = _calibration_tensors(runner.cfg, model, spec)
        model.eval()
        stage = 'quantize'
        tq = time.perf_counter()
        qfeat = None
        for scope in SCOPES:  # each attempt starts from a fresh copy of the FP modules
            net = _feature_net(copy.deepcopy(model.backbone),
                               copy.deepcopy(model.neck) if scope == 'backbone+neck' else None)
            folded = fold_batchnorms(net, calib[0][:1])
            try:
                qfeat = QUANTIZERS[spec.tool](net, calib, spec, settings, work, result['notes'])
                result.update(scope=scope, bn_folded=folded)
                break
            except Exception as err:  # noqa: BLE001  recorded, then the smaller scope is tried
                result['attempts'].append({'scope': scope, 'error': one_line(err)})
                if os.environ.get('QDROP_MM_TRACEBACK'):
                    traceback.print_exc()
        if qfeat is None:
            raise RuntimeError('; '.join(f"{a['scope']}: {a['error']}" for a in result['attempts']))
        result['quant_seconds'] = time.perf_counter() - tq
        stage = 'evaluate'
        # the quantized module into the detector: extract_feat runs it (and the FP neck for scope 'backbone'),
        # a tuple out, whatever sequence the peer's module returns
        model.backbone = _feature_net(qfeat, None)
        if result['scope'] == 'backbone+neck':
            model.neck = None
        metrics = runner.test()
        result['metrics'] = {k: float(v) for k, v in metrics.items()}
    except Exception as err:  # noqa: BLE001  one recorded line per failed cell
        if os.environ.get('QDROP_MM_TRACEBACK'):
            traceback.print_exc()
        result['error'] = err.args[0] if stage == 'quantize' and isinstance(err, RuntimeError) and result['attempts'] \
            else f'{stage}: {one_line(err)}'
    result['notes'] = list(dict.fromkeys(result['notes']))
    result['seconds'] = time.perf_counter() - t0
    result['peak_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux ru_maxrss is in KiB
    return result


def _build_runner(config: str, checkpoint: str, work: str):
    """The config's Runner with its test loop and evaluator, the FP checkpoint loaded into its model."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from qdrop_mm.openmmlab import install_safe_mmengine_loading
    install_safe_mmengine_loading()
    cfg = Config.fromfile(config)
    cfg.work_dir = work
    cfg.load_from = None
    cfg.test_dataloader.num_workers = 0
    cfg.test_dataloader.persistent_workers = False
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(checkpoint, map_location='cpu')
    return runner, runner.model


def _calibration_tensors(cfg, model, spec: CellSpec) -> List['torch.Tensor']:
    """The calibration images qdrop_mm's PTQLoop takes for ``ptq.seed`` = spec.seed, preprocessed, per batch."""
    import torch
    from qdrop_mm.openmmlab.calibration import build_calibration_batches
    from qdrop_mm.openmmlab.resume import seed_everything
    from qdrop_mm.openmmlab.settings import PTQSettings
    settings = PTQSettings.from_cfg(dict(num_images=spec.num_images, batch_size=spec.batch_size, seed=spec.seed,
                                         calib_num_workers=0))
    seed_everything(spec.seed)
    batches = build_calibration_batches(cfg, settings)
    with torch.no_grad():
        return [model.data_preprocessor(b, False)['inputs'] for b in batches]


# --------------------------------------------------------------------------------------------------
# command line (tools/bench_peers.py)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--cells', nargs='+', default=[f'{t}:{m}' for t, m in METHODS],
                   help='tool:method (or tool for all its methods); default: all')
    p.add_argument('--bits', nargs='+', default=['4/4', '2/4'], help='W/A pairs (default: 4/4 2/4)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='calibration seeds (ptq.seed), default: 0')
    p.add_argument('--iters', type=int, default=300, help='iterations per layer/block where the API takes it')
    p.add_argument('--num-images', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--config', default=DEFAULT_CONFIG)
    p.add_argument('--checkpoint', default=DEFAULT_CHECKPOINT)
    p.add_argument('--out', default=DEFAULT_OUT, help='results JSON (runs already in it are reused)')
    p.add_argument('--python', default=osp.join(REPO, '.venv-peers', 'bin', 'python'),
                   help='interpreter of the peer venv (tools/setup_peers.sh)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--timeout', type=int, default=3600, help='seconds per cell before it is stopped and recorded')
    p.add_argument('--rerun-failed', action='store_true', help='run again the cells recorded with an error')
    p.add_argument('--table', action='store_true', help='only print the table of --out')
    p.add_argument('--merge', nargs='+', help='merge the runs of these results files into --out (later files win)')
    p.add_argument('--run-cell', help=argparse.SUPPRESS)  # internal: JSON CellSpec, run in this process
    p.add_argument('--result-file', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cell_specs(args: argparse.Namespace) -> List[CellSpec]:
    """Every cell of the command: for each seed, each bit width, each (tool, method)."""
    pairs = parse_cells(args.cells)
    bits = [parse_bits(b) for b in args.bits]
    for name in ('iters', 'num_images', 'batch_size'):
        if getattr(args, name) < 1:
            raise PeerBenchError(f'--{name.replace("_", "-")} must be a positive integer')
    return [CellSpec(t, m, w, a, seed, args.iters, args.num_images, args.batch_size)
            for seed in args.seeds for w, a in bits for t, m in pairs]


def spawn_cell(spec: CellSpec, args: argparse.Namespace, work: str) -> Dict[str, Any]:
    """Run one cell in a child process of the peer venv; a crash or timeout is recorded as the cell's error."""
    os.makedirs(work, exist_ok=True)
    result_file = osp.join(work, 'result.json')
    if osp.exists(result_file):
        os.unlink(result_file)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [args.python, osp.join(REPO, 'tools', 'bench_peers.py'), '--run-cell', json.dumps(asdict(spec)),
           '--result-file', result_file, '--config', args.config, '--checkpoint', args.checkpoint,
           '--threads', str(args.threads)]
    t0 = time.perf_counter()
    log = osp.join(work, 'cell.log')
    with open(log, 'w') as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=args.timeout)
            code: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    if osp.exists(result_file):
        return load_results(result_file)
    with open(log, errors='replace') as f:
        tail = [line.strip() for line in f.read().splitlines() if line.strip()][-1:] or ['']
    error = f'timed out after {args.timeout} s' if code is None else \
        f'the cell process exited with status {code} without a result; last line: {tail[0][:300]}'
    return spec.result(error=error, seconds=time.perf_counter() - t0, peak_mib=None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the requested cells (each in the peer venv), write the JSON, print the table."""
    args = parse_args(argv)
    if args.run_cell:
        spec = CellSpec(**json.loads(args.run_cell))
        save_results(run_cell(spec, args.config, args.checkpoint, osp.dirname(args.result_file), args.threads),
                     args.result_file)
        return 0
    results = load_results(args.out)
    if args.merge:
        for path in args.merge:
            other = load_results(path)
            for run in other.get('runs', []):
                record_run(results, run)
            results['commands'] = list(dict.fromkeys(results.get('commands', []) + other.get('commands', [])))
            results['machine'] = other.get('machine', results.get('machine'))
        save_results(results, args.out)
    if args.table or args.merge:
        print(text_report(results))
        return 0
    specs = cell_specs(args)
    if not osp.isfile(args.python):
        raise PeerBenchError(f'--python {args.python}: not found; build the peer venv with bash tools/setup_peers.sh')
    results.setdefault('commands', []).append(' '.join(['python', 'tools/bench_peers.py', *(argv or sys.argv[1:])]))
    results['machine'] = {'platform': platform.platform(), 'processor': platform.machine(), 'cpus': os.cpu_count(),
                          'python': platform.python_version()}
    for i, spec in enumerate(specs):
        done = next((r for r in results.get('runs', []) if tuple(r.get('spec_key', ())) == spec.key()), None)
        if done is not None and (not done.get('error') or not args.rerun_failed):
            continue
        print(f'[{i + 1}/{len(specs)}] {spec.name} ...', flush=True)
        run = spawn_cell(spec, args, osp.join(osp.dirname(osp.abspath(args.out)), spec.name))
        record_run(results, run)
        save_results(results, args.out)
        value = run['metrics'].get(METRIC)
        print(f'    {METRIC} {value:.3f}' if value is not None else f'    error: {run["error"]}',
              f'({run["seconds"]:.0f} s, scope {run.get("scope")})', flush=True)
    print(text_report(results))
    return 0
