"""Resume state of an interrupted PTQ run, kept in ``<work_dir>/ptq_resume/``.

Files (each written to a temp file, fsynced, renamed; a file the manifest names is never rewritten):

``calibration.pth``
    After activation calibration: every ``state_dict`` entry of the modules
    under ``ptq.scope`` (folded weights, AdaRound ``alpha``/``mode_code``/
    ``scale``/``zero_point``, LSQ ``scale``/``zero_point``/``calibrated``).
``unit-NNNN.pth``
    After the N-th finished (stage, unit): that unit's ``state_dict`` entries
    (hardened rounding, learned activation steps). Reconstructing a unit
    changes nothing outside it, so the base plus these deltas, loaded in
    order, is the model's quantized state so far; each save writes one unit,
    not the whole model.
``manifest.json``
    Written last, atomically: for every file above its size and SHA-256, the
    run's fingerprint (settings, unit names, FP checkpoint, digest of the
    calibration batches), the finished (stage, unit) pairs and their report
    records, and the status (``running``; ``complete`` once quantized.pth is
    written). A file is trusted only when it matches the manifest, so a run
    killed in the middle of a save resumes from the previous unit.

Every state file also holds the torch/numpy/python RNG states at that point
(a list by rank: under torch.distributed rank 0 writes, every rank reads),
and contains only tensors, numbers, strings, lists and dicts: it loads with
``torch.load(weights_only=True)``. The folder is deleted when a run ends
successfully (report written).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size, is_main_process
from torch import nn

from qdrop_mm.core import ReconResult, Unit, UnitRecord

from .atomic_io import atomic_write_json
from .block_plan import scope_paths
from .checkpoint import atomic_save
from .settings import PTQConfigError, PTQSettings

RESUME_DIR = 'ptq_resume'
MANIFEST = 'manifest.json'
FORMAT = 'qdrop_mm.resume/1'
# settings that may change between the interrupted run and --resume (finished units keep what they used)
RESUMABLE_CHANGES = frozenset({'iters', 'act_iters', 'drop_prob', 'method_options'})


class ResumeStateError(PTQConfigError):
    """The resume state is missing, damaged or belongs to a different run."""


# ----------------------------------------------------------------------------- RNG

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def rng_state() -> Dict[str, Any]:
    """torch/CUDA/numpy/python RNG states as weights_only-loadable objects (tensors, numbers, lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': {'version': int(version), 'state': torch.tensor(py_state, dtype=torch.int64),
                   'gauss_next': gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(int(x) for x in p['state'].tolist()), p['gauss_next']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- fingerprint

def batches_digest(batches: Sequence[dict]) -> str:
    """SHA-256 over the calibration inputs (shapes and bytes): equal iff the batches were rebuilt identically."""
    h = hashlib.sha256()
    for batch in batches:
        for t in batch['inputs']:
            t = t.detach().cpu().contiguous()
            h.update(f'{tuple(t.shape)}{t.dtype}'.encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def checkpoint_identity(load_from: Optional[str]) -> Dict[str, Any]:
    if not load_from:
        return {'path': None}
    if '://' in load_from:
        return {'path': load_from}
    path = os.path.abspath(load_from)
    return {'path': path, 'bytes': os.path.getsize(path) if os.path.isfile(path) else None}


def scope_state_dict(model: nn.Module, scope: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Every state_dict entry of the modules under ``scope`` (all that quantization changes)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if _in_scope(k, scope)}


def module_state_dict(model: nn.Module, module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s state_dict entries under their full keys in ``model``."""
    prefix = next(name for name, m in model.named_modules() if m is module)
    return {k: v.detach().cpu().clone() for k, v in module.state_dict(prefix=f'{prefix}.' if prefix else '').items()}


def _in_scope(key: str, scope: Sequence[str]) -> bool:
    return any(key.startswith(s + '.') for s in scope)


def load_scope_state(model: nn.Module, states: Sequence[Dict[str, torch.Tensor]], scope: Sequence[str],
                     source: str) -> None:
    """Load the base scope state and the per-unit deltas, in order, into the (already planned) model.

    The base must hold exactly the model's keys under ``scope``; a delta only keys among them.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if _in_scope(k, scope)}
    for i, state in enumerate(states):
        missing = sorted(set(expected) - set(state)) if i == 0 else []
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
        if missing or unexpected or shapes:
            raise ResumeStateError(
                f'resume state {source} does not fit the quantized model: {len(missing)} missing keys '
                f'(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} with '
                f'other shapes (e.g. {shapes[:3]}); run without --resume to start over')
        model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- records

def record_to_dict(rec: UnitRecord) -> Dict[str, Any]:
    return {'name': rec.name, 'kind': rec.kind, 'stage': rec.stage, 'cache_bytes': int(rec.cache_bytes),
            'cache_usage': {k: int(v) for k, v in rec.cache_usage.items()}, **asdict(rec.result)}


def record_from_dict(d: Dict[str, Any]) -> UnitRecord:
    fields = set(ReconResult.__dataclass_fields__)
    result = ReconResult(**{k: v for k, v in d.items() if k in fields})
    return UnitRecord(d['name'], d['kind'], int(d['stage']), result, int(d['cache_bytes']),
                      dict(d.get('cache_usage', {})))


# ----------------------------------------------------------------------------- files

def _file_digest(path: str) -> Tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class ResumeSession:
    """The resume folder of one run, the loop's only contact with it: ``open`` (a fresh run removes an earlier
    state, ``--resume`` reads it), ``start`` (once the units are planned: restore the saved run and its RNG
    states, or seed the RNGs), ``save_calibration`` and ``save_unit`` (a state file, then the manifest),
    ``update`` (status, last error), ``clear``. Under torch.distributed every rank calls every method (the RNG
    states are gathered); rank 0 writes."""

    def __init__(self, work_dir: str, logger: Any = None, resume: bool = False) -> None:
        self.dir = os.path.join(work_dir, RESUME_DIR)
        self.manifest_path = os.path.join(self.dir, MANIFEST)
        self.writer = is_main_process()
        self.logger, self.resume = logger, resume
        self.manifest: Dict[str, Any] = {}  # as last written (or read by --resume)
        self.finished: Dict[Tuple[int, str], UnitRecord] = {}
        self.resumed_units = 0
        self.model, self.scope = None, ()  # set by start

    @property
    def calibrated(self) -> bool:
        return bool(self.manifest.get('calibrated'))

    def open(self) -> None:
        """Remove the state of an earlier run, or with ``resume`` read it (none: start from the beginning)."""
        if not self.resume:
            if self.clear():
                self.logger.warning(f'removed the resume state of an earlier run in {self.dir} '
                                    f'(pass --resume to continue an interrupted run instead)')
            return
        self.manifest = self.read_manifest() or {}
        if not self.manifest:
            self.logger.warning(f'--resume: no resume state in {self.dir}; starting from the beginning')

    def start(self, model: nn.Module, settings: PTQSettings, units: Sequence[Unit], batches: Sequence[dict],
              checkpoint: Optional[str], num_stages: int) -> None:
        """Restore the saved run (checked to be this one) into the planned ``model``, else seed the RNGs."""
        self.model, self.scope = model, scope_paths(model, settings.scope)
        fingerprint = {'settings': settings.to_dict(), 'units': [u.name for u in units],
                       'checkpoint': checkpoint_identity(checkpoint), 'world_size': get_world_size(),
                       'calibration': all_gather_object(batches_digest(batches))}
        manifest = self.manifest
        if not manifest:
            seed_everything(settings.seed)
            self.manifest = {'status': 'running', 'fingerprint': fingerprint, 'num_stages': num_stages,
                             'calibrated': False, 'finished': [], 'records': []}
            return
        blocking, allowed = compare_fingerprints(manifest.get('fingerprint', {}), fingerprint)
        if blocking:
            raise ResumeStateError(f'the resume state in {self.dir} belongs to a different run: '
                                   f'{"; ".join(blocking)}. Run with the same settings, or without --resume '
                                   f'to start over')
        if allowed:
            self.logger.warning(f'resuming with changed settings (finished units keep the old ones): {allowed}')
        states = self.load_states(manifest)
        load_scope_state(self.model, [s['state_dict'] for s in states], self.scope, self.dir)
        rngs = states[-1]['rng']
        set_rng_state(rngs[get_rank()] if isinstance(rngs, list) else rngs)
        self.manifest = dict(manifest, fingerprint=fingerprint, status='running')
        self.finished = {(r.stage, r.name): r for r in map(record_from_dict, manifest.get('records', []))}
        self.resumed_units = len(self.finished)
        self.logger.info(f'resuming from {self.dir}: {len(self.finished)} finished unit(s) restored '
                         f'(last: {manifest["finished"][-1][1] if self.finished else "calibration only"})')

    def restored(self, stage_idx: int, name: str) -> Optional[UnitRecord]:
        """The record of a (stage, unit) finished before (not rerun)."""
        return self.finished.get((stage_idx, name))

    def save_calibration(self) -> None:
        """The calibrated state of everything in scope (once: a restored run has it already)."""
        if not self.calibrated:
            self._save('calibration', dict(self.manifest, calibrated=True),
                       lambda: scope_state_dict(self.model, self.scope))

    def save_unit(self, record: UnitRecord, module: nn.Module) -> None:
        """A finished (stage, unit): its record and ``module``'s state."""
        self.finished[(record.stage, record.name)] = record
        finished = self.manifest.get('finished', []) + [[record.stage, record.name]]
        records = self.manifest.get('records', []) + [record_to_dict(record)]
        self._save('unit', dict(self.manifest, finished=finished, records=records),
                   lambda: module_state_dict(self.model, module))

    def _save(self, kind: str, manifest: Dict[str, Any], state: Callable[[], Dict[str, torch.Tensor]]) -> None:
        rngs = all_gather_object(rng_state())  # collective: every rank calls it
        self.save(kind, state() if self.writer else {}, manifest, rngs)

    def clear(self) -> bool:
        """Remove the folder (a fresh run never trusts an older state); True if there was one."""
        if not self.writer or not os.path.isdir(self.dir):
            return False
        shutil.rmtree(self.dir)
        return True

    def read_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest, or None when there is no resume state; a damaged one is an error."""
        if not os.path.isfile(self.manifest_path):
            return None
        try:
            with open(self.manifest_path, encoding='utf-8') as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            raise ResumeStateError(f'resume manifest {self.manifest_path} is unreadable ({err}); '
                                   f'delete {self.dir} or run without --resume to start over') from None
        if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
            raise ResumeStateError(f'{self.manifest_path} is not a {FORMAT} manifest; delete {self.dir} or run '
                                   f'without --resume to start over')
        return manifest

    def load_states(self, manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The state files the manifest names, in order, each after checking its size and SHA-256."""
        states = []
        for entry in manifest.get('files', []):
            path = os.path.join(self.dir, os.path.basename(entry['name']))
            if not os.path.isfile(path):
                raise ResumeStateError(f'resume state file {path} named by {self.manifest_path} is missing; '
                                       f'run without --resume to start over')
            size, digest = _file_digest(path)
            if size != entry['bytes'] or digest != entry['sha256']:
                raise ResumeStateError(f'resume state file {path} is damaged ({size} bytes, sha256 {digest[:12]}; '
                                       f'the manifest expects {entry["bytes"]} bytes, {entry["sha256"][:12]}); '
                                       f'run without --resume to start over')
            state = torch.load(path, map_location='cpu', weights_only=True)
            if not isinstance(state, dict) or state.get('format') != FORMAT:
                raise ResumeStateError(f'{path} is not a {FORMAT} state file; run without --resume to start over')
            states.append(state)
        if not states:
            raise ResumeStateError(f'{self.manifest_path} names no state file; run without --resume to start over')
        return states

    def save(self, kind: str, state_dict: Dict[str, torch.Tensor], manifest: Dict[str, Any],
             rng: Optional[List[Dict[str, Any]]] = None) -> None:
        """Write a new state file (atomically), then the manifest listing it (``kind``: calibration | unit).

        ``rng``: the RNG states of every rank (default: this process's); stored as a list by rank.
        """
        files = list(manifest.get('files', []))
        entry = {'name': 'calibration.pth' if kind == 'calibration' else f'unit-{len(files):04d}.pth'}
        if self.writer:
            path = os.path.join(self.dir, entry['name'])
            atomic_save({'format': FORMAT, 'kind': kind, 'state_dict': state_dict,  # creates the folder, fsyncs
                         'rng': rng if rng is not None else [rng_state()]}, path)
            entry['bytes'], entry['sha256'] = _file_digest(path)
        self.manifest = dict(manifest, format=FORMAT, files=files + [entry])
        self.update()  # the manifest, written last

    def update(self, **fields: Any) -> None:
        """Rewrite the manifest with some fields changed (same state files; none written yet: nothing to do)."""
        if not self.manifest.get('files'):
            return
        self.manifest = dict(self.manifest, **fields, updated=time.strftime('%Y-%m-%d %H:%M:%S'))
        if self.writer:
            atomic_write_json(self.manifest, self.manifest_path, indent=1)


def compare_fingerprints(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(blocking differences, allowed differences) between the interrupted run and this one, as text."""
    blocking, allowed = [], []
    s_set, c_set = saved.get('settings', {}), current.get('settings', {})
    for key in sorted(set(s_set) | set(c_set)):
        if s_set.get(key) != c_set.get(key):
            text = f'ptq.{key}: {s_set.get(key)!r} -> {c_set.get(key)!r}'
            (allowed if key in RESUMABLE_CHANGES else blocking).append(text)
    if saved.get('units') != current.get('units'):
        blocking.append(f'block plan: {len(saved.get("units", []))} units -> {len(current.get("units", []))} '
                        f'(or other names)')
    for key, label, default in (('checkpoint', 'FP checkpoint', None), ('world_size', 'number of processes', 1)):
        if saved.get(key, default) != current.get(key, default):
            blocking.append(f'{label}: {saved.get(key, default)} -> {current.get(key, default)}')
    if saved.get('calibration') != current.get('calibration'):
        blocking.append('calibration batches differ (train data, pipeline or calibration settings changed)')
    return blocking, allowed
