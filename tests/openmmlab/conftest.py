"""Shared helpers for the OpenMMLab tests: build models from our configs, make random checkpoints."""
import os.path as osp

import torch
from torch import nn

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def build_model_from_config(config: str, cfg_options: dict = None):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(osp.join(REPO, config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize_bn(model)
    return cfg, model.eval()


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-degenerate BN (mmdet zero-initialises the last BN of each residual branch)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) * 0.8 + 0.4)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def save_random_checkpoint(config: str, path: str, cfg_options: dict = None) -> str:
    torch.manual_seed(0)
    _, model = build_model_from_config(config, cfg_options)
    torch.save({'state_dict': model.state_dict(), 'meta': {'note': 'random weights for tests'}}, path)
    return path
