"""FFN experts: the routers, dropless dispatch, the shared expert and the auxiliary losses.

Two router kinds compute the logits over the E routed experts; top-k and gating are then the same:
- linear (METHOD.md 3.1): `logits = W h`, W a learned [E, D] matrix.
- nexus (METHOD.md 3.3): `logits = h . e_i` with expert embeddings `e_i = W2 SwiGLU(W1 d_i)`
  projected from fixed per-domain embeddings d_i, so adding an expert later needs no new router
  weights, only its domain embedding.
An optional always-on shared expert (Nexus: the seed's FFN) is added to the routed output:
`y = FFN_shared(h) + sum_k gate_k * FFN_{e_k}(h)`. The load-balancing and z losses see the routed
experts only; the shared expert takes every token by construction.

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers.activations import ACT2FN

from bam.modeling.adapters import Adapter
from bam.modeling.config import BamConfig


def load_balancing_loss(probs_TE: torch.Tensor, expert_index_TK: torch.Tensor,
                        counts_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss `N * sum_i f_i * P_i`.

    f_i is the share of the T*K dispatched (token, slot) pairs that go to expert i, so the loss is
    1.0 at perfect balance for every K (Mixtral counts per slot and gets K instead; normalising
    keeps one coefficient meaningful across top-k settings). `counts_E`, the pairs per expert, can
    be passed when the dispatch already counted them.
    """
    n_experts = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = expert_counts(expert_index_TK, n_experts)
    fraction_E = counts_E.to(probs_TE.dtype) / expert_index_TK.numel()
    return n_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


def expert_counts(expert_index_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many (token, slot) pairs each expert receives, [E]."""
    return torch.bincount(expert_index_TK.flatten(), minlength=n_experts)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@dataclass
class Routing:
    """What a router decided for one layer: enough to dispatch, compute losses and plot."""

    logits_TE: torch.Tensor  # fp32
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    expert_index_TK: torch.Tensor
    gate_TK: torch.Tensor


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """`p = softmax(logits)`, top-k; gates are p of the selected experts, optionally renormalized.

    Renormalizing the top-k probabilities equals a softmax over the top-k logits (Mixtral's rule);
    with top-1 it makes the gate 1 and the router gets no gradient, hence BAM's unnormalized default.
    """
    probs_TE = logits_TE.softmax(dim=-1)
    gate_TK, expert_index_TK = probs_TE.topk(top_k, dim=-1)
    if renormalize:
        gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True)
    return Routing(logits_TE, probs_TE, expert_index_TK, gate_TK)


class LinearRouter(nn.Module):
    """`logits = W h` with a learned W [E, D]; computed in fp32 whatever the activation dtype."""

    def __init__(self, config: BamConfig):
        super().__init__()
        self.top_k = config.ffn_top_k
        self.renormalize = config.ffn_renormalize
        self.weight = nn.Parameter(torch.empty(config.n_ffn_experts, config.hidden_size))

    def forward(self, h_TD: torch.Tensor) -> Routing:
        logits_TE = fp32_linear(h_TD, self.weight)
        return route(logits_TE, self.top_k, self.renormalize)


class NexusRouter(nn.Module):
    """`logits_i = h . e_i`, `e_i = W2 SwiGLU(W1 d_i)` (METHOD.md 3.3); fp32 like the linear router.

    `domain_embeddings` [E, M] holds one fixed vector per routed expert (bam.mix.nexus computes them).
    It is a parameter, not a buffer, so that checkpoints, `load_model` and transformers'
    `from_pretrained` store and restore it like every other tensor; it is created frozen and is
    detached in forward, so it never receives a gradient even when a trainer unfreezes every
    parameter (AdamW skips parameters without a gradient, weight decay included). The projection
    (`gate_up_proj` = W1 [2P, M], gate rows first as in the experts; `down_proj` = W2 [D, P]) is
    shared by all experts and trained: its size does not depend on E, and a new expert needs only
    a new row of `domain_embeddings`.
    """

    def __init__(self, config: BamConfig):
        super().__init__()
        self.top_k = config.ffn_top_k
        self.renormalize = config.ffn_renormalize
        m, p, d = config.nexus_embed_dim, config.nexus_hidden_dim, config.hidden_size
        self.domain_embeddings = nn.Parameter(torch.empty(config.n_ffn_experts, m), requires_grad=False)
        self.gate_up_proj = nn.Parameter(torch.empty(2 * p, m))
        self.down_proj = nn.Parameter(torch.empty(d, p))

    def expert_embeddings(self) -> torch.Tensor:
        """e_i for every expert, [E, D] in fp32: computed once per forward, for all tokens."""
        gate_EP, up_EP = fp32_linear(self.domain_embeddings.detach(), self.gate_up_proj).chunk(2, dim=-1)
        return fp32_linear(F.silu(gate_EP) * up_EP, self.down_proj)

    def forward(self, h_TD: torch.Tensor) -> Routing:
        logits_TE = fp32_linear(h_TD, self.expert_embeddings())
        return route(logits_TE, self.top_k, self.renormalize)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T in fp32 even under autocast: router logits, their softmax and the z-loss are
    where bf16's 8-bit mantissa flips expert choices and overflows exp()."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def activation(name: str):
    """The gated MLP's activation `config.hidden_act`: F.silu itself for 'silu' (today's op, no module
    call in the hot path), else transformers' own ACT2FN[name] (Gemma's gelu_pytorch_tanh)."""
    return F.silu if name == "silu" else ACT2FN[name]


def mlp(x: torch.Tensor, in_proj: torch.Tensor, down: torch.Tensor, act=F.silu, gated: bool = True,
        in_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One FFN, down [D, F]: gated, `down (act(gate x) * up x)` with `in_proj` = [gate; up] stacked
    as [2F, D] (SwiGLU with silu, GeGLU with a GELU), or not (GPT-NeoX), `down act(up x)` with
    `in_proj` = up [F, D]; biases (ffn_bias) added after each matmul."""
    return F.linear(ffn_hidden(F.linear(x, in_proj, in_bias), act, gated), down, down_bias)


def ffn_hidden(h: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """The FFN's hidden activations from its input projection's output: act(gate) * up, or act(up)."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects stride-0 gradients (e.g. from `out.sum().backward()`).
    return grad.contiguous()


def grouped_matmul(x_TI: torch.Tensor, weight_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of x are sorted by expert; row block e (ending at offsets_E[e]) is multiplied by weight[e]^T."""
    if x_TI.requires_grad:
        x_TI.register_hook(_contiguous_grad)
    out_TO = F.grouped_mm(x_TI, weight_EOI.transpose(1, 2), offs=offsets_E)
    if out_TO.requires_grad:
        out_TO.register_hook(_contiguous_grad)
    return out_TO


def _grouped_mm_usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned strides and a dtype/device its kernels support."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    align = 16 // x.element_size()
    return all(dim % align == 0 for w in weights for dim in w.shape[1:])


class FFNParameters(nn.Module):
    """The tensors of one FFN, or of E stacked along a leading dim (`experts` = (E,)), in the
    layout's order (bam/modeling/layout.py): the input projection, `gate_up_proj` [..., 2F, D] (gate
    rows first) of a gated MLP or `up_proj` [..., F, D] with ffn_gated=False (GPT-NeoX), `down_proj`
    [..., D, F], then with ffn_bias their biases `gate_up_proj_bias` / `up_proj_bias` [..., 2F or F]
    and `down_proj_bias` [..., D]. The activation is config.hidden_act."""

    def __init__(self, config: BamConfig, *experts: int):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gated = config.ffn_gated
        self.act = activation(config.hidden_act)
        self.in_name = "gate_up_proj" if self.gated else "up_proj"
        in_width = 2 * f if self.gated else f
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(*experts, in_width, d)))
        self.down_proj = nn.Parameter(torch.empty(*experts, d, f))
        for name, width in ((self.in_name + "_bias", in_width), ("down_proj_bias", d)):
            self.register_parameter(name, nn.Parameter(torch.empty(*experts, width)) if config.ffn_bias else None)

    @property
    def in_proj(self) -> nn.Parameter:
        return getattr(self, self.in_name)

    @property
    def in_proj_bias(self) -> nn.Parameter | None:
        return getattr(self, self.in_name + "_bias")


class FFNExperts(FFNParameters):
    """E FFNs stored as 3-D tensors (the layout of transformers' Mixtral, gate rows first): SwiGLU
    unless config.hidden_act names another activation (GeGLU for Gemma), or non-gated (GPT-NeoX)."""

    def __init__(self, config: BamConfig, n_experts: int):
        super().__init__(config, n_experts)
        self.dispatch = config.expert_dispatch

    def dense(self, h_TD: torch.Tensor, adapter: Adapter | None = None) -> torch.Tensor:
        """Run every token through the only expert: the dense model's FFN, with `adapter`'s updates
        (LoRA on gate_up_proj and down_proj, (IA)³ on down_proj's input) when there is one."""
        # squeeze(0) is a view, whose backward is free; indexing [0] would build a zero gradient
        # of the whole [1, 2F, D] tensor and copy into it, one more pass over the weights.
        in_bias, down_bias = self.in_proj_bias, self.down_proj_bias
        if in_bias is not None:
            in_bias, down_bias = in_bias.squeeze(0), down_bias.squeeze(0)
        in_proj, down = self.in_proj.squeeze(0), self.down_proj.squeeze(0)
        if adapter is None:
            return mlp(h_TD, in_proj, down, self.act, self.gated, in_bias, down_bias)
        proj = adapter.output(self.in_name, h_TD, F.linear(h_TD, in_proj, in_bias))
        hidden = adapter.input("down_proj", ffn_hidden(proj, self.act, self.gated))
        return adapter.output("down_proj", hidden, F.linear(hidden, down, down_bias))

    def forward(self, h_TD: torch.Tensor, expert_index_TK: torch.Tensor, gate_TK: torch.Tensor,
                counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """Dropless: every (token, slot) pair is computed; output is sum_k gate_k * FFN_{e_k}(h).

        `counts_E` (pairs per expert, `expert_counts`) is computed here unless the caller has it.
        """
        n_tokens, top_k = expert_index_TK.shape
        in_proj, in_bias, down_bias = self.in_proj, self.in_proj_bias, self.down_proj_bias
        n_experts = in_proj.shape[0]
        # Sort the T*K (token, slot) pairs by expert so each expert sees one contiguous block.
        flat_expert_R = expert_index_TK.flatten()
        order_R = torch.argsort(flat_expert_R, stable=True)
        if counts_E is None:
            counts_E = expert_counts(expert_index_TK, n_experts)
        token_R = order_R // top_k
        # index_select rather than h_TD[token_R]: its backward is an index_add_, cheaper than
        # advanced indexing's index_put_(accumulate=True).
        x_RD = h_TD.index_select(0, token_R)

        if self.dispatch == "grouped" and _grouped_mm_usable(x_RD, in_proj, self.down_proj):
            offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
            proj_RO = grouped_matmul(x_RD, in_proj, offsets_E)
            if in_bias is not None:  # ffn_bias: each pair's expert's biases (the pairs are sorted by expert)
                expert_R = flat_expert_R.index_select(0, order_R)
                proj_RO = proj_RO + in_bias.index_select(0, expert_R)
            y_RD = grouped_matmul(ffn_hidden(proj_RO, self.act, self.gated), self.down_proj, offsets_E)
            if down_bias is not None:
                y_RD = y_RD + down_bias.index_select(0, expert_R)
        else:
            # Exact fallback: one plain matmul per expert that received tokens. The weights are
            # unbound once, whose backward stacks the experts' gradients; indexing them per expert
            # would build a zero gradient of all E experts for each one (E^2 memory traffic).
            in_E, down_E = in_proj.unbind(0), self.down_proj.unbind(0)
            no_bias = (None,) * n_experts
            in_bias_E = no_bias if in_bias is None else in_bias.unbind(0)
            down_bias_E = no_bias if down_bias is None else down_bias.unbind(0)
            blocks = [mlp(x_block, in_E[e], down_E[e], self.act, self.gated, in_bias_E[e], down_bias_E[e])
                      for e, x_block in enumerate(torch.split(x_RD, counts_E.tolist())) if x_block.shape[0]]
            y_RD = torch.cat(blocks) if blocks else x_RD.new_zeros(0, x_RD.shape[1])

        # Weight each pair by its gate while still in sorted order and add the K slots of every
        # token with one scatter: no unsort copy and no batched matmul, and the backward is a
        # gather (index_select) of the output gradient.
        gate_R = gate_TK.flatten().index_select(0, order_R).to(y_RD.dtype)
        return y_RD.new_zeros(n_tokens, y_RD.shape[1]).index_add_(0, token_R, y_RD * gate_R[:, None])

    def adapter_experts(self, h_TD: torch.Tensor, expert_index_TK: torch.Tensor, gate_TK: torch.Tensor,
                        counts_E: torch.Tensor, adapter: Adapter) -> torch.Tensor:
        """sum_k gate_k * FFN_{e_k}(h) where expert e is the one stored FFN (the seed's) with adapter
        e (config.adapter_experts). The seed's matmuls run once per token, not once per (token,
        slot) pair: its input projection is shared, and its down projection is linear, so
        sum_k g_k W_down z_k = W_down (sum_k g_k z_k). Per pair remain the adapters' updates and the
        activation."""
        n_tokens, top_k = expert_index_TK.shape
        in_bias, down_bias = self.in_proj_bias, self.down_proj_bias
        if in_bias is not None:
            in_bias, down_bias = in_bias.squeeze(0), down_bias.squeeze(0)
        order_R = torch.argsort(expert_index_TK.flatten(), stable=True)
        token_R = order_R // top_k
        sizes = counts_E.tolist()
        proj_RO = F.linear(h_TD, self.in_proj.squeeze(0), in_bias).index_select(0, token_R)
        gate_R = gate_TK.flatten().index_select(0, order_R).to(proj_RO.dtype)
        x_RD = h_TD.index_select(0, token_R)
        hidden_blocks, down_updates = [], []
        for e, (x_blk, proj_blk, gate_blk) in enumerate(zip(x_RD.split(sizes), proj_RO.split(sizes),
                                                             gate_R.split(sizes))):
            if not x_blk.shape[0]:
                continue
            update = adapter.expert_update(self.in_name, e, x_blk)
            if update is not None:
                proj_blk = proj_blk + update
            hidden = adapter.expert_input("down_proj", e, ffn_hidden(proj_blk, self.act, self.gated))
            hidden = hidden * gate_blk[:, None]
            hidden_blocks.append(hidden)
            update = adapter.expert_update("down_proj", e, hidden)
            if update is not None:
                down_updates.append(update)
        hidden_RF = torch.cat(hidden_blocks)
        hidden_TF = hidden_RF.new_zeros(n_tokens, hidden_RF.shape[1]).index_add_(0, token_R, hidden_RF)
        y_TD = F.linear(hidden_TF, self.down_proj.squeeze(0))
        if down_bias is not None:  # sum_k g_k b: the gates need not sum to 1 (BAM's top-1)
            y_TD = y_TD + gate_TK.sum(-1, keepdim=True).to(y_TD.dtype) * down_bias
        if down_updates:
            y_TD = y_TD.index_add(0, token_R, torch.cat(down_updates))
        return y_TD


class SharedExpert(FFNParameters):
    """One FFN with 2-D weights, of the experts' kind: the always-on shared expert (Nexus: the seed's FFN)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return mlp(h, self.in_proj, self.down_proj, self.act, self.gated, self.in_proj_bias, self.down_proj_bias)


@dataclass
class FFNOutput:
    y_BTD: torch.Tensor
    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: Routing | None = None


class MoEFFN(nn.Module):
    """The FFN of a block: one FFN when dense, else a routed mixture of FFN experts,
    plus the always-on shared expert when the config has one.

    A linear router exists only with more than one expert (one expert takes every token with gate
    1); a Nexus router always exists, so its projection survives to the experts added later.
    """

    def __init__(self, config: BamConfig):
        super().__init__()
        self.n_experts = config.n_ffn_experts
        if config.ffn_router == "nexus":
            self.router = NexusRouter(config)
        else:
            self.router = LinearRouter(config) if self.n_experts > 1 else None
        self.adapter_experts = config.adapter_experts
        self.experts = FFNExperts(config, config.n_weight_copies(self.n_experts))
        self.shared_expert = SharedExpert(config) if config.ffn_shared_expert else None
        # LoRA or (IA)³ on the dense FFN, or one per expert with adapter_experts
        # (bam/modeling/adapters.py); None: the FFN as it is
        self.adapter = Adapter(config, "ffn") if config.adapter is not None else None

    def forward(self, h_BTD: torch.Tensor, aux_losses: bool = True) -> FFNOutput:
        """`aux_losses=False` skips the load-balancing and z losses (left None): inference has no
        use for them, and in decoding, where a step is a few tokens, their ~20 small ops per layer
        are a measurable share of the step."""
        if self.router is None:
            out = FFNOutput(self.experts.dense(h_BTD, self.adapter))
        else:
            h_TD = h_BTD.reshape(-1, h_BTD.shape[-1])
            routing = self.router(h_TD)
            counts_E = expert_counts(routing.expert_index_TK, self.n_experts)  # once, for dispatch and loss
            if self.adapter_experts:
                y_TD = self.experts.adapter_experts(h_TD, routing.expert_index_TK, routing.gate_TK, counts_E,
                                                    self.adapter)
            else:
                y_TD = self.experts(h_TD, routing.expert_index_TK, routing.gate_TK, counts_E)
            out = FFNOutput(y_TD.view_as(h_BTD), routing=routing)
            if aux_losses:
                out.load_balancing_loss = load_balancing_loss(routing.probs_TE, routing.expert_index_TK, counts_E)
                out.z_loss = router_z_loss(routing.logits_TE)
        if self.shared_expert is not None:  # always on, ungated: y = FFN_shared(h) + routed
            out.y_BTD = out.y_BTD + self.shared_expert(h_BTD)
        return out
