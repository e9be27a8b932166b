"""The ``ptq`` section of a config, validated into a typed object.

Every error names the config key and the allowed values, so a mistyped
config fails before any heavy work. The run's own knobs have their defaults
here; the method's (``iters``, ``drop_prob``, ``act_iters``, ``batch_size``,
``act_calibration``, ``method_options``) are those of ``qdrop_mm.core.methods``,
which also validates them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from qdrop_mm.core.fake_quant import MAX_BITS, MIN_BITS
from qdrop_mm.core.unit_cache import DTYPES, GiB, CachePolicy
from qdrop_mm.core.methods import (METHODS, PREDICTION_OPTIONS, TUNABLE_STAGE_OPTIONS, MethodConfig, MethodOptions,
                                   StageConfig, build_method)


class PTQError(Exception):
    """A problem the user can fix (bad config, data, checkpoint or a failed unit): shown as one line."""


class PTQConfigError(PTQError, ValueError):
    """A config key, path or checkpoint that does not fit; the message names the key and what is allowed."""


@contextmanager
def config_errors(prefix: str = '') -> Iterator[None]:
    """A ValueError in the block (a scope, plan or method check that fails) becomes a one-line PTQConfigError."""
    try:
        yield
    except ValueError as err:
        raise PTQConfigError(f'{prefix}{err}') from None


def _int(key: str, value: Any, low: int, high: Optional[int] = None, note: str = '') -> int:
    """``value`` when it is an integer from ``low`` to ``high``; else an error naming ``ptq.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f'an integer from {low} to {high}' if high is not None else \
            'a positive integer' if low == 1 else f'an integer >= {low}'
        raise PTQConfigError(f'ptq.{key} must be {allowed}{note}, got {value!r}')
    return value


def _bits(key: str, value: Any, allow_none: bool = False) -> Optional[int]:
    return None if value is None and allow_none else _int(key, value, MIN_BITS, MAX_BITS)


@dataclass(frozen=True)
class BitOverride:
    """Bits for every quantized layer whose module path starts with ``prefix``."""

    prefix: str
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None


@dataclass(frozen=True)
class PTQSettings:
    method: str = 'qdrop'
    w_bits: int = 4
    a_bits: int = 4
    first_layer_bits: Optional[int] = 8
    drop_prob: float = MethodOptions.drop_prob
    iters: int = MethodOptions.iters
    act_iters: int = MethodOptions.act_iters
    num_images: int = 256
    batch_size: int = StageConfig.batch_size
    calib_batch_size: Optional[int] = None
    seed: int = 0
    scope: Tuple[str, ...] = ('auto',)
    quantize_fpn_outputs: bool = False
    overrides: Tuple[BitOverride, ...] = ()
    method_options: Dict[str, Any] = field(default_factory=dict)
    calib_num_workers: int = 2
    w_observer: str = 'mse'
    a_observer: str = 'mse'
    act_calibration: str = MethodOptions.act_calibration
    holdout_images: int = 0
    cache: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> 'PTQSettings':
        """Validate a config dict (unknown keys are errors, not silently ignored)."""
        cfg = dict(cfg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise PTQConfigError(f'unknown ptq key(s) {unknown}; allowed keys: {sorted(known)}')
        method = cfg.get('method', cls.method)
        if method not in METHODS:
            raise PTQConfigError(f'ptq.method must be one of {sorted(METHODS)}, got {method!r}')
        for key in ('w_bits', 'a_bits', 'first_layer_bits'):
            _bits(key, cfg.get(key, getattr(cls, key)), allow_none=key == 'first_layer_bits')
        _int('num_images', cfg.get('num_images', cls.num_images), 1)
        if cfg.get('calib_batch_size') is not None:
            _int('calib_batch_size', cfg['calib_batch_size'], 1)
        _int('seed', cfg.get('seed', cls.seed), 0, 2 ** 32 - 1)
        _int('holdout_images', cfg.get('holdout_images', cls.holdout_images), 0, note=' (0 = no held-out check)')
        _int('calib_num_workers', cfg.get('calib_num_workers', cls.calib_num_workers), 0)
        if not isinstance(cfg.get('quantize_fpn_outputs', cls.quantize_fpn_outputs), bool):
            raise PTQConfigError(f'ptq.quantize_fpn_outputs must be True or False, '
                                 f'got {cfg.get("quantize_fpn_outputs")!r}')
        scope = cfg.get('scope', cls.scope)
        if isinstance(scope, str):
            scope = (scope,)
        if not scope or not all(isinstance(s, str) and s for s in scope):
            raise PTQConfigError(f"ptq.scope must be 'auto' or a non-empty list of module paths, got {scope!r}")
        cfg['scope'] = tuple(scope)
        cfg['overrides'] = tuple(_override(k, v) for k, v in _flatten_overrides(cfg.get('overrides', {})).items())
        opts = dict(cfg.get('method_options', {}))
        if 'batch_size' in opts:
            raise PTQConfigError('ptq.method_options.batch_size: the reconstruction batch size is ptq.batch_size')
        bad = sorted(set(opts) - TUNABLE_STAGE_OPTIONS - PREDICTION_OPTIONS)
        if bad:
            raise PTQConfigError(f'ptq.method_options has unknown key(s) {bad}; '
                                 f'allowed: {sorted(TUNABLE_STAGE_OPTIONS)}, for pdquant: {sorted(PREDICTION_OPTIONS)}')
        cfg['method_options'] = opts
        cfg['cache'] = _cache_options(cfg.get('cache', {}))
        for key in ('w_observer', 'a_observer'):
            if cfg.get(key, getattr(cls, key)) not in ('mse', 'minmax'):
                raise PTQConfigError(f"ptq.{key} must be 'mse' or 'minmax', got {cfg.get(key)!r}")
        settings = cls(**cfg)
        settings.build_method()
        return settings

    @property
    def calibration_batch_size(self) -> int:
        """Images per calibration forward (capture, calibration): ``calib_batch_size``, else ``batch_size``."""
        return self.calib_batch_size or self.batch_size

    def build_method(self) -> MethodConfig:
        try:
            return build_method(self.method, iters=self.iters, drop_prob=self.drop_prob,
                                act_iters=self.act_iters, batch_size=self.batch_size,
                                act_calibration=self.act_calibration, **self.method_options)
        except ValueError as err:
            key = getattr(err, 'key', None)
            prefix = 'ptq.method_options.' if key in self.method_options else \
                'ptq.' if key in self.__dataclass_fields__ else 'ptq: '
            raise PTQConfigError(f'{prefix}{err}') from None

    def bits_for(self, path: str, first_layer: bool) -> Tuple[int, int]:
        """(weight bits, activation bits) for the layer at ``path``; the longest matching override wins."""
        w_bits = self.first_layer_bits if first_layer and self.first_layer_bits else self.w_bits
        a_bits = self.a_bits
        for ov in sorted(self.overrides, key=lambda o: len(o.prefix)):
            if path == ov.prefix or path.startswith(ov.prefix + '.'):
                w_bits = ov.w_bits or w_bits
                a_bits = ov.a_bits or a_bits
        return w_bits, a_bits

    def cache_policy(self, work_dir: str) -> CachePolicy:
        """Where unit caches live: ``ptq.cache`` with budgets in GiB; spills go under the work dir."""
        c = {**CACHE_DEFAULTS, **self.cache}
        spill = os.path.join(work_dir, 'cache_spill') if c['spill'] else None
        return CachePolicy(dtype=c['dtype'], device_budget=_device_budget(c['device_budget_gb']),
                           host_budget=int(c['host_budget_gb'] * GiB), spill_dir=spill)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d['scope'] = list(self.scope)
        d['overrides'] = {o.prefix: {'w_bits': o.w_bits, 'a_bits': o.a_bits} for o in self.overrides}
        return d


CACHE_DEFAULTS = {'dtype': CachePolicy.dtype, 'device_budget_gb': 'auto',
                  'host_budget_gb': CachePolicy.host_budget // GiB, 'spill': True}


def _cache_options(value: Any) -> Dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PTQConfigError(f'ptq.cache must be a dict with keys {sorted(CACHE_DEFAULTS)}, got {value!r}')
    bad = sorted(set(value) - set(CACHE_DEFAULTS))
    if bad:
        raise PTQConfigError(f'ptq.cache has unknown key(s) {bad}; allowed: {sorted(CACHE_DEFAULTS)}')
    if 'dtype' in value and value['dtype'] not in DTYPES:
        raise PTQConfigError(f"ptq.cache.dtype must be one of {sorted(DTYPES)}, got {value['dtype']!r}")
    for key in ('device_budget_gb', 'host_budget_gb'):
        v = value.get(key, 0)
        if key == 'device_budget_gb' and v == 'auto':
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            allowed = "a number >= 0 (GiB) or 'auto'" if key == 'device_budget_gb' else 'a number >= 0 (GiB)'
            raise PTQConfigError(f'ptq.cache.{key} must be {allowed}, got {v!r}')
    if not isinstance(value.get('spill', True), bool):
        raise PTQConfigError(f"ptq.cache.spill must be True or False, got {value['spill']!r}")
    return dict(value)


AUTO_DEVICE_FRACTION = 0.5


def _device_budget(value: Any) -> int:
    """Bytes of device memory for unit caches; 'auto' = half of the GPU memory free now (0 without a GPU)."""
    if value != 'auto':
        return int(value * GiB)
    import torch
    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return int(free * AUTO_DEVICE_FRACTION)


def _flatten_overrides(value: Any, prefix: str = '') -> Dict[str, Any]:
    """Module path -> bits, also from the nested form ``--cfg-options ptq.overrides.backbone.layer1.w_bits=8`` gives."""
    if not isinstance(value, Mapping):
        raise PTQConfigError(f'ptq.overrides must map module paths to dict(w_bits=..., a_bits=...), got {value!r}')
    flat: Dict[str, Any] = {}
    for key, sub in value.items():
        path = f'{prefix}.{key}' if prefix else str(key)
        if isinstance(sub, Mapping) and sub and not set(sub) <= {'w_bits', 'a_bits'}:
            flat.update(_flatten_overrides(sub, path))
        else:
            flat[path] = sub
    return flat


def _override(prefix: Any, value: Any) -> BitOverride:
    if not isinstance(prefix, str) or not isinstance(value, Mapping):
        raise PTQConfigError(f'ptq.overrides must map module paths to dict(w_bits=..., a_bits=...), '
                             f'got {prefix!r}: {value!r}')
    bad = sorted(set(value) - {'w_bits', 'a_bits'})
    if bad:
        raise PTQConfigError(f'ptq.overrides[{prefix!r}] has unknown key(s) {bad}; allowed: w_bits, a_bits')
    return BitOverride(prefix, _bits(f'overrides[{prefix!r}].w_bits', value.get('w_bits'), allow_none=True),
                       _bits(f'overrides[{prefix!r}].a_bits', value.get('a_bits'), allow_none=True))
