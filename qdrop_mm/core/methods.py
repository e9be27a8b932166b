"""PTQ methods as configurations of one reconstruction loop.

A method is an ordered tuple of stages; each stage visits every unit in
order. ``rtn`` has no stage; ``adaround`` learns rounding with FP
activations; ``brecq`` (two-stage, as published) first learns rounding with
activations off, then learns activation step sizes with activations always
quantized; ``qdrop`` learns both together with drop probability p.
``qwt`` (RTN) and ``qdrop_qwt`` (QDrop) then add QwT's closed-form linear
compensation to every unit (``MethodConfig.compensation``, ``core/qwt.py``).
``pdquant`` is QDrop plus PD-Quant's prediction-difference loss and
distribution correction (``MethodConfig.prediction``, ``core/prediction_loss.py``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .method_hooks import MethodHooks

PAPER_ITERS = 20000
SCHEDULES = ('paper', 'budget')
ACT_CALIBRATIONS = ('fp', 'quantized')


class OptionError(ValueError):
    """A method option with a bad value; ``key`` names it, so callers prefix their own config path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _check(cfg: Any, names: Sequence[str], requirement: str, ok: Callable[[Any], bool] = lambda v: v >= 0) -> None:
    """OptionError '<name> must be <requirement>, got <value>' for the first named field that is not ``ok`` (>= 0)."""
    for name in names:
        value = getattr(cfg, name)
        if not ok(value):
            raise OptionError(name, f'{name} must be {requirement}, got {value!r}')


def _check_positive_int(cfg: Any, *names: str) -> None:
    _check(cfg, names, 'a positive integer', lambda v: not isinstance(v, bool) and isinstance(v, int) and v > 0)


def _check_unit_interval(cfg: Any, *names: str) -> None:
    _check(cfg, names, 'a number in [0, 1]',
           lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0)


def _check_types(cfg: Any) -> None:
    """Every field holds a value of its default's type: bool, str, int, or a finite number for a float."""
    for f in fields(cfg):
        kind, value = type(f.default), getattr(cfg, f.name)
        if kind in (bool, str) and not isinstance(value, kind):
            what = 'True or False' if kind is bool else 'a string'
            raise OptionError(f.name, f'{f.name} must be {what}, got {value!r}')
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, kind))
                                     or not math.isfinite(value)):
            what = 'integer' if kind is int else 'number'
            raise OptionError(f.name, f'{f.name} must be a finite {what}, got {value!r}')


@dataclass(frozen=True)
class StageConfig:
    """One pass of block reconstruction over all units.

    ``act_quant``: activation quantizers are on while this stage runs (and when
    its quantized inputs are captured). ``drop_prob``: probability of keeping
    activation quantization per element (1 = always quantized).
    ``early_stop_patience`` > 0 stops a unit early once, past the
    ``early_stop_after`` fraction of ``iters``, that many successive checks (one
    per log interval) of the hardened, fully quantized output MSE improved it by
    less than ``early_stop_rel_tol`` (off by default: the authors' fixed
    iteration count; the rounding schedule is relative to ``iters``, so checks
    start late). ``compile`` runs the unit's whole training forward through
    ``torch.compile`` (falls back to eager with a warning if compilation
    fails); without it the quantizers' elementwise work already runs as
    compiled one-pass kernels (``core/fused.py``).

    ``learn_bias``: also learn the (BN-folded) FP biases of the unit's layers
    (Adam at ``b_lr``, cosine-annealed), which corrects the mean shift that
    low-bit activation and weight grids put on a unit's output (bias
    correction learned on the reconstruction loss, as AdaQuant does).

    ``accum_steps`` = k: each optimiser step averages the gradients of k batches
    of ``batch_size`` (the authors' 8 processes × batch 2 on one device: k = 8).
    ``schedule``: ``'paper'`` uses ``w_lr``, ``a_lr`` and ``b_lr`` as given (the
    authors' 20 000-iteration values); ``'budget'`` scales them by
    :meth:`lr_factor` so that rounding variables and activation steps can move as
    far in a short budget as in the paper's (see :func:`budget_lr_factor`).
    """

    iters: int = PAPER_ITERS
    learn_rounding: bool = True
    learn_act_steps: bool = True
    act_quant: bool = True
    drop_prob: float = 0.5
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    round_weight: float = 0.01
    warmup: float = 0.2
    b_start: float = 20.0
    b_end: float = 2.0
    batch_size: int = 2
    log_interval: int = 100
    early_stop_patience: int = 0
    early_stop_rel_tol: float = 1e-3
    early_stop_after: float = 0.5
    compile: bool = False
    accum_steps: int = 1
    schedule: str = 'budget'
    learn_bias: bool = False
    b_lr: float = 1e-3

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive_int(self, 'iters', 'batch_size', 'accum_steps')
        _check(self, ['schedule'], f'one of {SCHEDULES}', SCHEDULES.__contains__)
        _check_positive_int(self, 'log_interval')
        _check_unit_interval(self, 'drop_prob', 'warmup', 'early_stop_rel_tol', 'early_stop_after')
        _check(self, ['early_stop_patience'], 'an integer >= 0 (0 = off)')
        if not (self.learn_rounding or self.learn_act_steps or self.learn_bias):
            raise ValueError('a stage must learn rounding, activation steps or biases')
        if self.learn_act_steps and not self.act_quant:
            raise ValueError('learn_act_steps needs act_quant=True')
        _check(self, ('w_lr', 'a_lr', 'b_lr', 'round_weight'), '>= 0')

    def lr_factor(self) -> float:
        """Multiplier of ``w_lr`` and ``a_lr`` under this stage's schedule (1 for ``'paper'``)."""
        return budget_lr_factor(self.iters) if self.schedule == 'budget' else 1.0

    @property
    def effective_w_lr(self) -> float:
        return self.w_lr * self.lr_factor()

    @property
    def effective_a_lr(self) -> float:
        return self.a_lr * self.lr_factor()

    @property
    def effective_b_lr(self) -> float:
        return self.b_lr * self.lr_factor()


MAX_BUDGET_LR_FACTOR = 100.0


def budget_lr_factor(iters: int) -> float:
    """PAPER_ITERS / iters, between 1 and MAX_BUDGET_LR_FACTOR: the ``'budget'`` schedule's lr multiplier.

    Adam moves a parameter by about lr per step, so at the paper's lr a 300-iteration run can move a
    rounding variable by at most 0.3 (only weights whose fractional part is near 0.5 can change
    rounding) and an activation step by < 0.01. Scaling lr by PAPER_ITERS / iters keeps the reachable
    distance (lr × iterations) of the paper's schedule. Measured on the seeded toy network (W4A4,
    held-out MSE, 3 seeds): at 300 and 1 000 iterations this beat both the paper's lr and a
    square-root factor on every seed (README "The budget").
    """
    return min(MAX_BUDGET_LR_FACTOR, max(1.0, PAPER_ITERS / iters))


COMPENSATION_PLACEMENTS = ('before_quantizer', 'after_quantizer')


@dataclass(frozen=True)
class CompensationConfig:
    """QwT linear compensation fitted after the stages (``core/qwt.py``).

    ``ridge``: λ relative to the mean input energy (diagonal of X^T X).
    ``placement``: add the compensation before the unit's output activation
    quantizer (re-quantized, integer-friendly) or after it. ``validate``: pick
    the ridge (``ridge`` × 1, 100, 10^4) by 2-fold validation over the batches
    and leave a unit uncompensated when no fit validates better than none.
    """

    ridge: float = 1e-4
    placement: str = 'before_quantizer'
    validate: bool = True

    def build_hooks(self, prediction: Any = None) -> 'MethodHooks':
        from .qwt import CompensationHooks
        return CompensationHooks(self)

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, ['ridge'], 'a finite number >= 0')
        _check(self, ['placement'], f'one of {COMPENSATION_PLACEMENTS}', COMPENSATION_PLACEMENTS.__contains__)


@dataclass(frozen=True)
class PredictionConfig:
    """PD-Quant (Liu et al., CVPR 2023) on top of a stage's reconstruction loss (``core/prediction_loss.py``).

    ``pd_weight`` × the difference between the FP network's predictions and those
    obtained through the rest of the (FP) network from the unit's quantized
    output (KL at temperature ``pd_temperature`` on scores, weighted MSE on box
    regressions), added every ``pd_interval`` iterations. Distribution
    correction: each cached FP unit input is moved for ``dc_iters`` Adam steps
    (lr ``dc_lr``) so the per-image statistics at the unit's BatchNorms match
    their running statistics, with ``dc_weight`` × the MSE to the original
    keeping it close (0 iterations = off). Defaults are the authors' ResNet
    settings (λ_r = 0.1, T = 4, λ_c = 0.02, 500 iterations, lr 1e-3).
    ``pd_cache_gb``: host memory for the FP predictions of the calibration set
    (beyond it they spill with the unit cache, or the run stops).
    """

    pd_weight: float = 10.0
    pd_temperature: float = 4.0
    pd_interval: int = 1
    dc_iters: int = 500
    dc_lr: float = 1e-3
    dc_weight: float = 50.0
    pd_cache_gb: float = 4.0

    def build_hooks(self, prediction: Any = None) -> 'MethodHooks':
        """``prediction``: the ``PredictionSource`` saying how to get the network's predictions."""
        from .prediction_loss import PredictionHooks
        return PredictionHooks(self, prediction)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive_int(self, 'pd_interval')
        _check(self, ['dc_iters'], 'an integer >= 0 (0 = no distribution correction)')
        _check(self, ('pd_weight', 'dc_weight', 'pd_cache_gb'), 'a finite number >= 0')
        _check(self, ('pd_temperature', 'dc_lr'), 'a finite number > 0', lambda v: v > 0)


PREDICTION_OPTIONS = frozenset(PredictionConfig.__dataclass_fields__)


@dataclass(frozen=True)
class MethodConfig:
    """Reconstruction stages (optionally with PD-Quant's prediction term), then optionally QwT compensation.

    ``act_calibration``: where activation ranges are initialised: ``'fp'`` on the FP network's
    activations in one pass (the authors' QDrop code), ``'quantized'`` unit by unit in network order
    with every earlier unit already quantized (weights and activations), so each range sees the
    inputs it will get (the authors' older BRECQ-era code).
    """

    name: str
    stages: Tuple[StageConfig, ...] = field(default_factory=tuple)
    compensation: Optional[CompensationConfig] = None
    prediction: Optional[PredictionConfig] = None
    act_calibration: str = 'fp'

    def __post_init__(self) -> None:
        _check(self, ['act_calibration'], f'one of {ACT_CALIBRATIONS}', ACT_CALIBRATIONS.__contains__)

    def build_hooks(self, prediction: Any = None) -> List['MethodHooks']:
        """The hooks of the method's additions to the loop, in the order they run (prediction term, compensation)."""
        return [part.build_hooks(prediction) for part in (self.prediction, self.compensation) if part is not None]

    def to_dict(self) -> Dict[str, Any]:
        stages = [{**asdict(s), 'effective_w_lr': s.effective_w_lr, 'effective_a_lr': s.effective_a_lr,
                   'effective_b_lr': s.effective_b_lr} for s in self.stages]
        return {**asdict(self), 'stages': stages}


@dataclass(frozen=True)
class MethodOptions:
    """What a user may set for any method (``stage``: StageConfig fields, ``prediction``: PredictionConfig
    fields); each method reads what it needs, every option is checked. ``act_*``: BRECQ's activation stage."""

    iters: int = StageConfig.iters
    drop_prob: float = StageConfig.drop_prob
    act_iters: int = 5000
    act_lr_stage2: float = 4e-4
    act_calibration: str = MethodConfig.act_calibration
    stage: Dict[str, Any] = field(default_factory=dict)
    prediction: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_positive_int(self, 'iters', 'act_iters')
        _check_unit_interval(self, 'drop_prob')
        _check(self, ['act_lr_stage2'], '>= 0')
        StageConfig(**self.stage)
        PredictionConfig(**self.prediction)


TUNABLE_STAGE_OPTIONS = frozenset(StageConfig.__dataclass_fields__) - {
    'iters', 'learn_rounding', 'learn_act_steps', 'act_quant', 'drop_prob'}
METHOD_OPTIONS = frozenset(MethodOptions.__dataclass_fields__) - {'stage', 'prediction'}
MethodBuilder = Callable[[MethodOptions], MethodConfig]
METHODS: Dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def deco(fn: MethodBuilder) -> MethodBuilder:
        METHODS[name] = fn
        return fn
    return deco


@register_method('rtn')
def rtn(opts: MethodOptions) -> MethodConfig:
    return MethodConfig('rtn', ())


@register_method('adaround')
def adaround(opts: MethodOptions) -> MethodConfig:
    stage = StageConfig(iters=opts.iters, learn_rounding=True, learn_act_steps=False, act_quant=False,
                        drop_prob=1.0, **opts.stage)
    return MethodConfig('adaround', (stage,))


@register_method('brecq')
def brecq(opts: MethodOptions) -> MethodConfig:
    weights = adaround(opts).stages[0]  # BRECQ's first stage is AdaRound's
    acts = replace(weights, iters=opts.act_iters, learn_rounding=False, learn_act_steps=True, act_quant=True,
                   a_lr=opts.act_lr_stage2)
    return MethodConfig('brecq', (weights, acts))


@register_method('qdrop')
def qdrop(opts: MethodOptions) -> MethodConfig:
    stage = StageConfig(iters=opts.iters, learn_rounding=True, learn_act_steps=True, act_quant=True,
                        drop_prob=opts.drop_prob, **opts.stage)
    return MethodConfig('qdrop', (stage,))


@register_method('qwt')
def qwt(opts: MethodOptions) -> MethodConfig:
    return MethodConfig('qwt', (), compensation=CompensationConfig())


@register_method('qdrop_qwt')
def qdrop_qwt(opts: MethodOptions) -> MethodConfig:
    return replace(qdrop(opts), name='qdrop_qwt', compensation=CompensationConfig())


@register_method('pdquant')
def pdquant(opts: MethodOptions) -> MethodConfig:
    return replace(qdrop(opts), name='pdquant', prediction=PredictionConfig(**opts.prediction))


def build_method(name: str, **options: Any) -> MethodConfig:
    """Method config by registered name; ``options``: MethodOptions fields, StageConfig and PredictionConfig
    fields (each default lives in its config)."""
    if name not in METHODS:
        raise ValueError(f'unknown method {name!r}; choose one of {sorted(METHODS)}')
    unknown = set(options) - METHOD_OPTIONS - TUNABLE_STAGE_OPTIONS - PREDICTION_OPTIONS
    if unknown:
        raise ValueError(f'unknown method option(s) {sorted(unknown)}; allowed: {sorted(METHOD_OPTIONS)}, '
                         f'{sorted(TUNABLE_STAGE_OPTIONS)}, {sorted(PREDICTION_OPTIONS)}')
    prediction = {k: options.pop(k) for k in sorted(set(options) & PREDICTION_OPTIONS)}
    stage = {k: options.pop(k) for k in sorted(set(options) & TUNABLE_STAGE_OPTIONS)}
    opts = MethodOptions(**options, stage=stage, prediction=prediction)
    method = replace(METHODS[name](opts), act_calibration=opts.act_calibration)
    if prediction and method.prediction is None:
        key = next(iter(prediction))
        raise OptionError(key, f'{key} only applies to methods with a prediction term (pdquant), not {name!r}')
    return method
