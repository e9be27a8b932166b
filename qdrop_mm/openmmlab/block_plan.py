"""Block plan: turn the modules in scope into quantized reconstruction units.

A rule (see ``block_rules.py``) is registered for a module type and turns one module into its
quantized replacement, declaring the reconstruction units it creates. The
walker visits the modules under the configured scope (backbone and neck by
default); a module without a rule is searched for children, and any
remaining Conv2d/Linear becomes a layer-wise unit (the fallback).

Activation quantizers follow the QDrop spec: on every inner conv(+act)
output except a block's last conv and its shortcut, on block outputs and on
stand-alone layers; FPN output convs keep FP outputs so the heads see FP
features (configurable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from qdrop_mm.core import QuantLayer, QuantResidual, Unit
from qdrop_mm.core.methods import CompensationConfig
from qdrop_mm.core.quant_state import weight_quantizers
from qdrop_mm.core.qwt import Compensated, wrap_unit

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


def find_rule(module: nn.Module) -> Optional[RuleFn]:
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


class UnsupportedModuleError(ValueError):
    """A module in the quantization scope cannot be converted faithfully."""


@dataclass
class PlanContext:
    """What rules need while converting: settings, the units found so far, bit choice.

    With ``compensation`` (a QwT method) every unit is wrapped in ``qwt.Compensated`` as it is
    declared, so quantizing, resuming and loading a saved model all see the same structure.
    """

    settings: PTQSettings
    units: List[Unit] = field(default_factory=list)
    compensation: Optional[CompensationConfig] = None
    _first_layer_done: bool = False

    def layer(self, path: str, layer: nn.Module, bn: Optional[nn.Module] = None,
              activation: Optional[nn.Module] = None, quantize_output: bool = True) -> QuantLayer:
        """A QuantLayer with this path's bits; the first one created is the network's first layer."""
        first = not self._first_layer_done
        self._first_layer_done = True
        w_bits, a_bits = self.settings.bits_for(path, first_layer=first)
        if bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModuleError(f'{path}: only BatchNorm can be folded, found {type(bn).__name__}')
        return QuantLayer(layer, w_bits, bn=bn, activation=activation,
                          a_bits=a_bits if quantize_output else None,
                          w_observer=self.settings.w_observer, a_observer=self.settings.a_observer)

    def out_bits(self, path: str) -> int:
        return self.settings.bits_for(path, first_layer=False)[1]

    def add_unit(self, path: str, module: nn.Module, kind: str) -> nn.Module:
        if self.compensation is not None:
            module = wrap_unit(module, self.compensation.placement)
        self.units.append(Unit(path, module, kind))
        return module

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = convert(child, f'{path}.{name}' if path else name, self)
            if new is not child:
                setattr(module, name, new)


def convert(module: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Quantized replacement of ``module`` (or the module itself, converted in place)."""
    rule = find_rule(module)
    if rule is not None:
        return rule(module, path, ctx)
    if is_plain_layer(module):
        return ctx.add_unit(path, ctx.layer(path, module), 'layer')
    if isinstance(module, (QuantLayer, QuantResidual, Compensated)):
        return module
    ctx.convert_children(module, path)
    return module


def is_plain_layer(module: nn.Module) -> bool:
    """A Conv2d/Linear that computes exactly F.conv2d/F.linear (not DCN or another subclass).

    mmcv's ``Conv2d`` wrapper only adds empty-tensor support, so it counts as plain.
    """
    if type(module) in (nn.Conv2d, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and type(module).__name__ == 'Conv2d'
            and type(module).__module__.startswith('mmcv.cnn.bricks.wrappers'))


@dataclass
class ModelPlan:
    """The converted model's units in network execution order."""

    units: List[Unit]
    uncalled: List[str]

    def weight_bits(self) -> Dict[str, int]:
        return {u.name: sorted({q.bits for q in weight_quantizers(u.module)}) for u in self.units}


def resolve_scope(model: nn.Module, scope: Tuple[str, ...]) -> List[Tuple[str, nn.Module]]:
    """Modules named by ``ptq.scope``; a path that does not exist is an error listing what does."""
    found = []
    names = dict(model.named_modules())
    for path in scope:
        if path not in names or path == '':
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(f'ptq.scope entry {path!r} matches no module of {type(model).__name__}; '
                             f'top-level modules are {top}')
        found.append((path, names[path]))
    return found


def plan_model(model: nn.Module, settings: PTQSettings,
               example_forward: Optional[Callable[[], None]] = None) -> ModelPlan:
    """Convert the modules in scope in place and order the units as the network calls them.

    Without ``example_forward`` the units keep their construction order (enough to load a saved model).
    """
    ctx = PlanContext(settings, compensation=settings.build_method().compensation)
    for path, module in resolve_scope(model, settings.scope):
        parent_path, _, name = path.rpartition('.')
        parent = model.get_submodule(parent_path) if parent_path else model
        new = convert(module, path, ctx)
        if new is not module:
            setattr(parent, name, new)
    if not ctx.units:
        raise ValueError(f'ptq.scope {list(settings.scope)} contains no Conv2d/Linear layer to quantize')
    if example_forward is None:
        return ModelPlan(list(ctx.units), [])
    order: Dict[int, int] = {}
    handles = [u.module.register_forward_pre_hook(_first_call_recorder(order, id(u.module))) for u in ctx.units]
    try:
        with torch.no_grad():
            example_forward()
    finally:
        for h in handles:
            h.remove()
    called = [u for u in ctx.units if id(u.module) in order]
    called.sort(key=lambda u: order[id(u.module)])
    uncalled = [u.name for u in ctx.units if id(u.module) not in order]
    return ModelPlan(called, uncalled)


def _first_call_recorder(order: Dict[int, int], key: int):
    def hook(_m, _args):
        order.setdefault(key, len(order))
    return hook
