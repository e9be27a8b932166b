"""``nn.MultiheadAttention`` with quantized projections.

torch's attention reads ``in_proj_weight`` and ``out_proj.weight`` directly, so its projections
cannot be swapped for quantized layers in place. :class:`QuantMultiheadAttention` computes the
same function (eval mode: no dropout) from four :class:`~qdrop_mm.core.qmodules.QuantLayer`
projections, which callers quantize with input quantizers (linear inputs) and quantized q/k/v
outputs (the attention matmul inputs), and returns ``(output, None)``: attention weights are not
materialised.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ProjectionFn = Callable[[str, nn.Linear], nn.Module]


def split_in_projection(mha: nn.MultiheadAttention) -> Tuple[nn.Linear, nn.Linear, nn.Linear]:
    """The packed q/k/v input projection of ``mha`` as three ``nn.Linear`` (copies)."""
    e = mha.embed_dim
    weights = mha.in_proj_weight.split(e) if mha._qkv_same_embed_dim else \
        (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
    return tuple(_linear_copy(w, b) for w, b in zip(weights, biases))


def _linear_copy(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    """A plain ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class QuantMultiheadAttention(nn.Module):
    """Eval-mode ``nn.MultiheadAttention`` computed from separate (quantized) q/k/v/out projections."""

    def __init__(self, mha: nn.MultiheadAttention, make_projection: ProjectionFn) -> None:
        """``make_projection(name, linear)`` turns each of 'q_proj', 'k_proj', 'v_proj', 'out_proj' into its module."""
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError('nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported')
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        for name, linear in zip(('q_proj', 'k_proj', 'v_proj'), split_in_projection(mha)):
            setattr(self, name, make_projection(name, linear))
        self.out_proj = make_projection('out_proj', _linear_copy(mha.out_proj.weight, mha.out_proj.bias))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, n_q, _ = query.shape
        n_k = key.shape[1]
        h = self.num_heads
        q, k, v = (proj(t).reshape(b, t.shape[1], h, -1).transpose(1, 2)
                   for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.reshape(1, 1, n_q, n_k) if mask.dim() == 2 else mask.reshape(b, h, n_q, n_k)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).reshape(b, 1, 1, n_k)
            mask = pad if mask is None else mask + pad
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.out_proj(ctx.transpose(1, 2).reshape(b, n_q, -1))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's masks: bool True = masked out, float = added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float('-inf'))
    return mask.to(dtype)
