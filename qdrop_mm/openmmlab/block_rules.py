"""Rules for OpenMMLab module types: ResNet/ResNeXt blocks and stems (mmdet and
mmseg, incl. dilated ResNetV1c), MobileNetV2 inverted residuals, mmcv
ConvModule / DepthwiseSeparableConvModule, FPN, CSPNeXt/CSPDarknet (CSP layers
with their bottlenecks, SPP), YOLOX/CSPNeXt PAFPN, RoI box heads (ConvFCBBoxHead),
the HRNet stem and modules (branch blocks, fuse paths), and the
transformer parts of Swin and MiT: patch embedding/merging, each transformer
block (attention + FFN, called with ``hw_shape``) as one block unit, and on their
own window attention, ``nn.MultiheadAttention`` (q/k/v/out projections
quantized) and FFN / MixFFN. Transformer linears get activation quantizers at
their inputs.
Importing this module registers them.
"""
from __future__ import annotations

import importlib
from contextlib import suppress
from typing import Dict, List, Optional, Tuple

from torch import nn

from qdrop_mm.core import QuantLayer, QuantOutput, QuantResidual
from qdrop_mm.core.placement import block_branch
from qdrop_mm.core.qattention import QuantMultiheadAttention

from .block_plan import (PlanContext, RuleFn, UnsupportedModuleError, convert, is_activation, is_plain_layer,
                         register_rule, rule_for)


def _plain(layer: nn.Module, path: str) -> nn.Module:
    if not is_plain_layer(layer):
        raise UnsupportedModuleError(
            f'{path}: {type(layer).__name__} is not a plain Conv2d/Linear (deformable or custom conv?); '
            f'leave it out of ptq.scope or add a block rule for it')
    return layer


def _layer_unit(parent: nn.Module, name: str, path: str, ctx: PlanContext, **layer_args) -> None:
    """``parent.<name>``, a plain Conv2d/Linear at ``<path>.<name>``, replaced by its layer unit."""
    p = f'{path}.{name}'
    setattr(parent, name, ctx.add_unit(p, ctx.layer(p, _plain(getattr(parent, name), p), **layer_args), 'layer'))


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
    names = ['conv1', 'conv2'] + (['conv3'] if hasattr(block, 'conv3') else [])
    convs = [(f'{path}.{name}', _plain(getattr(block, name), f'{path}.{name}'), getattr(block, f'norm{i}'),
              None if i == len(names) else block.relu) for i, name in enumerate(names, start=1)]
    branch = block_branch(convs, ctx.layer)
    shortcut = _downsample(block.downsample, f'{path}.downsample', ctx)
    unit = QuantResidual(branch, shortcut, block.relu, ctx.out_bits(path), ctx.settings.a_observer)
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
        _layer_unit(backbone, 'conv1', path, ctx, bn=backbone.norm1, activation=backbone.relu)
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
    branch = block_branch([(f'{path}.{name}', cm, None, None) for name, cm in convs],
                          lambda p, cm, _bn, _act, quantize: _conv_module_layer(cm, p, ctx, quantize), residual)
    unit = QuantResidual(branch, None, None, ctx.out_bits(path), ctx.settings.a_observer) if residual else branch
    return ctx.add_unit(path, unit, 'block')


def _fpn(neck: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Lateral convs quantize their outputs; output (and extra) convs keep FP outputs by default."""
    for name, quantize in (('lateral_convs', True), ('fpn_convs', ctx.settings.quantize_fpn_outputs)):
        convs = getattr(neck, name)
        for i, cm in enumerate(convs):
            p = f'{path}.{name}.{i}'
            convs[i] = ctx.add_unit(p, _conv_module_layer(cm, p, ctx, quantize_output=quantize), 'layer')
    return neck


def _conv_like(m: nn.Module, path: str, ctx: PlanContext, quantize_output: bool) -> nn.Module:
    """A ConvModule or DepthwiseSeparableConvModule as quantized layers (no unit declared); the latter converted in
    place: depthwise output quantized, pointwise as asked."""
    if rule_for(m) is not _depthwise_separable_unit:
        return _conv_module_layer(m, path, ctx, quantize_output)
    m.depthwise_conv = _conv_module_layer(m.depthwise_conv, f'{path}.depthwise_conv', ctx, quantize_output=True)
    m.pointwise_conv = _conv_module_layer(m.pointwise_conv, f'{path}.pointwise_conv', ctx, quantize_output)
    return m


def _depthwise_separable_unit(m: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    return ctx.add_unit(path, _conv_like(m, path, ctx, quantize_output=True), 'block')


def _csp_bottleneck(block: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """DarknetBottleneck / CSPNeXtBlock in place: conv1 → conv2 (+ identity), output quantized once."""
    residual = bool(block.add_identity)
    block.conv1 = _conv_like(block.conv1, f'{path}.conv1', ctx, quantize_output=True)
    block.conv2 = _conv_like(block.conv2, f'{path}.conv2', ctx, quantize_output=not residual)
    return QuantOutput(block, ctx.out_bits(path), ctx.settings.a_observer) if residual else block


def _csp_bottleneck_unit(block: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    return ctx.add_unit(path, _csp_bottleneck(block, path, ctx), 'block')


def _csp_layer(layer: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """CSPLayer (CSPNeXt, CSPDarknet, their PAFPNs) as one block unit, converted in place.

    short/main/final convs and every bottleneck output are quantized; with channel attention its
    1x1 conv is quantized (FP output into the hard sigmoid) and the re-weighted features are
    quantized before the final conv.
    """
    layer.short_conv = _conv_like(layer.short_conv, f'{path}.short_conv', ctx, quantize_output=True)
    layer.main_conv = _conv_like(layer.main_conv, f'{path}.main_conv', ctx, quantize_output=True)
    for i, block in enumerate(layer.blocks):
        layer.blocks[i] = _csp_bottleneck(block, f'{path}.blocks.{i}', ctx)
    if getattr(layer, 'channel_attention', False):
        att = layer.attention
        att.fc = ctx.layer(f'{path}.attention.fc', _plain(att.fc, f'{path}.attention.fc'), quantize_output=False)
        layer.attention = QuantOutput(att, ctx.out_bits(path), ctx.settings.a_observer)
    layer.final_conv = _conv_like(layer.final_conv, f'{path}.final_conv', ctx, quantize_output=True)
    return ctx.add_unit(path, layer, 'block')


def _spp_bottleneck(spp: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """SPPBottleneck in place as one block: conv1 → max pools (stay on the grid) → concat → conv2."""
    spp.conv1 = _conv_like(spp.conv1, f'{path}.conv1', ctx, quantize_output=True)
    spp.conv2 = _conv_like(spp.conv2, f'{path}.conv2', ctx, quantize_output=True)
    return ctx.add_unit(path, spp, 'block')


def _pafpn(neck: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """YOLOX / CSPNeXt PAFPN: CSP layers as blocks, convs as layers; output convs keep FP outputs by default."""
    for name in ('reduce_layers', 'top_down_blocks', 'downsamples', 'bottom_up_blocks'):
        ctx.convert_children(getattr(neck, name), f'{path}.{name}')
    for i, conv in enumerate(neck.out_convs):
        p = f'{path}.out_convs.{i}'
        kind = 'block' if rule_for(conv) is _depthwise_separable_unit else 'layer'
        neck.out_convs[i] = ctx.add_unit(p, _conv_like(conv, p, ctx, ctx.settings.quantize_fpn_outputs), kind)
    return neck


def _conv_fc_bbox_head(head: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """RoI box head (ConvFCBBoxHead: Shared2FC, Shared4Conv1FC) in place: its convs (ConvModule rule) and its
    fcs with their ReLU as layer units with quantized outputs; the class and box predictors as layer units
    with FP outputs (they are the head's outputs)."""
    for name in ('shared_convs', 'cls_convs', 'reg_convs'):
        ctx.convert_children(getattr(head, name), f'{path}.{name}')
    for name in ('shared_fcs', 'cls_fcs', 'reg_fcs'):
        fcs = getattr(head, name)
        for i in range(len(fcs)):
            _layer_unit(fcs, str(i), f'{path}.{name}', ctx, activation=nn.ReLU())
    for name in ('fc_cls', 'fc_reg'):
        if getattr(head, name, None) is not None:
            _layer_unit(head, name, path, ctx, quantize_output=False)
    return head


def _hrnet(backbone: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """HRNet: the two stem convs with their BNs folded, then the rest through the walker.

    Branch blocks are ResNet blocks (their rules); transition and fuse layers are Sequentials whose
    conv → BN (→ ReLU) runs become layer units with the BN folded.
    """
    for conv_name, norm_name in (('conv1', backbone.norm1_name), ('conv2', backbone.norm2_name)):
        _layer_unit(backbone, conv_name, path, ctx, bn=getattr(backbone, norm_name), activation=backbone.relu)
        setattr(backbone, norm_name, nn.Identity())
    backbone.relu = nn.Identity()
    ctx.convert_children(backbone, path)
    return backbone


def _hr_module(module: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """An HRNet module: branch blocks by their rules; each fuse path (one branch resampled to another's
    resolution before the sum) is one unit, a block when it stacks several stride-2 convs.

    The module itself is not one unit: it takes and returns a list of tensors, one per branch.
    """
    ctx.convert_children(module.branches, f'{path}.branches')
    for i, row in enumerate(module.fuse_layers or ()):
        for j, fuse in enumerate(row):
            p = f'{path}.fuse_layers.{i}.{j}'
            if fuse is not None:
                row[j] = ctx.block_unit(fuse, p) if i - j >= 2 else convert(fuse, p, ctx)
    return module


def _multihead_attention(mha: nn.MultiheadAttention, path: str, ctx: PlanContext) -> nn.Module:
    """nn.MultiheadAttention → QuantMultiheadAttention; each projection a layer unit with a quantized input.

    q/k/v outputs (the attention matmul inputs) are quantized; the output projection's output stays FP
    (it joins the residual stream).
    """
    def projection(name: str, linear: nn.Linear) -> nn.Module:
        p = f'{path}.{name}'
        layer = ctx.layer(p, linear, quantize_output=name != 'out_proj', quantize_input=True)
        return ctx.add_unit(p, layer, 'layer')
    try:
        return QuantMultiheadAttention(mha, projection)
    except ValueError as err:
        raise UnsupportedModuleError(f'{path}: {err}') from None


def _window_msa(attn: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Swin WindowMSA in place: qkv (quantized input and output) and proj (quantized input) as layer units."""
    for name, out in (('qkv', True), ('proj', False)):
        _layer_unit(attn, name, path, ctx, quantize_output=out, quantize_input=True)
    return attn


def _mlp(seq: nn.Sequential, path: str, ctx: PlanContext) -> nn.Sequential:
    """An MLP Sequential (nested allowed) in place: the first layer quantizes its input, inner layers their
    output after the activation that follows them, the last layer's output stays FP (residual stream)."""
    slots = []

    def collect(s: nn.Module, p: str) -> None:
        for i, (n, m) in enumerate(s.named_children()):
            if isinstance(m, nn.Sequential):
                collect(m, f'{p}.{n}')
            else:
                slots.append((s, i, f'{p}.{n}'))
    collect(seq, path)
    layers = [k for k, (s, i, _) in enumerate(slots) if is_plain_layer(s[i])]
    if not layers:
        raise UnsupportedModuleError(f'{path}: no plain Linear/Conv2d in this MLP')
    for n, k in enumerate(layers):
        s, i, p = slots[k]
        nxt = slots[k + 1] if k + 1 < len(slots) else None
        act = nxt[0][nxt[1]] if nxt is not None and is_activation(nxt[0][nxt[1]]) else None
        s[i] = ctx.layer(p, s[i], activation=act, quantize_output=n < len(layers) - 1, quantize_input=n == 0)
        if act is not None:
            nxt[0][nxt[1]] = nn.Identity()
    return seq


def _ffn(ffn: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """mmcv FFN (Swin) / mmseg MixFFN (MiT): its ``layers`` Sequential as one block unit."""
    ffn.layers = ctx.add_unit(f'{path}.layers', _mlp(ffn.layers, f'{path}.layers', ctx), 'block')
    return ffn


def _patch_embed(pe: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """mmcv PatchEmbed: the projection conv as a layer unit with FP output (a LayerNorm follows)."""
    _layer_unit(pe, 'projection', path, ctx, quantize_output=False)
    return pe


def _patch_merging(pm: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """mmcv PatchMerging: the reduction linear (after a LayerNorm) with a quantized input, FP output."""
    _layer_unit(pm, 'reduction', path, ctx, quantize_output=False, quantize_input=True)
    return pm


def _efficient_mha(attn: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """MiT EfficientMultiheadAttention: the spatial-reduction conv (FP output, a LayerNorm follows) and the
    attention (its projections quantize their inputs)."""
    if getattr(attn, 'sr_ratio', 1) > 1:
        _layer_unit(attn, 'sr', path, ctx, quantize_output=False)
    attn.attn = _multihead_attention(attn.attn, f'{path}.attn', ctx)
    return attn


def _transformer_block(block: nn.Module, path: str, ctx: PlanContext) -> nn.Module:
    """Swin block / MiT TransformerEncoderLayer in place as one block unit, called with (x, hw_shape): its
    attention and FFN converted by their rules above."""
    return ctx.block_unit(block, path)


# The rules of each package, as import batches of (module, {class name: rule}): a batch registers once all its
# classes import, and the first batch that does not import ends its package's registrations.
_PACKAGE_RULES = (
    [[('mmcv.cnn.bricks.transformer', {'FFN': _ffn, 'PatchEmbed': _patch_embed, 'PatchMerging': _patch_merging})]],
    [[('mmcv.cnn', {'ConvModule': _conv_module, 'DepthwiseSeparableConvModule': _depthwise_separable_unit})]],
    [[('mmdet.models.backbones.resnet', {'BasicBlock': _resnet_block, 'Bottleneck': _resnet_block,
                                         'ResNet': _resnet_stem}),
      ('mmdet.models.layers', {'InvertedResidual': _mmdet_inverted_residual}),
      ('mmdet.models.necks', {'FPN': _fpn})],
     [('mmdet.models.roi_heads.bbox_heads', {'ConvFCBBoxHead': _conv_fc_bbox_head})]],
    [[('mmdet.models.layers.csp_layer', {'CSPLayer': _csp_layer, 'DarknetBottleneck': _csp_bottleneck_unit,
                                         'CSPNeXtBlock': _csp_bottleneck_unit}),
      ('mmdet.models.backbones.csp_darknet', {'SPPBottleneck': _spp_bottleneck}),
      ('mmdet.models.necks', {'YOLOXPAFPN': _pafpn, 'CSPNeXtPAFPN': _pafpn}),
      ('mmdet.models.backbones.hrnet', {'HRNet': _hrnet, 'HRModule': _hr_module})],
     [('mmdet.models.backbones.swin', {'WindowMSA': _window_msa, 'SwinBlock': _transformer_block}),
      ('mmdet.models.layers.transformer.utils', {'PatchEmbed': _patch_embed, 'PatchMerging': _patch_merging})]],
    [[('mmseg.models.backbones.resnet', {'BasicBlock': _resnet_block, 'Bottleneck': _resnet_block,
                                         'ResNet': _resnet_stem}),
      ('mmseg.models.utils', {'InvertedResidual': _mmseg_inverted_residual})],
     [('mmseg.models.backbones.hrnet', {'HRNet': _hrnet, 'HRModule': _hr_module})],
     [('mmseg.models.backbones.mit', {'MixFFN': _ffn, 'EfficientMultiheadAttention': _efficient_mha,
                                      'TransformerEncoderLayer': _transformer_block}),
      ('mmseg.models.backbones.swin', {'SwinBlock': _transformer_block})],
     [('mmseg.models.backbones.swin', {'WindowMSA': _window_msa}),
      ('mmseg.models.utils.embed', {'PatchEmbed': _patch_embed, 'PatchMerging': _patch_merging})]],
)


def _import_rules(module: str, rules: Dict[str, RuleFn]) -> List[Tuple[type, RuleFn]]:
    """``from module import <the class names>`` with their rules; ImportError when one is missing."""
    mod = importlib.import_module(module)
    missing = [name for name in rules if not hasattr(mod, name)]
    if missing:
        raise ImportError(f'cannot import name {missing[0]!r} from {module!r}')
    return [(getattr(mod, name), rule) for name, rule in rules.items()]


def register_openmmlab_rules() -> None:
    """Register rules for whichever of mmcv / mmdet / mmseg are installed."""
    register_rule(nn.MultiheadAttention)(_multihead_attention)
    for batches in _PACKAGE_RULES:
        with suppress(ImportError):
            for batch in batches:
                for cls, rule in [pair for module, rules in batch for pair in _import_rules(module, rules)]:
                    register_rule(cls)(rule)


register_openmmlab_rules()
