"""SnapKV prompt compression of the KV cache (METHOD.md 8) for dense models, KV experts and KV sharing.

At the end of the prompt's forward, each layer's cache is cut to a budget. The last `window` prompt
positions (the observation window) vote for the earlier positions each K/V head needs: the window
queries' attention weights over them, as the model computes them (its scale, soft-cap and causal
mask, in fp32), summed over the window's queries, averaged over the query heads that share the K/V
head (GQA), and smoothed over positions by a pooling of width `kernel` so neighbouring tokens stay
together. Every K/V head keeps its top (budget - window) positions plus the window itself, in
their original order; kept keys keep the RoPE they were cached with, and decoding is exact
attention over what was kept. No training.

- KV experts: each expert's K/V heads are voted on by that expert's own queries. A layer holds
  `budget` positions per expert in total, split evenly (split='even': each expert keeps `budget`)
  or by the router's mean gate over the window and the batch (split='gate': each expert keeps its
  window, and the positions past the windows go to the experts in proportion to their gate mass,
  none keeping more than the prompt).
- KV sharing: the one set of K/V heads is voted on by all experts' queries, each query's weights
  times its expert's gate at that position. Parameter mixing (attn_mixing='parameters') has one
  attention: its mixed queries vote, as a dense model's do.

Pooling: average by default (kernel 7, zero padding counted), as kvpress's SnapKVPress pools, so
the two can be compared on a dense model; max pooling is an option.

Where it runs: SnapKVCache, a transformers DynamicCache the model fills as usual. It puts a
forward hook on each MixtureOfAttention that compresses the layer's cache right after the
prompt's forward, recomputing the window's queries from the module's input hidden states (as
kvpress hooks attention modules), so the model's code is unchanged. Users meet it as
`model.generate(ids, cache=SnapKVCache(model, budget=0.25))` and `bam generate --kv-budget 0.25`
(docs/kv-compression.md).

True positions: the cache's get_seq_length() counts every position fed, dropped ones included.
The model derives the new tokens' positions and its mask's offset from it (and transformers'
generate() its own position ids from the attention mask), so decoding after compression puts
new tokens at their true positions. The mask needs nothing else: a query after the prompt sees
every kept key, and the new keys are the cache's last ones, where the model's causal mask puts
them. Sliding-window layers and padded batches would need the kept keys' positions in the mask,
so they are refused.

Unequal budgets (split='gate'): a layer's cache is one tensor [B, E*H_kv, S, A], one S for all
experts. With per-expert budgets the layer holds one tensor per expert, [B, H_kv, S_e, A], so the
bytes held are exactly what was kept (bam.modeling.cost.compressed_kv_cache_bytes); each attention
call gets them right-aligned in one padded tensor, and a forward pre-hook adds a per-query-head
mask that hides the padding: exact attention over what was kept, for one more copy of the layer's
cache per step (DynamicCache's torch.cat already makes one). Padding the held tensor to the
largest budget would instead hold E * max(S_e) positions and lose what the split saves.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from bam.errors import BamError, need
from bam.modeling.attention import MixtureOfAttention, apply_rope
from bam.modeling.cost import kv_positions_kept

POOLINGS = ("avg", "max")
SPLITS = ("even", "gate")


@dataclass(frozen=True)
class SnapKV:
    """The compression's settings. `budget`: positions each K/V head keeps of the prompt, as a
    number of tokens (int) or a fraction of the prompt (float in (0, 1], rounded down)."""

    budget: int | float
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"
    split: str = "even"

    def __post_init__(self):
        need(isinstance(self.window, int) and self.window >= 1, "kv window", self.window, "a positive integer")
        need(isinstance(self.kernel, int) and self.kernel >= 1 and self.kernel % 2 == 1, "kv kernel", self.kernel,
             "an odd positive integer (the pooling keeps positions in place)")
        need(self.pooling in POOLINGS, "kv pooling", self.pooling, f"one of {POOLINGS}")
        need(self.split in SPLITS, "kv split", self.split, f"one of {SPLITS}")
        budget = self.budget
        if isinstance(budget, float):
            need(0 < budget <= 1, "kv budget", budget, "a fraction of the prompt in (0, 1], or a number of tokens")
        else:
            need(isinstance(budget, int) and not isinstance(budget, bool) and budget > 0, "kv budget", budget,
                 "a positive number of tokens, or a fraction of the prompt in (0, 1]")
            need(budget >= self.window, "kv budget", budget,
                 f"at least the observation window of {self.window} tokens")

    def kept(self, n_prompt: int) -> int:
        """Positions each K/V head keeps (on average over experts, with split='gate') of an n_prompt-token prompt."""
        if n_prompt == 0:
            raise BamError("kv budget: no prompt to compress (the input has no tokens)")
        n = kv_positions_kept(self.budget, n_prompt)
        if n < min(self.window, n_prompt):
            raise BamError(f"kv budget={self.budget!r}: keeps {n} of the prompt's {n_prompt} tokens, "
                           f"expected at least the observation window of {self.window}")
        return n


def parse_budget(text: str) -> int | float:
    """`--kv-budget`'s value: tokens (`512`) or a fraction of the prompt (`0.25`)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise BamError(f"--kv-budget {text!r}: expected a number of tokens (512) or a fraction of the prompt "
                       f"(0.25)") from None


# ---------------------------------------------------------------------------------------------
# Selection


def window_queries(attn: MixtureOfAttention, h_BTD: torch.Tensor, cos_sin, gates_BTE, window: int):
    """The last `window` positions' queries after RoPE, [B, E, H, T, A], as attn.forward computes
    them (E = 1 with attn_mixing='parameters', whose one attention has gate-mixed queries)."""
    h_BTD = h_BTD[:, -window:]
    B, T, _ = h_BTD.shape
    q_BTEHA = attn.heads("q_proj", h_BTD, gates_BTE[:, -window:] if attn.mix_parameters else None)
    E = q_BTEHA.shape[2]
    q_BHTA = q_BTEHA.permute(0, 2, 3, 1, 4).reshape(B, E * attn.n_heads, T, attn.head_dim)
    if attn.rope:
        cos_BTG, sin_BTG = cos_sin
        q_BHTA = apply_rope(q_BHTA, cos_BTG[:, -window:], sin_BTG[:, -window:])
    return q_BHTA.view(B, E, attn.n_heads, T, attn.head_dim)


def window_votes(attn: MixtureOfAttention, q_BEHTA: torch.Tensor, k_BHSA: torch.Tensor,
                 gates_BTE: torch.Tensor | None) -> torch.Tensor:
    """Each K/V head's votes for the positions before the window, [B, E, H_kv, S - T] with E the
    layer's K/V experts (1 with KV sharing): the window queries' attention weights over
    the prompt, summed over the queries, averaged over the query heads of a K/V head; with KV
    sharing all experts' queries vote, each weighted by its gate."""
    B, E, H, T, A = q_BEHTA.shape
    S, n_kv_heads = k_BHSA.shape[2], attn.n_kv_heads
    dtype = torch.promote_types(q_BEHTA.dtype, torch.float32)  # at least fp32, as the eager softmax
    # K (K/V heads) and G (query heads per K/V head) as in softcapped_attention
    q_BEKGTA = q_BEHTA.to(dtype).view(B, E, n_kv_heads, H // n_kv_heads, T, A)
    k_BEKSA = k_BHSA.to(dtype).view(B, -1, n_kv_heads, S, A)  # K/V experts: E of them; shared: 1, broadcast
    logits_BEKGTS = q_BEKGTA @ k_BEKSA[:, :, :, None].transpose(-1, -2)
    logits_BEKGTS = logits_BEKGTS * (A**-0.5 if attn.scale is None else attn.scale)
    if attn.softcap is not None:
        logits_BEKGTS = torch.tanh(logits_BEKGTS / attn.softcap) * attn.softcap
    query_pos_T = torch.arange(S - T, S, device=k_BHSA.device)
    causal_TS = torch.arange(S, device=k_BHSA.device)[None, :] <= query_pos_T[:, None]
    probs_BEKGTS = logits_BEKGTS.masked_fill(~causal_TS, float("-inf")).softmax(dim=-1)[..., : S - T]
    if k_BEKSA.shape[1] == 1 and E > 1:  # KV sharing: every expert's query votes, weighted by its gate
        weights_BET = gates_BTE[:, -T:].to(dtype).transpose(1, 2)
        probs_BEKGTS = (probs_BEKGTS * weights_BET[:, :, None, None, :, None]).sum(dim=1, keepdim=True)
    return probs_BEKGTS.sum(dim=-2).mean(dim=3)


def pooled(votes_BEKS: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Votes smoothed over positions (stride 1, same length), so neighbouring positions are kept together."""
    flat_NS = votes_BEKS.flatten(0, -2)[:, None]
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(flat_NS, kernel, stride=1, padding=kernel // 2).view_as(votes_BEKS)


def kept_positions(scores_BKS: torch.Tensor, n_kept: int, n_prompt: int) -> torch.Tensor:
    """The positions one set of K/V heads keeps, ascending, [B, H_kv, n_kept]: the top
    (n_kept - window) by score, then the window (the positions past the scored ones). Equal scores
    (max pooling makes plateaus) go to the earlier position: a stable sort, where topk's order is
    unspecified."""
    B, n_kv_heads, n_scored = scores_BKS.shape
    ranked_BKS = scores_BKS.sort(dim=-1, descending=True, stable=True).indices
    top_BKN = ranked_BKS[..., : n_kept - (n_prompt - n_scored)].sort(dim=-1).values
    window_N = torch.arange(n_scored, n_prompt, device=scores_BKS.device)
    return torch.cat([top_BKN, window_N.expand(B, n_kv_heads, -1)], dim=-1)


def split_budget(total: int, mass: list[float], low: int, high: int) -> list[int]:
    """`total` positions over the experts: `low` each (the window every expert keeps), the rest in
    proportion to `mass` (largest remainders), none past `high` (the prompt); what a capped expert
    cannot take goes to the others."""
    counts = [low] * len(mass)
    left = total - low * len(mass)
    while left > 0:
        free = [e for e in range(len(mass)) if counts[e] < high]
        weight = sum(mass[e] for e in free)
        share = {e: left * (mass[e] / weight if weight > 0 else 1 / len(free)) for e in free}
        give = {e: int(share[e]) for e in free}
        for e in sorted(free, key=lambda e: give[e] - share[e])[: left - sum(give.values())]:
            give[e] += 1
        for e in free:
            take = min(give[e], high - counts[e])
            counts[e] += take
            left -= take
    return counts


# ---------------------------------------------------------------------------------------------
# The cache


class CompressedLayer(DynamicLayer):
    """One layer's cache that counts every position fed (get_seq_length), dropped ones included.

    After compression it holds the kept positions: one tensor [B, E*H_kv, S, A] when every K/V
    expert keeps as many, else one [B, H_kv, S_e, A] per expert (`expert_keys`), handed to
    attention right-aligned in a padded tensor whose padding `key_mask_HS` hides.
    `kept`: the kept prompt positions per K/V expert, [B, H_kv, n] each (None: all kept).
    """

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.compressed = False
        self.kept = None
        self.expert_keys = self.expert_values = self.key_mask_HS = None

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        super().reset()
        self.seen, self.compressed, self.kept = 0, False, None
        self.expert_keys = self.expert_values = self.key_mask_HS = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        if self.expert_keys is None:
            return super().update(key_states, value_states)
        n_experts = len(self.expert_keys)
        self.expert_keys = [torch.cat(pair, dim=-2) for pair in zip(self.expert_keys, key_states.chunk(n_experts, 1))]
        self.expert_values = [torch.cat(pair, dim=-2)
                              for pair in zip(self.expert_values, value_states.chunk(n_experts, 1))]
        return self._padded(self.expert_keys), self._padded(self.expert_values)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop (assisted decoding), the count of positions fed kept true."""
        if tokens_to_remove < 0 and self.expert_keys is not None:
            self.expert_keys = [t[..., :tokens_to_remove, :] for t in self.expert_keys]
            self.expert_values = [t[..., :tokens_to_remove, :] for t in self.expert_values]
        else:
            super().crop(tokens_to_remove)
        self.seen += min(tokens_to_remove, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reordering of the batch, per expert's tensor when the experts' lengths differ."""
        if self.expert_keys is None:
            return super().reorder_cache(beam_idx)
        self.expert_keys = [t.index_select(0, beam_idx.to(t.device)) for t in self.expert_keys]
        self.expert_values = [t.index_select(0, beam_idx.to(t.device)) for t in self.expert_values]
        return None

    def _padded(self, per_expert: list[torch.Tensor]) -> torch.Tensor:
        """The experts' tensors right-aligned in one [B, E*H_kv, S_max, A] (the newest keys last, where
        the model's causal mask expects them); sets key_mask_HS, True where a key was kept."""
        B, n_kv_heads, _, A = per_expert[0].shape
        longest = max(t.shape[2] for t in per_expert)
        out_BHSA = per_expert[0].new_zeros(B, len(per_expert) * n_kv_heads, longest, A)
        mask_HS = torch.zeros(len(per_expert) * n_kv_heads, longest, dtype=torch.bool, device=out_BHSA.device)
        for e, t_BKSA in enumerate(per_expert):
            heads = slice(e * n_kv_heads, (e + 1) * n_kv_heads)
            out_BHSA[:, heads, longest - t_BKSA.shape[2]:] = t_BKSA
            mask_HS[heads, longest - t_BKSA.shape[2]:] = True
        self.key_mask_HS = mask_HS
        return out_BHSA

    def keep(self, kept: list[torch.Tensor]) -> None:
        """Keep, for K/V expert e, the positions kept[e] ([B, H_kv, n_e]) of the prompt's keys and values."""
        self.kept = kept
        n_experts, (B, n_kv_heads, _) = len(kept), kept[0].shape
        keys_BEKSA = self.keys.view(B, n_experts, n_kv_heads, *self.keys.shape[2:])
        values_BEKSA = self.values.view(B, n_experts, n_kv_heads, *self.values.shape[2:])
        A = keys_BEKSA.shape[-1]
        index = [k_BKN[..., None].expand(-1, -1, -1, A) for k_BKN in kept]
        keys = [keys_BEKSA[:, e].gather(2, index[e]) for e in range(n_experts)]
        values = [values_BEKSA[:, e].gather(2, index[e]) for e in range(n_experts)]
        if len({k_BKN.shape[-1] for k_BKN in kept}) == 1:
            self.keys, self.values = torch.cat(keys, dim=1), torch.cat(values, dim=1)
        else:
            self.keys = self.values = None
            self.expert_keys, self.expert_values = keys, values

    def held_bytes(self) -> int:
        tensors = (self.expert_keys + self.expert_values if self.expert_keys is not None
                   else [t for t in (self.keys, self.values) if t is not None])
        return sum(t.numel() * t.element_size() for t in tensors)


class SnapKVCache(DynamicCache):
    """A DynamicCache whose prompt is compressed with SnapKV at the end of its first forward.

    `model`: the BamForCausalLM (or BamModel) it is used with; a forward hook on each of its
    attention modules compresses that layer's cache. The hooks act only on forwards given this
    cache and are removed when the cache is garbage-collected. Only the first forward (the prompt)
    is compressed; later tokens are appended as they come. One prompt per batch row, all of one
    length (a padded batch is refused).
    """

    def __init__(self, model, budget: int | float, window: int = 32, kernel: int = 7, pooling: str = "avg",
                 split: str = "even"):
        self.press = SnapKV(budget, window, kernel, pooling, split)
        config = model.config
        if any(config.attention_window(i) for i in range(config.num_hidden_layers)):
            raise BamError("kv budget: this model has sliding-window layers; SnapKV compression supports "
                           "full-attention models only")
        if config.cache_reset_length is not None:
            raise BamError("kv budget: this model recomputes its cache past cache_reset_length (Phi-3 LongRoPE); "
                           "SnapKV compression would be lost")
        if split == "gate" and config.attn_logit_softcapping is not None:
            raise BamError("kv split='gate': not with attn_logit_softcapping (its attention takes no per-head "
                           "mask); use split='even'")
        super().__init__(config=config)
        self.layers = [CompressedLayer() for _ in range(config.num_hidden_layers)]
        modules = [m for m in model.modules() if isinstance(m, MixtureOfAttention)]
        this = weakref.ref(self)
        handles = [m.register_forward_hook(partial(_compress_after_prompt, this)) for m in modules]
        handles += [m.register_forward_pre_hook(partial(_hide_padding, this)) for m in modules]
        weakref.finalize(self, _remove, handles)

    def held_bytes(self) -> int:
        """Bytes of keys and values the cache holds (what bam.modeling.cost.compressed_kv_cache_bytes counts)."""
        return sum(layer.held_bytes() for layer in self.layers)

    @torch.no_grad()
    def compress(self, attn: MixtureOfAttention, h_BTD, cos_sin, masks, gates_BTE) -> None:
        """Compress layer attn.layer_idx, whose cache holds the whole prompt h_BTD's keys and values."""
        layer = self.layers[attn.layer_idx]
        layer.compressed = True
        padding = masks.attention_mask_BS
        if padding is not None and not bool(padding.all()):
            raise BamError("kv budget: the batch is padded (the attention mask has zeros); compress prompts "
                           "of one length, or one at a time")
        n_prompt = h_BTD.shape[1]
        n_kept = self.press.kept(n_prompt)
        if n_kept >= n_prompt:
            return
        window = self.press.window
        q_BEHTA = window_queries(attn, h_BTD, cos_sin, gates_BTE, window)
        votes_BEKS = window_votes(attn, q_BEHTA, layer.keys, gates_BTE)
        scores_BEKS = pooled(votes_BEKS, self.press.kernel, self.press.pooling)
        n_kv_experts = scores_BEKS.shape[1]
        counts = [n_kept] * n_kv_experts
        if self.press.split == "gate" and n_kv_experts > 1:
            mass = gates_BTE[:, -window:].float().mean(dim=(0, 1)).tolist()
            counts = split_budget(n_kept * n_kv_experts, mass, window, n_prompt)
        layer.keep([kept_positions(scores_BEKS[:, e], counts[e], n_prompt) for e in range(n_kv_experts)])


def _compress_after_prompt(cache_ref, attn, args, output):
    cache = cache_ref()
    if cache is None or args[3] is not cache or cache.layers[attn.layer_idx].compressed:
        return
    h_BTD, cos_sin, masks, _ = args
    cache.compress(attn, h_BTD, cos_sin, masks, output[1])


def _hide_padding(cache_ref, attn, args):
    """Before attention over a layer holding per-expert tensors: its masks also hide their padding."""
    cache = cache_ref()
    if cache is None or args[3] is not cache or cache.layers[attn.layer_idx].expert_keys is None:
        return None
    h_BTD, cos_sin, masks, _ = args
    return h_BTD, cos_sin, _PaddingHidden(masks, cache.layers[attn.layer_idx], attn.n_heads // attn.n_kv_heads), cache


class _PaddingHidden:
    """The forward's AttentionMasks, each mask also hiding the padded keys per query head
    ([B|1, E*H, T, S]; KV experts' query heads are expert-major, a K/V head's group consecutive)."""

    def __init__(self, masks, layer: CompressedLayer, group: int):
        self.masks, self.layer, self.group = masks, layer, group

    def __call__(self, window, kv_len):
        base = self.masks(window, kv_len)
        keep_1HTS = self.layer.key_mask_HS.repeat_interleave(self.group, dim=0)[None, :, None, :]
        return keep_1HTS if base is None else base & keep_1HTS


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()
