"""Where a mixture sends each domain's tokens: per layer, the share of token slots each FFN expert
receives and the mean attention-expert gate, measured on each domain's test split (the study's
routing heatmaps and the add-expert experiment's share of the new domain's tokens)."""

from __future__ import annotations

import torch

from bam.data.batches import iter_eval_batches
from bam.data.shards import TokenizedDomain


@torch.no_grad()
def routing_statistics(model, domains: list[TokenizedDomain], seq_len: int, batch_size: int,
                       max_tokens: int) -> dict:
    """Per layer and domain: share of token slots each FFN expert receives, mean attention gate."""
    n_layers = model.config.num_hidden_layers
    ffn = [[None] * len(domains) for _ in range(n_layers)]
    attn = [[None] * len(domains) for _ in range(n_layers)]
    for d, domain in enumerate(domains):
        ffn_counts = torch.zeros(n_layers, model.config.n_ffn_experts)
        attn_sums = torch.zeros(n_layers, model.config.n_attn_experts)
        n_tokens = 0
        for tokens, mask in iter_eval_batches(domain, "test", seq_len, batch_size, max_tokens):
            out = model(input_ids=tokens[:, :-1], use_cache=False, output_routing=True)
            keep_T = mask.flatten()
            n_tokens += int(keep_T.sum())
            for layer, r in enumerate(out.routing):
                if r.ffn_expert_index is not None:
                    chosen = r.ffn_expert_index[keep_T].flatten()
                    ffn_counts[layer] += torch.bincount(chosen, minlength=model.config.n_ffn_experts)
                if r.attn_gates is not None:
                    attn_sums[layer] += r.attn_gates.flatten(0, 1)[keep_T].sum(0)
        for layer in range(n_layers):
            if model.config.n_ffn_experts > 1:
                ffn[layer][d] = (ffn_counts[layer] / ffn_counts[layer].sum()).tolist()
            if model.config.n_attn_experts > 1:
                attn[layer][d] = (attn_sums[layer] / max(n_tokens, 1)).tolist()
    return {"ffn": ffn if model.config.n_ffn_experts > 1 else None,
            "attn": attn if model.config.n_attn_experts > 1 else None}
