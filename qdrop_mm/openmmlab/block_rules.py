"""Rules for OpenMMLab module types: ResNet/ResNeXt blocks and stems (mmdet and
mmseg, incl. dilated ResNetV1c), MobileNetV2 inverted residuals, mmcv
ConvModule and FPN. Importing this module registers them.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from qdrop_mm.core import QuantLayer, QuantResidual

from .block_plan import PlanContext, UnsupportedModuleError, convert, is_plain_layer, register_rule


def _plain(layer: nn.Module, path: str) -> nn.Module:
    if not is_plain_layer(layer):
        raise UnsupportedModuleError(
            f'{path}: {type(layer).__name__} is not a plain Conv2d/Linear (deformable or custom conv?); '
            f'leave it out of ptq.scope or add a block rule for it')
    return layer


def _conv_module_layer(cm: nn.Module, path: str, ctx: PlanContext, quantize_output: bool) -> QuantLayer:
    """mmcv ConvModule (conv → norm → act) as one QuantLayer."""
    if tuple(cm.order) != ('conv', 'norm', 'act'):
        raise UnsupportedModuleError(f'{path}: ConvModule order {cm.order} is not supported (need conv, norm, act)')
    if getattr(cm, 'with_explicit_padding', False):
        raise UnsupportedModuleError(f'{path}: ConvModule with explicit padding layer is not supported')
    bn = cm.norm if cm.with_norm else None
    act = cm.activate if cm.with_activation else None
    return ctx.layer(path, _plain(cm.conv, f'{path}.conv'), bn=bn, activation=act, quantize_output=quantize_output)


def _downsample(ds: Optional[nn.Module], path: str, ctx: PlanContext) -> Optional[nn.Module]:
    """ResNet shortcut: None, Sequential(conv, bn) or Sequential(AvgPool, conv, bn) (avg_down)."""
    if ds is None:
        return None
    mods = list(ds.children()) if isinstance(ds, nn.Sequential) else [ds]
    pools = []
    while mods and isinstance(mods[0], (nn.AvgPool2d, nn.MaxPool2d, nn.Identity)):
        pools.append(mods.pop(0))
    if len(mods) not in (1, 2):
        raise UnsupportedModuleError(f'{path}: unexpected shortcut structure {ds}')
    conv = _plain(mods[0], f'{path}.conv')
    ql = ctx.layer(path, conv, bn=mods[1] if len(mods) == 2 else None, quantize_output=False)
    return nn.Sequential(*pools, ql) if pools else ql


def _resnet_block(block: nn.Module, path: str, ctx: PlanContext) -> QuantResidual:
    """BasicBlock / Bottleneck → QuantResidual (branch acts quantized except the last conv)."""
    if getattr(block, 'with_plugins', False) or getattr(block, 'with_dcn', False):
        raise UnsupportedModuleError(f'{path}: ResNet blocks with plugins or DCN are not supported')
    convs = ['conv1', 'conv2'] + (['conv3'] if hasattr(block, 'conv3') else [])
    layers = []
    for i, name in enumerate(convs, start=1):
        last = i == len(convs)
        layers.append(ctx.layer(f'{path}.{name}', _plain(getattr(block, name), f'{path}.{name}'),
                                bn=getattr(block, f'norm{i}'), activation=None if last else block.relu,
                                quantize_output=not last))
    shortcut = _downsample(block.downsample, f'{path}.downsample', ctx)
    unit = QuantResidual(nn.Sequential(*layers), shortcut, block.relu, ctx.out_bits(path), ctx.settings.a_observer)
    return ctx.add_unit(path, unit, 'block')


def _resnet_stem(backbone: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Stem convs one layer at a time, then the residual stages through the walker."""
    if backbone.deep_stem:
        mods = list(backbone.stem.children())
        layers = []
        for i in range(0, len(mods), 3):
            conv, bn, act = mods[i:i + 3]
            p = f'{path}.stem.{i}'
            layers.append(ctx.add_unit(p, ctx.layer(p, _plain(conv, p), bn=bn, activation=act), 'layer'))
        backbone.stem = nn.Sequential(*layers)
    else:
        p = f'{path}.conv1'
        backbone.conv1 = ctx.add_unit(p, ctx.layer(p, _plain(backbone.conv1, p), bn=backbone.norm1,
                                                   activation=backbone.relu), 'layer')
        setattr(backbone, backbone.norm1_name, nn.Identity())
        backbone.relu = nn.Identity()
    for name in backbone.res_layers:
        setattr(backbone, name, convert(getattr(backbone, name), f'{path}.{name}', ctx))
    return backbone


def _conv_module(cm: nn.Module, path: str, ctx: PlanContext) -> QuantLayer:
    return ctx.add_unit(path, _conv_module_layer(cm, path, ctx, quantize_output=True), 'layer')


def _mmdet_inverted_residual(block: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    if block.with_se or not isinstance(block.drop_path, nn.Identity):
        raise UnsupportedModuleError(f'{path}: InvertedResidual with SE or drop path is not supported')
    names = (['expand_conv'] if block.with_expand_conv else []) + ['depthwise_conv', 'linear_conv']
    return _inverted_residual(block, path, ctx, [(n, getattr(block, n)) for n in names], block.with_res_shortcut)


def _mmseg_inverted_residual(block: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    return _inverted_residual(block, path, ctx, [(f'conv.{i}', m) for i, m in enumerate(block.conv)],
                              block.use_res_connect)


def _inverted_residual(block: nn.Module, path: str, ctx: PlanContext, convs, residual: bool) -> nn.Module:
    """MobileNetV2 block: inner conv outputs quantized; the linear conv's output only via the block output."""
    layers = []
    for i, (name, cm) in enumerate(convs):
        last = i == len(convs) - 1
        layers.append(_conv_module_layer(cm, f'{path}.{name}', ctx, quantize_output=not last or not residual))
    branch = nn.Sequential(*layers)
    unit = QuantResidual(branch, None, None, ctx.out_bits(path), ctx.settings.a_observer) if residual else branch
    return ctx.add_unit(path, unit, 'block')


def _fpn(neck: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Lateral convs quantize their outputs; output (and extra) convs keep FP outputs by default."""
    for i, cm in enumerate(neck.lateral_convs):
        p = f'{path}.lateral_convs.{i}'
        neck.lateral_convs[i] = ctx.add_unit(p, _conv_module_layer(cm, p, ctx, quantize_output=True), 'layer')
    for i, cm in enumerate(neck.fpn_convs):
        p = f'{path}.fpn_convs.{i}'
        layer = _conv_module_layer(cm, p, ctx, quantize_output=ctx.settings.quantize_fpn_outputs)
        neck.fpn_convs[i] = ctx.add_unit(p, layer, 'layer')
    return neck


def register_openmmlab_rules() -> None:
    """Register rules for whichever of mmcv / mmdet / mmseg are installed."""
    try:
        from mmcv.cnn import ConvModule
        register_rule(ConvModule)(_conv_module)
    except ImportError:
        pass
    try:
        from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
        from mmdet.models.layers import InvertedResidual
        from mmdet.models.necks import FPN
        register_rule(BasicBlock, Bottleneck)(_resnet_block)
        register_rule(ResNet)(_resnet_stem)
        register_rule(InvertedResidual)(_mmdet_inverted_residual)
        register_rule(FPN)(_fpn)
    except ImportError:
        pass
    try:
        from mmseg.models.backbones.resnet import BasicBlock as SegBasicBlock
        from mmseg.models.backbones.resnet import Bottleneck as SegBottleneck
        from mmseg.models.backbones.resnet import ResNet as SegResNet
        from mmseg.models.utils import InvertedResidual as SegInvertedResidual
        register_rule(SegBasicBlock, SegBottleneck)(_resnet_block)
        register_rule(SegResNet)(_resnet_stem)
        register_rule(SegInvertedResidual)(_mmseg_inverted_residual)
    except ImportError:
        pass


register_openmmlab_rules()
