"""Adapters on a frozen dense model, as PEFT computes them: LoRA and (IA)³ (config.adapter).

LoRA (Hu et al., 2021) adds a low-rank update to each targeted projection, y = W x + s B A x with
s = lora_alpha / lora_rank; B starts at zero, so a new adapter is the model itself. (IA)³ (Liu et
al., 2022) rescales elementwise: the output of q/k/v (y = l * W x, before any norm or RoPE, as PEFT
scales the projection's output) or the input of down_proj (y = W (l * x), PEFT's feedforward
module), vectors starting at one. Both are what PEFT's LoraLayer / IA3Layer compute for a
`nn.Linear`, so an adapter written by bam/formats/peft.py gives the same function in PEFT.

bam fuses the FFN's gate and up projections into one gate_up_proj [2F, D]; PEFT's LoRA on
Llama's separate gate_proj and up_proj is two A/B pairs. They are kept as two pairs, stacked:
A [2, r, D], B [2, F, r]. The update is block-structured, [B_g A_g; B_u A_u] x: one matmul gives
both halves' A x ([.., 2r]), one batched matmul their B (A x), with no zero blocks stored or
computed, and each pair maps one to one onto PEFT's.

The tensors are an `Adapter` module of each sublayer (attn.adapter, ffn.adapter), after the
sublayer's own tensors, named and shaped by the layout table (bam/modeling/layout.py
adapter_shapes). A model without an adapter has no Adapter module and computes exactly what it did.

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from bam.modeling.config import BamConfig
from bam.modeling.layout import adapter_shapes


class Adapter(nn.Module):
    """The adapter tensors of one sublayer ('attn' or 'ffn'), and the updates they make."""

    def __init__(self, config: BamConfig, sublayer: str):
        super().__init__()
        self.kind = config.adapter
        self.scaling = config.lora_alpha / config.lora_rank if self.kind == "lora" else None
        for name, shape in adapter_shapes(config, sublayer):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def reset_parameters(self) -> None:
        """PEFT's initialisation: A as nn.Linear's weights (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(I))),
        B zero, (IA)³ vectors one; so the adapted model starts as the model itself."""
        for name, param in self.named_parameters():
            if name.endswith("_lora_A"):  # (the fused pair [2, r, D]: each half's fan-in is D)
                bound = 1 / math.sqrt(param.shape[-1])
                init.uniform_(param, -bound, bound)
            elif name.endswith("_lora_B"):
                init.zeros_(param)
            else:
                init.ones_(param)

    def output(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Projection `name`'s output y = W x, adapted: y + s B A x (LoRA), or l * y ((IA)³ of q/k/v)."""
        if self.kind == "lora":
            a = getattr(self, f"{name}_lora_A", None)
            return y if a is None else y + self.lora_update(x, a, getattr(self, f"{name}_lora_B"))
        scale = self.output_scale(name)
        return y if scale is None else y * scale

    def input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Projection `name`'s input, adapted: (IA)³ rescales down_proj's (PEFT's feedforward module)."""
        scale = getattr(self, f"{name}_ia3", None) if self.kind == "ia3" else None
        return x if scale is None else x * scale

    def lora_update(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """s B A x for one LoRA pair, or for the fused gate_up_proj's two (a [2, r, I], b [2, O, r])."""
        # (s scales A x, r wide, rather than the output: one small tensor more, not one of x's size)
        if a.dim() == 2:
            return F.linear(F.linear(x, a) * self.scaling, b)
        # the fused gate_up_proj: pair p's A x is columns p*r.. of one matmul, its B (A x) the
        # rows p*F.. of the output (gate rows first)
        pieces, r = a.shape[0], a.shape[1]
        ax = F.linear(x, a.reshape(pieces * r, -1)).unflatten(-1, (pieces, r)) * self.scaling
        return torch.einsum("...pr,pfr->...pf", ax, b).flatten(-2)

    def output_scale(self, name: str) -> torch.Tensor | None:
        """(IA)³'s vector on projection `name`'s output ([O], or [E, O] for adapter experts), if any:
        q/k/v have one; down_proj's rescales its input instead."""
        return None if name == "down_proj" or self.kind != "ia3" else getattr(self, f"{name}_ia3", None)

    # Adapter experts (config.adapter_experts): each tensor holds one adapter per expert along dim 0,
    # and expert j's projection is the seed's, W x, adapted by adapter j. The seed's W x is computed
    # once for every token (y below); only the low-rank or vector updates are per expert. Every
    # expert's update is one matmul over the experts' A (or B) side by side, or block-diagonal where
    # each expert's must stay apart: E times the FLOPs of those small matmuls, but no batched matmul,
    # whose expert-major operands would be permuted copies of the activations, saved for backward.

    def expert_outputs(self, name: str, x_NI: torch.Tensor, y_NO: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Every expert's output of projection `name` for shared inputs x, [N, E, O]: y + s B_j A_j x,
        or l_j * y; y itself for each expert when the projection has no adapter."""
        if self.kind == "lora" and hasattr(self, f"{name}_lora_A"):
            a_ERI, b_EOR = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            ax_NX = F.linear(x_NI, a_ERI.flatten(0, 1)) * self.scaling  # X = E*r: every expert's A x at once
            return y_NO[:, None] + F.linear(ax_NX, torch.block_diag(*b_EOR)).unflatten(-1, (n_experts, -1))
        scale_EO = self.output_scale(name)
        if scale_EO is not None:
            return y_NO[:, None] * scale_EO
        return y_NO[:, None].expand(-1, n_experts, -1)

    def mixed_output(self, name: str, x_NI: torch.Tensor, y_NO: torch.Tensor, gates_NE: torch.Tensor) -> torch.Tensor:
        """The output of one projection whose update is the gate-weighted sum of the experts' (MoLoRA,
        MoV): y + s sum_j g_j B_j A_j x, or (sum_j g_j l_j) * y; the gates sum to 1."""
        if self.kind == "lora" and hasattr(self, f"{name}_lora_A"):
            a_ERI, b_EOR = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
            ax_NER = F.linear(x_NI, a_ERI.flatten(0, 1)).unflatten(-1, a_ERI.shape[:2])
            ax_NER = ax_NER * (gates_NE[..., None] * self.scaling)
            return y_NO + F.linear(ax_NER.flatten(1), b_EOR.transpose(0, 1).flatten(1))
        scale_EO = self.output_scale(name)
        return y_NO if scale_EO is None else y_NO * (gates_NE @ scale_EO)

    def summed_output(self, name: str, x_NEI: torch.Tensor, y_NO: torch.Tensor) -> torch.Tensor:
        """y + s sum_j B_j A_j x_j, expert j's update applied to its own input x_j: the output
        projection of gated attention experts, y = W sum_j x_j (W is linear, so computed once)."""
        if self.kind != "lora" or not hasattr(self, f"{name}_lora_A"):
            return y_NO
        a_ERI, b_EOR = getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")
        ax_NX = F.linear(x_NEI.flatten(1), torch.block_diag(*a_ERI)) * self.scaling  # expert j's A on its x_j
        return y_NO + F.linear(ax_NX, b_EOR.transpose(0, 1).flatten(1))

    def expert_update(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor | None:
        """Expert e's LoRA update s B_e A_e x of projection `name`, or None (no LoRA on it)."""
        if self.kind != "lora" or not hasattr(self, f"{name}_lora_A"):
            return None
        return self.lora_update(x, getattr(self, f"{name}_lora_A")[e], getattr(self, f"{name}_lora_B")[e])

    def expert_input(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `name`'s input for expert e: (IA)³ rescales down_proj's by l_e."""
        scale = getattr(self, f"{name}_ia3", None) if self.kind == "ia3" else None
        return x if scale is None else x * scale[e]
