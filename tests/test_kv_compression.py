"""SnapKV prompt compression (bam/modeling/kv_compression.py, METHOD.md 8) against a loop-by-loop
reference, the uncompressed model, full attention with the dropped keys masked out, bam.cost's
KV bytes, and the dense model it was mixed from."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from bam.cli import main
from bam.errors import BamError
from bam.formats.model_dir import load_model, save_model
from bam.modeling.attention import MixtureOfAttention
from bam.modeling.cost import compressed_kv_cache_bytes
from bam.modeling.kv_compression import SnapKV, SnapKVCache, parse_budget, split_budget

N_PROMPT, WINDOW, KERNEL = 40, 6, 5
VARIANTS = {  # name: (config overrides, split)
    "dense": ({}, "even"),
    "bam": (dict(n_attn_experts=3), "even"),
    "bam-gate": (dict(n_attn_experts=3), "gate"),
    "bam-shared": (dict(n_attn_experts=3, kv_shared=True), "even"),
}


def prompt(batch: int = 1, length: int = N_PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def variant_model(tiny_config, random_model):
    """Factory: a random fp64 model of a VARIANTS entry (fp64: no near-ties in the top-k), and its split."""

    def make(name: str, **overrides):
        fields, split = VARIANTS[name]
        model = random_model(tiny_config(**fields, **overrides), seed=3).double()
        for module in model.modules():  # sharper, uneven gates than the 0.1 weights give
            if isinstance(module, MixtureOfAttention) and module.router is not None:
                module.router.weight.data *= 20
        return model, split

    return make


def compressed(model, ids, budget, split="even", pooling="avg"):
    cache = SnapKVCache(model, budget, window=WINDOW, kernel=KERNEL, pooling=pooling, split=split)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
    return cache, logits


# ---------------------------------------------------------------------------------------------
# The reference: SnapKV written out position by position


def rope_by_hand(x_TA: torch.Tensor, positions, theta: float) -> torch.Tensor:
    half = x_TA.shape[-1] // 2
    out = torch.empty_like(x_TA)
    for t, p in enumerate(positions):
        for i in range(half):
            angle = p * theta ** (-2 * i / x_TA.shape[-1])
            c, s = torch.cos(torch.tensor(angle, dtype=x_TA.dtype)), torch.sin(torch.tensor(angle, dtype=x_TA.dtype))
            out[t, i] = x_TA[t, i] * c - x_TA[t, i + half] * s
            out[t, i + half] = x_TA[t, i + half] * c + x_TA[t, i] * s
    return out


@torch.no_grad()
def reference_snapkv(model, ids, n_kept: int, pooling: str, counts=None):
    """Kept positions per layer, K/V set and (batch, K/V head): lists of ints. `counts[layer]`: what each
    K/V set keeps (the gate split's); default n_kept each."""
    config = model.config
    inputs, gates = {}, {}

    def capture(module, args, output):
        inputs[module.layer_idx], gates[module.layer_idx] = args[0], output[1]

    attns = [m for m in model.modules() if isinstance(m, MixtureOfAttention)]
    handles = [m.register_forward_hook(capture) for m in attns]
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(ids, cache=cache)
    for handle in handles:
        handle.remove()

    E, H, n_kv, A = config.n_attn_experts, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    X, group, S, w = config.n_kv_experts, H // n_kv, ids.shape[1], WINDOW
    theta = config.rope_parameters["rope_theta"]
    result = []
    for attn in attns:
        i = attn.layer_idx
        h = inputs[i]
        keys = cache.layers[i].keys  # [B, X*n_kv, S, A], after RoPE
        q_all = h @ attn.q_proj.weight.T  # [B, S, E*H*A]
        layer = []
        for x in range(X):
            per_batch = []
            for b in range(ids.shape[0]):
                per_head = []
                for kv in range(n_kv):
                    k_SA = keys[b, x * n_kv + kv]
                    votes = [0.0] * (S - w)
                    voters = [x] if X == E else range(E)  # KV experts: its own queries; shared: all experts'
                    for e in voters:
                        for g in range(group):
                            head = (e * H + kv * group + g) * A
                            q_TA = rope_by_hand(q_all[b, S - w:, head:head + A], range(S - w, S), theta)
                            for t in range(w):
                                p = S - w + t
                                logits = torch.stack([q_TA[t] @ k_SA[s] for s in range(p + 1)]) / A**0.5
                                probs = torch.softmax(logits.double(), dim=0)
                                weight = 1.0 if X == E else float(gates[i][b, p, e])
                                for s in range(S - w):
                                    votes[s] += weight * float(probs[s]) / group
                    n = len(votes)
                    if pooling == "avg":
                        scores = [sum(votes[j] for j in range(s - KERNEL // 2, s + KERNEL // 2 + 1) if 0 <= j < n)
                                  / KERNEL for s in range(n)]
                    else:
                        scores = [max(votes[j] for j in range(s - KERNEL // 2, s + KERNEL // 2 + 1) if 0 <= j < n)
                                  for s in range(n)]
                    keep = n_kept if counts is None else counts[i][x]
                    top = sorted(range(n), key=lambda s: -scores[s])[: keep - w]  # ties: the earlier position
                    per_head.append(sorted(top) + list(range(S - w, S)))
                per_batch.append(per_head)
            layer.append(per_batch)
        result.append(layer)
    return result


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_selection_is_the_reference_snapkv(name, pooling, variant_model):
    model, split = variant_model(name)
    ids = prompt(batch=2)
    cache, _ = compressed(model, ids, 16, split, pooling)
    kept = [[x.tolist() for x in layer.kept] for layer in cache.layers]
    counts = [[len(x[0][0]) for x in layer] for layer in kept]
    if split == "gate":  # the split: the total of an even split, each within [window, prompt], not all equal
        assert all(sum(c) == 16 * 3 and min(c) >= WINDOW and max(c) <= N_PROMPT for c in counts)
        assert any(len(set(c)) > 1 for c in counts)
    assert kept == reference_snapkv(model, ids, 16, pooling, counts)


@pytest.mark.parametrize("fields", [dict(qk_norm=True, qkv_bias=True), dict(qk_norm=True, qk_norm_scope="all"),
                                    dict(n_attn_experts=3, qk_norm=True), dict(n_attn_experts=3, kv_shared=True),
                                    dict(n_attn_experts=3, attn_mixing="parameters")])
def test_window_queries_are_the_queries_attention_computes(fields, tiny_config, random_model, monkeypatch):
    """The queries the window votes with are the ones the model's SDPA call receives."""
    import torch.nn.functional as F  # noqa: PLC0415

    from bam.modeling.kv_compression import window_queries  # noqa: PLC0415

    model = random_model(tiny_config(**fields), seed=2)
    attn = model.model.layers[0].attn
    seen, sdpa = {}, F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        seen.setdefault("q", q)
        return sdpa(q, *args, **kwargs)

    inputs = {}
    attn.register_forward_hook(lambda module, args, output: inputs.update(args=args, gates=output[1]))
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        model(prompt())
        h, cos_sin = inputs["args"][:2]
        q_BEHTA = window_queries(attn, h, cos_sin, inputs["gates"], WINDOW)
    B, E, H, T, A = q_BEHTA.shape
    expected_BHTA = seen["q"][:, :, -WINDOW:]
    if attn.kv_shared:  # SDPA's head order is (K/V head, expert, group)
        expected_BHTA = expected_BHTA.view(B, attn.n_kv_heads, E, H // attn.n_kv_heads, T, A).transpose(1, 2)
    torch.testing.assert_close(q_BEHTA, expected_BHTA.reshape(B, E, H, T, A), atol=1e-5, rtol=1e-5)  # (a slice: matmul rounding)


def test_gate_split_follows_the_gate_mass():
    """Past each expert's window (2 here), the positions go by gate mass, largest remainders first."""
    assert split_budget(30, [0.5, 0.3, 0.2], 2, 100) == [14, 9, 7]  # 2 + (12, 7.2, 4.8)
    assert split_budget(32, [0.5, 0.3, 0.2], 2, 100) == [15, 10, 7]  # 2 + (13, 7.8, 5.2)
    assert split_budget(30, [0.9, 0.05, 0.05], 4, 12) == [12, 9, 9]  # capped; the rest goes to the others
    assert split_budget(12, [1.0, 0.0, 0.0], 4, 12) == [4, 4, 4]  # every expert keeps at least the window


# ---------------------------------------------------------------------------------------------
# What the model computes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_budget_of_the_whole_prompt_changes_nothing(name, variant_model):
    model, split = variant_model(name)
    ids = prompt()
    settings = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True,
                    pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        for budget in (N_PROMPT, 1000, 1.0):
            snap = model.generate(ids, cache=SnapKVCache(model, budget, window=WINDOW, split=split), **settings)
            assert torch.equal(snap.sequences, plain.sequences)
            for ours, theirs in zip(snap.logits, plain.logits):
                assert torch.equal(ours, theirs)


class KeptKeysOnly:
    """The forward's masks, each also hiding the prompt positions a layer's K/V heads dropped
    (per query head, in MixtureOfAttention's head order): full attention over what was kept."""

    def __init__(self, masks, keep_HS):
        self.masks, self.keep_HS = masks, keep_HS

    def __call__(self, window, kv_len):
        keep = torch.ones(self.keep_HS.shape[0], kv_len, dtype=torch.bool)
        keep[:, : self.keep_HS.shape[1]] = self.keep_HS
        base = self.masks(window, kv_len)
        return keep[None, :, None] if base is None else base & keep[None, :, None]


def decode_with_dropped_keys_masked(model, ids, kept_by_layer, steps):
    """Logits of each step of `steps` after a full, uncompressed prefill of `ids` (batch 1), with the
    dropped prompt positions masked out of every attention of the steps."""
    config = model.config
    E, H, n_kv = config.n_attn_experts, config.num_attention_heads, config.num_key_value_heads
    group = H // n_kv

    def keep_per_query_head(kept):
        keep_XKS = torch.zeros(len(kept), n_kv, ids.shape[1], dtype=torch.bool)
        for x, kept_BKN in enumerate(kept):
            for kv in range(n_kv):
                keep_XKS[x, kv, kept_BKN[0, kv]] = True
        if config.n_kv_experts == 1 and E > 1:  # shared: query heads ordered (K/V head, expert, group)
            return keep_XKS[0].repeat_interleave(E * group, dim=0)
        return keep_XKS.flatten(0, 1).repeat_interleave(group, dim=0)  # (expert, K/V head, group)

    keeps = {i: keep_per_query_head(kept) for i, kept in enumerate(kept_by_layer)}

    def mask_dropped(module, args):
        h, cos_sin, masks, cache = args
        return h, cos_sin, KeptKeysOnly(masks, keeps[module.layer_idx]), cache

    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(ids, cache=cache)
        handles = [m.register_forward_pre_hook(mask_dropped) for m in model.modules()
                   if isinstance(m, MixtureOfAttention)]
        try:
            return [model(step, cache=cache).logits for step in steps]
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoding_after_compression_is_full_attention_over_the_kept_keys(name, variant_model):
    """At true positions: the new tokens are fed with no position ids, so the model takes them
    from the cache; one token, then three at once (the causal mask among new keys)."""
    model, split = variant_model(name)
    ids = prompt()
    steps = [prompt(1, 1, seed=5), prompt(1, 3, seed=6)]
    cache, _ = compressed(model, ids, 14, split)
    with torch.no_grad():
        ours = [model(step, cache=cache).logits for step in steps]
    assert cache.get_seq_length() == N_PROMPT + 4
    reference = decode_with_dropped_keys_masked(model, ids, [layer.kept for layer in cache.layers], steps)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    # and the masking matters: the uncompressed model decodes otherwise
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=full)
        assert not torch.allclose(model(steps[0], cache=full).logits, ours[0], atol=1e-6)


@pytest.mark.parametrize("budget", [14, 0.5])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_held_bytes_are_costs_figure(name, budget, variant_model):
    model, split = variant_model(name)
    ids = prompt(batch=2)
    cache, _ = compressed(model, ids, budget, split)
    per_sequence = compressed_kv_cache_bytes(model.config, N_PROMPT, budget, dtype_bytes=8)
    assert cache.held_bytes() == 2 * per_sequence
    with torch.no_grad():
        model(prompt(2, 3, seed=4), cache=cache)
    assert cache.held_bytes() == 2 * compressed_kv_cache_bytes(model.config, N_PROMPT, budget, n_new=3, dtype_bytes=8)
    uncompressed = compressed_kv_cache_bytes(model.config, N_PROMPT, 1.0, dtype_bytes=8)
    assert per_sequence < uncompressed


@pytest.mark.parametrize("method", ["bam", "bam-shared"])
def test_identical_experts_compress_as_the_dense_model(method, tiny_config, random_model, tmp_path):
    """Two copies, routers zeroed: gates of exactly 1/2 make the mixture the dense model to the last
    bit, so the very same positions must be kept (other gates sum to 1 only to fp32's rounding,
    which can flip a near-tie of the top-k)."""
    dense_dir = save_model(random_model(tiny_config(), 0), tmp_path / "dense")
    options = ["--top-k", "2", "--renormalize"]
    assert main(["mix", "--method", method, "--out", str(tmp_path / "moe"), *options, *[str(dense_dir)] * 2]) == 0
    dense, moe = load_model(dense_dir).double().eval(), load_model(tmp_path / "moe").double().eval()
    with torch.no_grad():
        for name, param in moe.named_parameters():
            if "router" in name:
                param.zero_()
    ids, step = prompt(), prompt(1, 2, seed=8)
    dense_cache, dense_logits = compressed(dense, ids, 12)
    moe_cache, moe_logits = compressed(moe, ids, 12)
    for dense_layer, moe_layer in zip(dense_cache.layers, moe_cache.layers):
        assert len(moe_layer.kept) == moe.config.n_kv_experts
        for kept in moe_layer.kept:
            assert torch.equal(kept, dense_layer.kept[0])
    with torch.no_grad():
        torch.testing.assert_close(moe(step, cache=moe_cache).logits, dense(step, cache=dense_cache).logits,
                                   atol=1e-10, rtol=0)
    torch.testing.assert_close(moe_logits, dense_logits, atol=1e-10, rtol=0)


def test_hooks_go_with_the_cache(variant_model):
    import gc  # noqa: PLC0415

    model, split = variant_model("bam-gate")
    attns = [m for m in model.modules() if isinstance(m, MixtureOfAttention)]
    cache, _ = compressed(model, prompt(), 14, split)
    assert all(len(m._forward_hooks) == len(m._forward_pre_hooks) == 1 for m in attns)
    del cache, _
    gc.collect()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in attns)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("budget, expected", [
    (0, "a positive number of tokens"), (-3, "a positive number of tokens"), (0.0, "(0, 1]"), (1.5, "(0, 1]"),
    (WINDOW - 1, f"at least the observation window of {WINDOW}"), (True, "a positive number"),
])
def test_bad_budgets_are_refused(budget, expected):
    with pytest.raises(BamError, match=expected.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        SnapKV(budget, window=WINDOW)


def test_bad_prompts_are_refused(variant_model):
    model, _ = variant_model("dense")
    with pytest.raises(BamError, match="keeps 4 of the prompt's 40 tokens, expected at least the observation window"):
        compressed(model, prompt(), 0.1)
    with pytest.raises(BamError, match="the batch is padded"):
        cache = SnapKVCache(model, 12, window=WINDOW)
        with torch.no_grad():
            model(prompt(2), attention_mask=torch.tensor([[1] * N_PROMPT, [0] + [1] * (N_PROMPT - 1)]), cache=cache)
    with pytest.raises(BamError, match="no prompt to compress"):
        SnapKV(12, window=WINDOW).kept(0)
    with pytest.raises(BamError, match="sliding-window layers"):
        sliding = model.config.__class__(**{**model.config.to_dict(), "sliding_window": 8})
        SnapKVCache(model.__class__(sliding), 12, window=WINDOW)


@pytest.mark.parametrize("value, expected", [("512", 512), ("0.25", 0.25), ("1.0", 1.0)])
def test_budget_parsing(value, expected):
    assert parse_budget(value) == expected and type(parse_budget(value)) is type(expected)


@pytest.mark.parametrize("value, message", [
    ("abc", "--kv-budget 'abc': expected a number of tokens"), ("8", "kv budget=8: expected at least the observation"),
    ("0", "kv budget=0: expected a positive number"), ("2.5", "kv budget=2.5: expected a fraction"),
])
def test_cli_refuses_bad_budgets_in_one_line(value, message, tmp_path, capsys):
    code = main(["generate", str(tmp_path / "no-model"), "--prompt", "x", "--kv-budget", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
