"""Export mode: fake-quantized modules rewritten as ONNX QuantizeLinear/DequantizeLinear.

Plain PyTorch, no OpenMMLab imports. :func:`to_qdq` returns a copy of a model
in which every ``QuantLayer`` holds its hardened integer weight and
dequantizes it with a per-channel ``DequantizeLinear`` (axis 0), and every
``LSQActQuantizer`` becomes ``Clip`` → ``QuantizeLinear`` → ``DequantizeLinear``
(per tensor). In PyTorch the copy computes what the fake-quant model computes,
bit for bit; ``torch.onnx.export(..., dynamo=False)`` turns the two autograd
functions below into the ONNX nodes through their ``symbolic`` methods.

How our unsigned grid 0 … 2^b−1 with zero point z is written (exact):

- Value = s·(q − z). With q' = q − z the same value is s·q' with zero point 0,
  and q' lies in [−z, 2^b−1−z]. For b ≤ 7 that interval is inside
  [−127, 127] for every z in [0, 2^b−1], so the tensor is INT8 with zero
  point 0 (TensorRT's form: symmetric INT8, weights in [−127, 127]).
  Activations get a ``Clip`` to [−z·s, (2^b−1−z)·s] before
  ``QuantizeLinear`` so the b-bit range is enforced; weights are constants
  whose integers already lie in it.
- 8-bit grids: INT8 with zero point 0 when it still fits (activations with
  z = 128; weights whose hardened integers all lie in [−127, 127]),
  otherwise UINT8 with the zero point z (valid ONNX, exact in onnxruntime;
  TensorRT accepts only zero point 0). :class:`QDQSummary` lists those.

Placement for integer kernels. Runtimes fuse DequantizeLinear → Conv →
QuantizeLinear into one integer conv (onnxruntime's QLinearConv) only when the
QuantizeLinear follows the Conv directly (at most a Relu/Clip that the
storage range makes redundant). A b-bit grid stored in INT8 needs its own
Clip, so a layer whose activation is ReLU (or none) is written as
Conv → QuantizeLinear (INT8, saturating) → DequantizeLinear → Clip →
QuantizeLinear → DequantizeLinear: rounding before the Clip gives the same
integers because the Clip bounds and 0 (the ReLU) lie on the grid.
Other activations keep activation → Clip → QuantizeLinear → DequantizeLinear.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qdrop_mm.core.adaround import AdaRoundQuantizer
from qdrop_mm.core.lsq import LSQActQuantizer
from qdrop_mm.core.qmodules import QuantLayer, apply_layer

INT8_RANGE = (-128, 127)
INT8_WEIGHT_RANGE = (-127, 127)  # TensorRT's range for INT8 weights
UINT8_RANGE = (0, 255)
ACTIVATION_STORAGE = ('int8', 'uint8')


def _storage_range(dtype: torch.dtype) -> Tuple[int, int]:
    return INT8_RANGE if dtype == torch.int8 else UINT8_RANGE


class _QuantizeDequantize(torch.autograd.Function):
    """Clip (optional) → QuantizeLinear → DequantizeLinear, per tensor, with ONNX semantics in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, clip_lo: Tensor, clip_hi: Tensor,
                clip: bool) -> Tensor:
        if clip:
            x = torch.clamp(x, clip_lo, clip_hi)
        lo, hi = _storage_range(zero_point.dtype)
        z = zero_point.to(x.dtype)
        q = torch.clamp(torch.round(x / scale) + z, lo, hi)
        return (q - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, clip_lo, clip_hi, clip: bool):
        if clip:
            x = g.op('Clip', x, clip_lo, clip_hi)
        q = g.op('QuantizeLinear', x, scale, zero_point)
        return g.op('DequantizeLinear', q, scale, zero_point)


class _RequantizeClip(torch.autograd.Function):
    """QuantizeLinear → DequantizeLinear → Clip → QuantizeLinear → DequantizeLinear, per tensor.

    Equal to Clip → QuantizeLinear → DequantizeLinear when the Clip bounds lie on the grid and inside the
    storage range; the first QuantizeLinear directly after a Conv lets runtimes fuse it into an integer conv.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, clip_lo: Tensor, clip_hi: Tensor) -> Tensor:
        qdq = _QuantizeDequantize.forward  # QuantizeLinear → DequantizeLinear (no Clip)
        x = torch.clamp(qdq(None, x, scale, zero_point, clip_lo, clip_hi, False), clip_lo, clip_hi)
        return qdq(None, x, scale, zero_point, clip_lo, clip_hi, False)

    @staticmethod
    def symbolic(g, x, scale, zero_point, clip_lo, clip_hi):
        q = g.op('QuantizeLinear', x, scale, zero_point)
        x = g.op('Clip', g.op('DequantizeLinear', q, scale, zero_point), clip_lo, clip_hi)
        return g.op('DequantizeLinear', g.op('QuantizeLinear', x, scale, zero_point), scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """DequantizeLinear of an integer weight constant, per output channel (axis 0)."""

    @staticmethod
    def forward(ctx, w_int: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (w_int.dim() - 1)
        return (w_int.to(scale.dtype) - zero_point.to(scale.dtype).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, scale, zero_point):
        return g.op('DequantizeLinear', w_int, scale, zero_point, axis_i=0)


class QDQActivation(nn.Module):
    """Per-tensor activation quantizer in export form: the b-bit grid as INT8/UINT8 plus a Clip."""

    def __init__(self, scale: Tensor, zero_point: Tensor, clip_lo: Tensor, clip_hi: Tensor, clip: bool,
                 bits: int) -> None:
        super().__init__()
        self.register_buffer('scale', scale)
        self.register_buffer('zero_point', zero_point)
        self.register_buffer('clip_lo', clip_lo)
        self.register_buffer('clip_hi', clip_hi)
        self.register_buffer('relu_clip_lo', torch.clamp(clip_lo, min=0.0))  # after a ReLU folded into the Clip
        self.clip = clip
        self.bits = bits

    @classmethod
    def from_quantizer(cls, q: LSQActQuantizer, storage: str = 'int8') -> 'QDQActivation':
        """The exact export form of a calibrated LSQ quantizer's grid s·(clamp(round(x/s)+z, 0, Q) − z).

        ``storage='int8'``: INT8 with zero point 0 where the grid fits (TensorRT), else UINT8 with zero point z.
        ``'uint8'``: always UINT8 with zero point z (the grid as it is: onnxruntime's x86 integer kernels take
        UINT8 activations and convert an INT8 pair only when it has a single consumer).
        """
        if storage not in ACTIVATION_STORAGE:
            raise ValueError(f'activation storage must be one of {ACTIVATION_STORAGE}, got {storage!r}')
        scale = q.scale.detach().float().reshape(())
        z = int(q.zero_point.item())
        lo, hi = -z, q.qmax - z
        if storage == 'int8' and INT8_RANGE[0] <= lo and hi <= INT8_RANGE[1]:
            dtype, stored_zp, full = torch.int8, 0, (lo, hi) == INT8_RANGE
        else:
            dtype, stored_zp, full = torch.uint8, z, q.qmax == UINT8_RANGE[1]
        return cls(scale, torch.tensor(stored_zp, dtype=dtype), lo * scale, hi * scale, clip=not full, bits=q.bits)

    @property
    def storage(self) -> str:
        return 'int8' if self.zero_point.dtype == torch.int8 else 'uint8'

    def forward(self, x: Tensor) -> Tensor:
        return _QuantizeDequantize.apply(x, self.scale, self.zero_point, self.clip_lo, self.clip_hi, self.clip)

    def quantize_after(self, y: Tensor, activation: Optional[nn.Module], requantize: bool = True) -> Tensor:
        """self(activation(y)), written so that a runtime can fuse the QuantizeLinear into the producer of ``y``.

        With ``requantize`` and a ReLU or no activation, the first QuantizeLinear follows ``y`` directly (see the
        module docstring): the ReLU becomes the Clip's lower bound 0, and the Clip is left out when the storage
        range alone gives the grid's range. Otherwise: activation, then Clip → QuantizeLinear → DequantizeLinear.
        """
        relu = isinstance(activation, nn.ReLU)
        if not requantize or (activation is not None and not relu):
            return self(activation(y) if activation is not None else y)
        clip_lo = self.relu_clip_lo if relu else self.clip_lo
        lo, hi = _storage_range(self.zero_point.dtype)
        z = int(self.zero_point)
        if torch.equal(clip_lo, (lo - z) * self.scale) and torch.equal(self.clip_hi, (hi - z) * self.scale):
            return _QuantizeDequantize.apply(y, self.scale, self.zero_point, self.clip_lo, self.clip_hi, False)
        return _RequantizeClip.apply(y, self.scale, self.zero_point, clip_lo, self.clip_hi)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, storage={self.storage}, zero_point={int(self.zero_point)}, clip={self.clip}'


def integer_weight(layer: QuantLayer) -> Tuple[Tensor, Tensor, Tensor]:
    """(integers, scale, zero point) with s·(q − z) equal to the layer's fake-quantized weight.

    INT8 with zero point 0 (q = level − z) whenever the integers fit [−127, 127], else UINT8 levels with
    zero point z.
    """
    wq = layer.weight_quantizer
    levels = wq.integer_weight(layer.weight)
    zp = wq.zero_point.reshape(-1)
    shape = (-1,) + (1,) * (levels.dim() - 1)
    signed = levels - zp.reshape(shape)
    if signed.numel() == 0 or (signed.min() >= INT8_WEIGHT_RANGE[0] and signed.max() <= INT8_WEIGHT_RANGE[1]):
        return signed.to(torch.int8), wq.scale.float().reshape(-1).clone(), torch.zeros_like(zp, dtype=torch.int8)
    return levels.to(torch.uint8), wq.scale.float().reshape(-1).clone(), zp.to(torch.uint8)


class QDQLayer(nn.Module):
    """A QuantLayer in export form: integer weight + DequantizeLinear, conv/linear, activation, output QDQ."""

    def __init__(self, layer: QuantLayer, options: Optional['QDQOptions'] = None, float_weight: bool = False) -> None:
        super().__init__()
        options = options or QDQOptions()
        self.requantize = options.requantize
        wq = layer.weight_quantizer
        if not wq.enabled:
            raise ValueError('weight quantizer is disabled; enable it before export')
        if wq.mode == 'soft':
            raise ValueError('weight rounding is still soft (reconstruction not finished); '
                             'harden it with set_mode("hard") before export')
        w_int, scale, zp = integer_weight(layer)
        self.register_buffer('weight_int', w_int)
        self.register_buffer('weight_scale', scale)
        self.register_buffer('weight_zero_point', zp)
        # float_weight: the same values as an FP32 constant (no DequantizeLinear)
        self.register_buffer('weight_float', _DequantizeWeight.forward(None, w_int, scale, zp).detach()
                             if float_weight else None)
        self.register_buffer('bias', layer.bias.detach().clone())
        self.bits = wq.bits
        self.kind = layer.kind
        if self.kind == 'conv':
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups
        self.norm = copy.deepcopy(getattr(layer, 'norm', None))
        self.activation = copy.deepcopy(layer.activation)
        self.act_quantizer = act_export_form(layer.act_quantizer, options.activation_storage)
        if getattr(layer, 'input_quantizer', None) is not None:
            self.input_quantizer = act_export_form(layer.input_quantizer, options.activation_storage)

    @property
    def storage(self) -> str:
        if self.weight_float is not None:
            return 'float'
        return 'int8' if self.weight_int.dtype == torch.int8 else 'uint8'

    def dequantized_weight(self) -> Tensor:
        if self.weight_float is not None:
            return self.weight_float
        return _DequantizeWeight.apply(self.weight_int, self.weight_scale, self.weight_zero_point)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.act_quantizer, QDQActivation):
            return apply_layer(self, x, self.dequantized_weight())
        # apply_layer with the output quantizer in its fusable placement (QDQActivation.quantize_after)
        if getattr(self, 'input_quantizer', None) is not None:
            x = self.input_quantizer(x)
        weight = self.dequantized_weight()
        if self.kind == 'conv':
            y = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.linear(x, weight, self.bias)
        if self.norm is not None:
            y = self.norm(y)
        return self.act_quantizer.quantize_after(y, self.activation, self.requantize)

    def extra_repr(self) -> str:
        return f'{self.kind}, bits={self.bits}, storage={self.storage}, weight={tuple(self.weight_int.shape)}'


def act_export_form(q: Optional[LSQActQuantizer], storage: str = 'int8') -> Optional[nn.Module]:
    """The export replacement of an activation quantizer: QDQ, or None/Identity where it passes x through."""
    if q is None:
        return None
    if not q.enabled:
        return nn.Identity()
    if not q.is_calibrated:
        raise ValueError('an enabled activation quantizer is not calibrated: export a quantized model '
                         '(after run_ptq or loading quantized.pth)')
    if q.drop_prob < 1.0:
        raise ValueError(f'activation quantizer has drop_prob={q.drop_prob} (QDrop training mode); '
                         f'set drop_prob=1.0 to export the deployed model')
    return QDQActivation.from_quantizer(q, storage)


@dataclass(frozen=True)
class QDQOptions:
    """How :func:`to_qdq` writes the quantizers (all choices give the same values).

    ``requantize``: each layer's output QuantizeLinear directly after its conv/linear where the activation
    allows it (ReLU or none), so runtimes fuse integer kernels; ``False``: activation → Clip → Q → DQ.
    ``activation_storage``: ``'int8'`` (zero point 0 where the grid fits: TensorRT) or ``'uint8'`` (zero point
    z: onnxruntime's x86 CPU kernels, which take UINT8 activations). ``float_weights``: layers whose
    (fake-quantized) weights are written as FP32 constants with their exact values, e.g. an 8-bit stem whose
    two-sided grid needs a UINT8 zero point and whose input is not quantized anyway (see ``prepare_export``).
    """

    requantize: bool = True
    activation_storage: str = 'int8'
    float_weights: FrozenSet[str] = frozenset()  # layer paths whose weights are written as FP32 constants

    def __post_init__(self) -> None:
        if self.activation_storage not in ACTIVATION_STORAGE:
            raise ValueError(f'activation storage must be one of {ACTIVATION_STORAGE}, '
                             f'got {self.activation_storage!r}')


@dataclass
class QDQSummary:
    """What :func:`to_qdq` wrote: per quantized tensor its module path, bits and INT8/UINT8 storage."""

    weights: List[Tuple[str, int, str]] = field(default_factory=list)
    activations: List[Tuple[str, int, str]] = field(default_factory=list)

    @property
    def uint8_tensors(self) -> List[str]:
        """UINT8 tensors (8-bit grids that do not fit INT8 with zero point 0, or UINT8 activations by choice):
        not TensorRT-consumable."""
        return [name for name, _, storage in self.weights + self.activations if storage == 'uint8']

    def describe(self) -> str:
        w = Counter(storage for _, _, storage in self.weights)
        a = Counter(storage for _, _, storage in self.activations)
        return (f'{len(self.weights) - w["float"]} weight DequantizeLinear (per channel; {w["int8"]} INT8, '
                f'{w["uint8"]} UINT8), {w["float"]} FP32 weight constant(s), {len(self.activations)} activation '
                f'Quantize/DequantizeLinear pairs (per tensor; {a["int8"]} INT8, {a["uint8"]} UINT8)')


def _convert_children(module: nn.Module, prefix: str, summary: QDQSummary, options: QDQOptions) -> None:
    for name, child in list(module.named_children()):
        path = f'{prefix}.{name}' if prefix else name
        if isinstance(child, QuantLayer):
            setattr(module, name, _export_layer(child, path, summary, options))
        elif isinstance(child, LSQActQuantizer):
            try:
                new = act_export_form(child, options.activation_storage)
            except ValueError as err:
                raise ValueError(f'{path}: {err}') from None
            setattr(module, name, new)
            if isinstance(new, QDQActivation):
                summary.activations.append((path, new.bits, new.storage))
        elif isinstance(child, AdaRoundQuantizer):
            raise ValueError(f'{path}: a weight quantizer outside a QuantLayer cannot be exported')
        else:
            _convert_children(child, path, summary, options)


def _export_layer(layer: QuantLayer, path: str, summary: QDQSummary, options: QDQOptions) -> nn.Module:
    try:
        new = QDQLayer(layer, options, float_weight=path in options.float_weights)
    except ValueError as err:
        raise ValueError(f'{path or type(layer).__name__}: {err}') from None
    summary.weights.append((path, new.bits, new.storage))
    for attr in ('input_quantizer', 'act_quantizer'):
        q = getattr(new, attr, None)
        if isinstance(q, QDQActivation):
            summary.activations.append((f'{path}.{attr}' if path else attr, q.bits, q.storage))
    return new


def to_qdq(model: nn.Module, options: Optional[QDQOptions] = None) -> Tuple[nn.Module, QDQSummary]:
    """A copy of ``model`` in export form (the model itself is untouched) and what was converted.

    ``options`` (:class:`QDQOptions`) choose the Q/DQ placement and the activation storage; every choice
    computes the same values.

    Raises ``ValueError`` naming the module when a quantizer is not in a deployable state
    (soft rounding, uncalibrated or dropping activation quantizer, disabled weight quantizer).
    """
    options = options or QDQOptions()
    exported = copy.deepcopy(model)
    summary = QDQSummary()
    if isinstance(exported, QuantLayer):
        return _export_layer(exported, '', summary, options), summary
    _convert_children(exported, '', summary, options)
    return exported, summary
