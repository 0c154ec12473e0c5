"""The transformer: dense models, BTX, BAM and sparse-upcycled MoEs are all this one class.

Block (METHOD.md section 2), with h = Norm(x):
    parallel:   y = x + Attention(h) + FFN(h)
    parallel, parallel_ffn_norm (GPT-NeoX): y = x + Attention(Norm1(x)) + FFN(Norm2(x))
    sequential: y1 = x + Attention(Norm1(x)); y = y1 + FFN(Norm2(y1))
    sequential, norm_placement='post' (OLMo 2): y1 = x + Norm1(Attention(x)); y = y1 + Norm2(FFN(y1))
    sequential, norm_placement='sandwich' (Gemma 2, 3): y1 = x + Norm3(Attention(Norm1(x)));
                                                   y = y1 + Norm4(FFN(Norm2(y1)))
(with Granite's residual_multiplier m, each sublayer's output is m * ... before the add).
Attention is a soft mixture of E attention experts (bam/modeling/attention.py); FFN is a routed
mixture of FFN experts, gated (SwiGLU, or GeGLU with Gemma's `hidden_act`) or not (GPT-NeoX,
`ffn_gated=False`), with a linear or Nexus router and an optional always-on shared expert
(bam/modeling/moe.py). With E = 1 both are the ordinary dense modules. Norms: bam/modeling/norm.py
(Gemma's multiply by 1 + weight, `norm_weight_offset`). Gemma's final logits may be soft-capped.

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from bam.modeling.adapters import Adapter
from bam.modeling.attention import AttentionMasks, MixtureOfAttention, Rope
from bam.modeling.config import BamConfig
from bam.modeling.loss import linear_cross_entropy
from bam.modeling.moe import FFNParameters, LinearRouter, MoEFFN, NexusRouter
from bam.modeling.norm import Norm
from bam.modeling.transformers_compat import cache_argument, cache_name


class Block(nn.Module):
    def __init__(self, config: BamConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.block == "parallel"
        self.post_norm = config.norm_placement == "post"
        self.sandwich = config.norm_placement == "sandwich"
        self.residual_multiplier = config.residual_multiplier
        if self.post_norm:  # module order = the layout table's (bam/modeling/layout.py)
            self.attn_output_norm, self.ffn_output_norm = Norm(config), Norm(config)
        else:
            self.input_norm = Norm(config)
            self.post_attention_norm = None if self.parallel else Norm(config)
        # parallel_ffn_norm (GPT-NeoX): the parallel block's FFN reads a norm of its own
        self.ffn_input_norm = Norm(config) if self.parallel and config.parallel_ffn_norm else None
        if self.sandwich:  # Gemma 2, 3: the 'pre' norms, then the 'post' ones
            self.attn_output_norm, self.ffn_output_norm = Norm(config), Norm(config)
        self.attn = MixtureOfAttention(config, layer_idx)
        self.ffn = MoEFFN(config)

    def residual(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as added to the residual stream (Granite scales it)."""
        return y_BTD if self.residual_multiplier == 1.0 else y_BTD * self.residual_multiplier

    def forward(self, x_BTD, cos_sin, masks, cache, aux_losses: bool):
        if self.sandwich:  # Gemma 2, 3: each sublayer's input and output are normalized
            attn_BTD, attn_gates = self.attn(self.input_norm(x_BTD), cos_sin, masks, cache)
            x_BTD = x_BTD + self.residual(self.attn_output_norm(attn_BTD))
            ffn = self.ffn(self.post_attention_norm(x_BTD), aux_losses)
            return x_BTD + self.residual(self.ffn_output_norm(ffn.y_BTD)), ffn, attn_gates
        if self.post_norm:  # OLMo 2: the sublayers read the residual stream, their outputs are normalized
            attn_BTD, attn_gates = self.attn(x_BTD, cos_sin, masks, cache)
            x_BTD = x_BTD + self.residual(self.attn_output_norm(attn_BTD))
            ffn = self.ffn(x_BTD, aux_losses)
            return x_BTD + self.residual(self.ffn_output_norm(ffn.y_BTD)), ffn, attn_gates
        h_BTD = self.input_norm(x_BTD)
        attn_BTD, attn_gates = self.attn(h_BTD, cos_sin, masks, cache)
        if self.parallel:
            ffn = self.ffn(h_BTD if self.ffn_input_norm is None else self.ffn_input_norm(x_BTD), aux_losses)
            return x_BTD + self.residual(attn_BTD) + self.residual(ffn.y_BTD), ffn, attn_gates
        x_BTD = x_BTD + self.residual(attn_BTD)
        ffn = self.ffn(self.post_attention_norm(x_BTD), aux_losses)
        return x_BTD + self.residual(ffn.y_BTD), ffn, attn_gates


@dataclass
class LayerRouting:
    """Per layer, for routing statistics: FFN expert choice (T, K) and attention gates (B, T, E)."""

    ffn_expert_index: torch.Tensor | None
    ffn_probs: torch.Tensor | None
    attn_gates: torch.Tensor | None


# The outputs extend transformers' own classes, so every field they declare (the KV cache among
# them, whatever the installed release calls it: bam/modeling/transformers_compat.py) is upstream's.
CACHE = cache_name()


@dataclass
class BamModelOutput(BaseModelOutputWithPast):
    """The routers' auxiliary losses (summed over layers; None unless asked for) and, with
    `output_routing`, one `LayerRouting` per layer."""

    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: list | None = None


@dataclass
class BamOutput(CausalLMOutputWithPast):
    """`loss` is the LM loss plus `aux_loss`; the parts are returned for logging."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    routing: list | None = None


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamConfig
    config: BamConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _skip_keys_device_placement = [CACHE]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, Norm):  # the identity: offset + weight = 1
            init.constant_(module.weight, 1.0 - module.weight_offset)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, FFNParameters):  # the FFN experts and the shared expert
            init.normal_(module.in_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            if module.in_proj_bias is not None:
                init.zeros_(module.in_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, LinearRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
        elif isinstance(module, NexusRouter):
            # Placeholder domain embeddings (any fixed vectors work, METHOD.md 3.3); `bam mix --method
            # nexus` writes the real ones. Unit variance: the scale bam.mix.nexus gives real embeddings.
            init.normal_(module.domain_embeddings, mean=0.0, std=1.0)
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.router_init_std)
            init.normal_(module.down_proj, mean=0.0, std=self.config.router_init_std)
        if isinstance(module, MixtureOfAttention) and module.router is not None:
            init.normal_(module.router.weight, mean=0.0, std=self.config.router_init_std)
        if isinstance(module, Adapter):  # PEFT's: B zero, (IA)³ one, so the model starts as it was
            module.reset_parameters()


class BamModel(BamPreTrainedModel):
    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = Norm(config)
        rope_by_type = config.rope_by_type()
        # One RoPE for every layer, or one per layer type (Gemma 3's local and global RoPE).
        self.rope = Rope(config) if None in rope_by_type else nn.ModuleDict({t: Rope(config, t) for t in rope_by_type})
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_routing=False, aux_losses=None,
                **kwargs) -> BamModelOutput:
        """`cache` is the KV cache (`past_key_values` before transformers 5.24, also accepted).
        `aux_losses`: compute the routers' load-balancing and z losses; by default only in
        training mode (BamForCausalLM also asks for them whenever it computes a loss)."""
        config = self.config
        cache = cache_argument(cache, kwargs)
        aux_losses = self.training if aux_losses is None else aux_losses
        x_BTD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if config.embedding_multiplier != 1.0 and not config.embedding_multiplier_in_lookup:
            x_BTD = x_BTD * config.embedding_multiplier  # Granite (inputs_embeds too, as transformers does)
        elif config.embedding_multiplier != 1.0 and inputs_embeds is None:  # Gemma: in the lookup's dtype
            x_BTD = x_BTD * torch.tensor(config.embedding_multiplier, dtype=x_BTD.dtype, device=x_BTD.device)
        use_cache = config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=config)
        past_len = cache.get_seq_length() if cache is not None else 0
        B, T = x_BTD.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x_BTD.device).expand(B, T)
        if isinstance(self.rope, Rope):
            cos_sins = [self.rope(position_ids, x_BTD.dtype)] * len(self.layers)
        else:  # each layer type's cos/sin, computed once for all its layers
            by_type = {layer_type: rope(position_ids, x_BTD.dtype) for layer_type, rope in self.rope.items()}
            cos_sins = [by_type[layer_type] for layer_type in config.layer_types]
        masks = AttentionMasks(attention_mask, T, past_len, x_BTD.device)

        lb_loss = z_loss = None
        routing = [] if output_routing else None
        for layer, cos_sin in zip(self.layers, cos_sins):
            x_BTD, ffn, attn_gates = layer(x_BTD, cos_sin, masks, cache, aux_losses)
            if ffn.load_balancing_loss is not None:
                lb_loss = ffn.load_balancing_loss + (0 if lb_loss is None else lb_loss)
                z_loss = ffn.z_loss + (0 if z_loss is None else z_loss)
            if output_routing:
                r = ffn.routing
                routing.append(LayerRouting(r.expert_index_TK if r else None, r.probs_TE if r else None,
                                            attn_gates))
        return BamModelOutput(last_hidden_state=self.norm(x_BTD), **{CACHE: cache}, load_balancing_loss=lb_loss,
                              z_loss=z_loss, routing=routing)


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BamConfig):
        super().__init__(config)
        self.model = BamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' own; with `cache_reset_length` (Phi-3's LongRoPE) the KV cache is dropped once,
        when the sequence first grows past that length, so that the step recomputes it for the whole
        sequence with the long RoPE factors, as Phi3ForCausalLM does (on releases whose generate()
        passes `next_sequence_length`, which says how much of input_ids to feed)."""
        reset, cache = self.config.cache_reset_length, kwargs.get(CACHE)
        if (reset is not None and cache is not None and "next_sequence_length" in kwargs
                and input_ids.shape[1] > reset and cache.get_seq_length() <= reset):
            kwargs.update({CACHE: None, "next_sequence_length": None})
        return super().prepare_inputs_for_generation(input_ids, *args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                output_routing=False, shift_labels=None, return_logits=True, **kwargs) -> BamOutput:
        """`labels` follow transformers: same positions as `input_ids`, shifted here, -100 ignored.
        `shift_labels` (transformers' loss-function name) are already shifted: the target of each
        position, which lets a caller score every position including the last (`bam train`).

        `return_logits=False` computes the LM loss with the fused, chunked head + cross-entropy of
        bam/modeling/loss.py, which never materializes the [B, T, V] logits (about half of a training
        step's time and memory at d=256, V=32000); `logits` is then None.

        The routers' auxiliary losses (`aux_loss` and its parts) are computed in training mode or
        when a loss is asked for; otherwise they are None, as in generation.
        """
        wants_loss = labels is not None or shift_labels is not None
        body = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache_argument(cache, kwargs), inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_routing=output_routing, aux_losses=self.training or wants_loss,
        )
        hidden_BTD, lb_loss, z_loss = body.last_hidden_state, body.load_balancing_loss, body.z_loss
        if logits_to_keep:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        if shift_labels is None and labels is not None:
            # Shift the labels, not the logits: slicing the logits would copy the largest tensor.
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        logits_BTV = lm_loss = None
        if return_logits:
            logits_BTV = self.lm_head(hidden_BTD)
            if self.config.logit_scale != 1.0:
                logits_BTV = logits_BTV * self.config.logit_scale
            cap = self.config.final_logit_softcapping
            if cap is not None:  # Gemma 2, in its order
                logits_BTV = torch.tanh(logits_BTV / cap) * cap
            if shift_labels is not None:
                lm_loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), shift_labels.flatten(), ignore_index=-100)
        elif shift_labels is not None:
            lm_loss = linear_cross_entropy(hidden_BTD.flatten(0, 1), self.lm_head.weight, shift_labels.flatten(),
                                           logit_scale=self.config.logit_scale, ignore_index=-100,
                                           softcap=self.config.final_logit_softcapping)

        aux_loss = None
        if lb_loss is not None:
            aux_loss = self.config.router_aux_loss_coef * lb_loss + self.config.router_z_loss_coef * z_loss
        loss = None
        if lm_loss is not None:
            loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        return BamOutput(loss=loss, logits=logits_BTV, **{CACHE: getattr(body, CACHE)}, lm_loss=lm_loss,
                         aux_loss=aux_loss, load_balancing_loss=lb_loss, z_loss=z_loss,
                         last_hidden_state=hidden_BTD, routing=body.routing)
