"""Block plan: turn the modules in scope into quantized reconstruction units.

A rule (see ``block_rules.py``) is registered for a module type and turns one module into its
quantized replacement, declaring the reconstruction units it creates. The
walker visits the modules under the configured scope (backbone and neck by
default); a module without a rule is searched for children, and any
remaining Conv2d/Linear becomes a layer-wise unit (the fallback); inside an
``nn.Sequential`` a conv/linear followed by a BatchNorm (and an activation)
becomes one layer with the BN folded.

Norms that cannot be folded (GroupNorm, LayerNorm) stay FP between the
quantized layer and its activation quantizer. After conversion every
Conv/Linear/attention weight in scope that no rule quantized is listed
(``ModelPlan.fp_layers``), never skipped silently.

Activation quantizers follow the QDrop spec: on every inner conv(+act)
output except a block's last conv and its shortcut, on block outputs and on
stand-alone layers; FPN output convs keep FP outputs so the heads see FP
features (configurable).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from qdrop_mm.core import QuantLayer, QuantOutput, QuantResidual, Unit
from qdrop_mm.core.qwt import Compensated

from .settings import PTQSettings

RuleFn = Callable[[nn.Module, str, 'PlanContext'], nn.Module]
_RULES: Dict[type, RuleFn] = {}


def register_rule(*types: Type[nn.Module]) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn(module, path, ctx) -> replacement`` for the given module types (and subclasses)."""
    def deco(fn: RuleFn) -> RuleFn:
        for t in types:
            _RULES[t] = fn
        return fn
    return deco


class UnsupportedModuleError(ValueError):
    """A module in the quantization scope cannot be converted faithfully."""


@dataclass
class PlanContext:
    """What rules need while converting: settings, the units found so far, bit choice."""

    settings: PTQSettings
    units: List[Unit] = field(default_factory=list)
    layer_paths: List[str] = field(default_factory=list)
    unfolded_norms: List[Tuple[str, str]] = field(default_factory=list)
    input_layer: Optional[str] = None
    enclosing: Optional[str] = None  # the block unit being built by block_unit: rules inside it declare none

    def layer(self, path: str, layer: nn.Module, bn: Optional[nn.Module] = None,
              activation: Optional[nn.Module] = None, quantize_output: bool = True,
              quantize_input: bool = False) -> QuantLayer:
        """A QuantLayer with this path's bits (``ptq.first_layer_bits`` if it wraps ``input_layer``); its first
        five parameters are those of ``core.placement.LayerFactory``.

        ``bn``: a BatchNorm is folded into the weight; any other norm (GroupNorm, LayerNorm, ...) stays
        FP between the layer and its activation (listed in ``unfolded_norms``). ``quantize_input`` adds
        an activation quantizer on the layer's input (transformer linears after a LayerNorm).
        """
        first = self.input_layer is not None and (path == self.input_layer or self.input_layer.startswith(path + '.'))
        w_bits, a_bits = self.settings.bits_for(path, first_layer=first)
        self.layer_paths.append(path)
        norm = None
        if bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn, norm = None, bn
            self.unfolded_norms.append((path, type(norm).__name__))
        return QuantLayer(layer, w_bits, bn=bn, activation=activation,
                          a_bits=a_bits if quantize_output else None,
                          w_observer=self.settings.w_observer, a_observer=self.settings.a_observer, norm=norm,
                          in_a_bits=a_bits if quantize_input else None)

    def out_bits(self, path: str) -> int:
        return self.settings.bits_for(path, first_layer=False)[1]

    def add_unit(self, path: str, module: nn.Module, kind: str) -> nn.Module:
        """Declare ``module`` a reconstruction unit; inside :meth:`block_unit` it is part of that unit instead."""
        if self.enclosing is None:
            self.units.append(Unit(path, module, kind))
        return module

    def block_unit(self, module: nn.Module, path: str) -> nn.Module:
        """``module`` as one block unit: its children are converted by their own rules, whose units it absorbs
        (e.g. a transformer block: attention and FFN reconstructed together)."""
        outer, self.enclosing = self.enclosing, path
        try:
            self.convert_children(module, path)
        finally:
            self.enclosing = outer
        return self.add_unit(path, module, 'block')

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            setattr(module, name, convert(child, f'{path}.{name}' if path else name, self))


def rule_for(module: nn.Module) -> Optional[RuleFn]:
    """The rule registered for ``module``'s type or its nearest base class, if any."""
    return next((_RULES[cls] for cls in type(module).__mro__ if cls in _RULES), None)


def convert(module: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Quantized replacement of ``module`` (or the module itself, converted in place)."""
    rule = rule_for(module)
    if rule is not None:
        return rule(module, path, ctx)
    if is_plain_layer(module):
        return ctx.add_unit(path, ctx.layer(path, module), 'layer')
    if isinstance(module, (QuantLayer, QuantResidual, QuantOutput, Compensated)):
        return module
    if isinstance(module, nn.Sequential):
        _fold_sequential(module, path, ctx)
    ctx.convert_children(module, path)
    return module


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _fold_sequential(seq: nn.Sequential, path: str, ctx: PlanContext) -> None:
    """conv/linear → norm (→ activation), or conv/linear → activation, inside a Sequential: one layer unit.

    A BatchNorm is folded, another norm stays FP inside the layer; the output is quantized after the
    activation. The absorbed entries become ``nn.Identity`` so the other entries keep their indices.
    """
    names = [n for n, _ in seq.named_children()]
    i = 0
    while i < len(names) - 1:
        j = i + 1
        norm = seq[j] if isinstance(seq[j], NORM_TYPES) else None
        j += norm is not None
        act = seq[j] if j < len(names) and is_activation(seq[j]) else None
        if not is_plain_layer(seq[i]) or (norm is None and act is None):
            i += 1
            continue
        p = f'{path}.{names[i]}' if path else names[i]
        seq[i] = ctx.add_unit(p, ctx.layer(p, seq[i], bn=norm, activation=act), 'layer')
        for k in range(i + 1, j + (act is not None)):
            seq[k] = nn.Identity()
        i = j + (act is not None)


def is_activation(module: nn.Module) -> bool:
    """An elementwise activation function module (torch's or mmcv's)."""
    if isinstance(module, nn.MultiheadAttention):
        return False
    mod = type(module).__module__
    return mod == 'torch.nn.modules.activation' or (
        mod.startswith('mmcv.cnn.bricks') and type(module).__name__ in ('Swish', 'HSwish', 'HSigmoid', 'GELU'))


def is_plain_layer(module: nn.Module) -> bool:
    """A Conv2d/Linear that computes exactly F.conv2d/F.linear (not DCN or another subclass).

    mmcv's ``Conv2d`` and ``Linear`` wrappers only add empty-tensor support, so they count as plain.
    """
    return type(module) in (nn.Conv2d, nn.Linear) or (
        isinstance(module, (nn.Conv2d, nn.Linear)) and type(module).__name__ in ('Conv2d', 'Linear')
        and type(module).__module__.startswith('mmcv.cnn.bricks.wrappers'))


@dataclass
class FPLayer:
    """A weight layer in scope that no rule quantized: it runs in FP."""

    name: str
    type: str
    num_weights: int


@dataclass
class ModelPlan:
    """The converted model's units in network execution order, and what in scope stays FP."""

    units: List[Unit]
    uncalled: List[str]
    fp_layers: List[FPLayer] = field(default_factory=list)
    unfolded_norms: List[Tuple[str, str]] = field(default_factory=list)

    def num_weights(self) -> Tuple[int, int]:
        """(quantized weights, FP weights) in scope."""
        quantized = sum(m.weight.numel() for u in self.units for m in u.module.modules() if isinstance(m, QuantLayer))
        return quantized, sum(f.num_weights for f in self.fp_layers)

    def fp_summary(self, max_names: int = 5) -> Optional[str]:
        """One line naming the FP layers with their count and share of the weights; None when there are none."""
        if not self.fp_layers:
            return None
        quantized, fp = self.num_weights()
        types = Counter(f.type for f in self.fp_layers)
        names = ', '.join(f.name for f in self.fp_layers[:max_names])
        more = f' and {len(self.fp_layers) - max_names} more' if len(self.fp_layers) > max_names else ''
        return (f'{len(self.fp_layers)} weight layer(s) in ptq.scope stay FP, no rule quantizes them '
                f'({", ".join(f"{n} {t}" for t, n in types.items())}; {fp} weights, '
                f'{100.0 * fp / max(quantized + fp, 1):.1f}% of the weights in scope): {names}{more}')


AUTO_SCOPE = ('backbone', 'neck')


def scope_paths(model: nn.Module, scope: Sequence[str]) -> Tuple[str, ...]:
    """``ptq.scope`` with ``'auto'`` expanded to the backbone and neck the model has (mmseg models often lack a neck)."""
    children = dict(model.named_children())
    auto = [p for p in AUTO_SCOPE if p in children]
    return tuple(dict.fromkeys(p for path in scope for p in (auto if path == 'auto' else [path])))


def resolve_scope(model: nn.Module, scope: Tuple[str, ...]) -> List[Tuple[str, nn.Module]]:
    """Modules named by ``ptq.scope``; a path that does not exist is an error listing what does."""
    names = dict(model.named_modules())
    paths = scope_paths(model, scope)
    top = sorted(dict(model.named_children()))
    if not paths:
        raise ValueError(f"ptq.scope 'auto' found neither a backbone nor a neck in {type(model).__name__}; "
                         f'name the modules to quantize, top-level modules are {top}')
    for path in paths:
        if path not in names or path == '':
            raise ValueError(f'ptq.scope entry {path!r} matches no module of {type(model).__name__}; '
                             f'top-level modules are {top}')
    return [(path, names[path]) for path in paths]


WEIGHT_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.MultiheadAttention)


def find_fp_layers(model: nn.Module, scope: Sequence[str]) -> List[FPLayer]:
    """Conv/Linear/attention layers (and any other module with a >= 2-D weight) under ``scope`` left in FP."""
    fp: List[FPLayer] = []
    for root in scope_paths(model, scope):
        skip: Tuple[str, ...] = ()
        for name, m in model.get_submodule(root).named_modules(prefix=root):
            if skip and name.startswith(skip):
                continue
            if isinstance(m, QuantLayer) or type(m).__name__ == 'QDQLayer':
                skip = (f'{name}.',)
                continue
            weight = m._parameters.get('weight')
            if isinstance(m, WEIGHT_LAYER_TYPES) or (
                    weight is not None and weight.dim() >= 2 and not isinstance(m, nn.Embedding)):
                recurse = isinstance(m, nn.MultiheadAttention)
                weights = [p for p in m.parameters(recurse=recurse) if p.dim() >= 2]
                fp.append(FPLayer(name, type(m).__name__, sum(p.numel() for p in weights)))
                if recurse:
                    skip = (f'{name}.',)
    return fp


def check_overrides(settings: PTQSettings, layer_paths: Sequence[str], scope: Sequence[str]) -> None:
    """Every ``ptq.overrides`` path must match at least one quantized layer."""
    for ov in settings.overrides:
        if not any(p == ov.prefix or p.startswith(ov.prefix + '.') for p in layer_paths):
            raise ValueError(f'ptq.overrides path {ov.prefix!r} matches no quantized layer in ptq.scope '
                             f'{list(scope)} (e.g. {list(layer_paths[:3])}); use a module path under the scope')


def input_layer_path(model: nn.Module) -> Optional[str]:
    """The network's first layer, the one that sees the image: the first Conv/Linear the model registers.

    OpenMMLab models register the backbone first and every backbone its stem (or patch embedding)
    first, so this is the stem whatever order ``ptq.scope`` lists the modules in.
    """
    layers = (name for name, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))
    return next(layers, None)


def plan_model(model: nn.Module, settings: PTQSettings,
               example_forward: Optional[Callable[[], None]] = None,
               unit_order: Optional[Sequence[str]] = None) -> ModelPlan:
    """Convert the modules in scope in place and order the units as the network calls them.

    Without ``example_forward`` the units follow ``unit_order`` (the order a saved run recorded), else
    their construction order. The method's hooks then give the units their run structure (QwT wraps
    each in ``qwt.Compensated``), so quantizing, resuming and loading a saved model see the same one.
    """
    ctx = PlanContext(settings, input_layer=input_layer_path(model))
    for path, module in resolve_scope(model, settings.scope):
        parent_path, _, name = path.rpartition('.')
        setattr(model.get_submodule(parent_path), name, convert(module, path, ctx))
    if not ctx.units:
        raise ValueError(f'ptq.scope {list(settings.scope)} contains no Conv2d/Linear layer to quantize')
    check_overrides(settings, ctx.layer_paths, scope_paths(model, settings.scope))
    fp_layers = find_fp_layers(model, settings.scope)
    units = list(ctx.units)
    for hook in settings.build_method().build_hooks():
        units = hook.structure(model, units)
    if example_forward is None:
        position = {name: i for i, name in enumerate(unit_order or ())}
        units = sorted(units, key=lambda u: position.get(u.name, len(position)))
        return ModelPlan(units, [], fp_layers, list(ctx.unfolded_norms))
    order: Dict[int, int] = {}
    calls: Counter = Counter()

    def record(module, _args):
        order.setdefault(id(module), len(order))
        calls[id(module)] += 1
    handles = [u.module.register_forward_pre_hook(record) for u in units]
    try:
        with torch.no_grad():
            example_forward()
    finally:
        for h in handles:
            h.remove()
    called = sorted((replace(u, calls=calls[id(u.module)]) for u in units if id(u.module) in order),
                    key=lambda u: order[id(u.module)])
    uncalled = [u.name for u in units if id(u.module) not in order]
    return ModelPlan(called, uncalled, fp_layers, list(ctx.unfolded_norms))
