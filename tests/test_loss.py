"""The fused LM head + cross-entropy (bam/modeling/loss.py) against F.cross_entropy over materialized logits."""

import pytest
import torch
import torch.nn.functional as F

from bam.modeling.loss import linear_cross_entropy


def assert_rel_close(actual, expected, rel=2e-6):
    """Max abs difference within `rel` of the reference's largest magnitude (fp32 rounding only)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    assert float((actual - expected).abs().max() / scale) <= rel


def problem(n_rows=301, width=48, vocab=1031, ignored_every=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.3
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)
    if ignored_every:
        targets[::ignored_every] = -100
    return h, weight, targets


def reference(h, weight, targets, logit_scale=1.0, softcap=None):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h @ weight.T) * logit_scale
    if softcap is not None:  # Gemma 2's final-logit soft-capping, in its order
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, ignore_index=-100)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def fused(h, weight, targets, **kwargs):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


# 301 rows: no chunk size below divides them, so the last chunk is always partial.
@pytest.mark.parametrize("chunk_rows", [1, 64, 128, 1000])
@pytest.mark.parametrize("logit_scale", [1.0, 0.37])
@pytest.mark.parametrize("ignored_every", [0, 3])
def test_loss_and_gradients_equal_cross_entropy(chunk_rows, logit_scale, ignored_every):
    h, weight, targets = problem(ignored_every=ignored_every)
    expected = reference(h, weight, targets, logit_scale)
    actual = fused(h, weight, targets, logit_scale=logit_scale, chunk_rows=chunk_rows)
    for a, e in zip(actual, expected):
        assert_rel_close(a, e)
    if ignored_every:
        assert actual[1][::ignored_every].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("chunk_rows", [64, 1000])
@pytest.mark.parametrize("ignored_every", [0, 3])
def test_softcapped_loss_and_gradients_equal_cross_entropy(chunk_rows, ignored_every):
    """With `softcap` the loss is that of cap * tanh(scale * h W^T / cap) and so are the gradients;
    the cap is small enough to change all three (else this would test nothing)."""
    h, weight, targets = problem(ignored_every=ignored_every)
    expected = reference(h, weight, targets, 0.37, softcap=1.0)
    actual = fused(h, weight, targets, logit_scale=0.37, chunk_rows=chunk_rows, softcap=1.0)
    for a, e, uncapped in zip(actual, expected, reference(h, weight, targets, 0.37)):
        assert_rel_close(a, e)
        assert (e - uncapped).abs().max() > 1e-2 * e.abs().max()


def test_large_logits_stay_finite():
    # Logits near 1e3: exp() overflows unless the row maximum is subtracted first.
    h, weight, targets = problem(n_rows=40, vocab=97)
    expected = reference(h * 300, weight, targets)
    actual = fused(h * 300, weight, targets, chunk_rows=16)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        assert_rel_close(a, e)


def test_incoming_gradient_scales_the_gradients():
    h, weight, targets = problem(n_rows=50, vocab=70)
    _, dh, dw = reference(h, weight, targets)
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    (linear_cross_entropy(h, weight, targets, chunk_rows=16) * 0.25).backward()
    assert_rel_close(h.grad, 0.25 * dh)
    assert_rel_close(weight.grad, 0.25 * dw)


def test_all_targets_ignored_is_nan_like_cross_entropy():
    h, weight, _ = problem(n_rows=8, vocab=20)
    targets = torch.full((8,), -100)
    h.requires_grad_()
    loss = linear_cross_entropy(h, weight, targets)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ weight.T, targets))
    loss.backward()
    assert h.grad.abs().max() == 0


def test_no_grad_computes_the_loss_only():
    h, weight, targets = problem(n_rows=64, vocab=200, ignored_every=5)
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), weight, targets, chunk_rows=30)
    assert not loss.requires_grad
    assert_rel_close(loss, F.cross_entropy(h.detach() @ weight.T, targets))


def test_bf16_autocast_keeps_fp32_loss_and_gradients():
    h, weight, targets = problem(n_rows=96, vocab=300)
    expected = reference(h, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fused(h, weight, targets, chunk_rows=40)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        assert_rel_close(a, e, rel=2e-2)  # bf16 operands of the GEMMs: ~3 significant digits


def bam_model(tied: bool, logit_scale: float = 1.0, softcap: float | None = None):
    from bam.modeling.config import BamConfig
    from bam.modeling.model import BamForCausalLM

    config = BamConfig(vocab_size=173, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       n_ffn_experts=3, ffn_top_k=2, tie_word_embeddings=tied, logit_scale=logit_scale,
                       final_logit_softcapping=softcap)
    torch.manual_seed(0)
    return BamForCausalLM(config)


@pytest.mark.parametrize("tied, logit_scale, softcap", [(False, 1.0, None), (True, 0.5, None), (True, 0.5, 0.05)])
def test_model_fused_loss_equals_logits_loss(tied, logit_scale, softcap):
    """return_logits=False gives the same loss and parameter gradients (the tied embedding/head
    weight receives both its uses) as the transformers-style path through the logits, final-logit
    soft-capping (Gemma 2) included."""
    model = bam_model(tied, logit_scale, softcap)
    ids = torch.randint(0, 173, (3, 17), generator=torch.Generator().manual_seed(1))
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False, return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) != return_logits
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = results
    assert_rel_close(loss, loss_ref)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, grad in grads_ref.items():
        assert_rel_close(grads[name], grad, rel=1e-5)  # through the whole model: a few more roundings


def test_shift_labels_score_every_position():
    """`bam train`'s objective: inputs tokens[:, :-1], targets tokens[:, 1:], all seq_len of them."""
    model = bam_model(tied=False)
    tokens = torch.randint(0, 173, (2, 13), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=tokens[:, :-1], shift_labels=tokens[:, 1:], return_logits=False, use_cache=False)
    logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
    lm = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert_rel_close(out.lm_loss.detach(), lm.detach())
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)


def test_frozen_weight_or_input_gets_no_gradient():
    h, weight, targets = problem(n_rows=40, vocab=90)
    _, dh, dw = reference(h, weight, targets)
    h_leaf = h.clone().requires_grad_()
    linear_cross_entropy(h_leaf, weight, targets, chunk_rows=16).backward()  # frozen head
    assert weight.grad is None
    assert_rel_close(h_leaf.grad, dh)
    w_leaf = weight.clone().requires_grad_()
    linear_cross_entropy(h, w_leaf, targets, chunk_rows=16).backward()  # only the head trains
    assert_rel_close(w_leaf.grad, dw)


def test_second_backward_through_one_forward_is_refused():
    h, weight, targets = problem(n_rows=20, vocab=30)
    h.requires_grad_()
    loss = linear_cross_entropy(h, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
