"""The normalization of every block, of the final hidden state, and of queries and keys (qk_norm).

RMSNorm or LayerNorm (with or without a bias), computed in fp32, with Gemma's weight offset as an
option; one class, so every family's norm is the same module with config options.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bam.modeling.config import BamConfig


class Norm(nn.Module):
    """RMSNorm (Llama) or LayerNorm, without bias (Cohere) or with one (`norm_bias`, GPT-NeoX), over
    the last dim, computed in fp32.

    With a `shape` it is a query or key norm of `qk_norm`, one weight per attention expert stored
    stacked as one 1-D tensor and viewed as `shape` to broadcast: (E, 1, A) over x [..., E, heads, A]
    per head (Qwen3), (E, H*A) over x [..., E, H*A] for all heads together (OLMo 2).
    With `norm_weight_offset` (Gemma: 1.0) the factor is offset + weight, formed and applied in fp32
    before the cast back, in Gemma's order.
    """

    def __init__(self, config: BamConfig, shape: tuple[int, ...] | None = None):
        super().__init__()
        self.kind = config.norm
        self.eps = config.norm_eps
        self.weight_offset = config.norm_weight_offset
        self.weight = nn.Parameter(torch.ones(math.prod(shape) if shape else config.hidden_size))
        self.weight_shape = shape
        # LayerNorm's bias (norm_bias, GPT-NeoX): on the block and final norms, never a q/k norm
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if config.norm_bias and shape is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        weight = self.weight if self.weight_shape is None else self.weight.view(self.weight_shape)
        if self.weight_offset:  # (never with a bias: config.validate)
            return (x32 * (self.weight_offset + weight.float())).to(x.dtype)
        if self.bias is not None:
            return torch.addcmul(self.bias, weight, x32.to(x.dtype))
        return weight * x32.to(x.dtype)
