"""Fused LM head + cross-entropy: the loss of `softmax(scale * h W^T)` without the logit matrix.

With a 32000-token vocabulary the logits of a 2048-token batch are a 262 MB fp32 tensor, and the
unfused loss also writes log_softmax, its gradient and the logits' gradient: four tensors of that
size, each paying page faults on first touch and several memory passes. Here the rows are taken
in chunks; for each chunk the forward computes the logits, their log-sum-exp, the loss and, since
the loss is a scalar whose gradient is known as soon as the softmax is, the gradients w.r.t. h and
W right away. Backward only scales them by the incoming gradient. Only two [chunk, V] buffers
(logits, softmax) exist, reused by every chunk; the GEMM FLOPs are the same three as the unfused
head's.

Per row with target t and logits z = s * W h (s the logit scale), loss = logsumexp(z) - z_t and
dloss/dz = softmax(z) - onehot(t), so with n the number of non-ignored targets (the loss is their
mean, as F.cross_entropy's):
    dh = s * (softmax(z) W - W_t) / n          dW = (softmax(z)^T (s h) - scatter_t(s h)) / n
The onehot terms are a gather and a scatter of [T, D] rows, done once after the chunk loop.

With final-logit soft-capping (Gemma 2) the logits are z = c tanh(u / c) of u = s * W h, so the
loss sees z and the GEMMs see dloss/du = (softmax(z) - onehot(t)) * (1 - (z / c)^2): the factor
multiplies the softmax rows in place and, for the onehot terms, is kept per row at the target.

Shape suffixes: the letters of bam/modeling/__init__.py.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Chunk size: the most rows, in multiples of 16, whose fp32 logits stay under 32 MiB (256 rows at
# V=32000). Measured at N=2048, D=256, V=32000 on a 2-core AVX-512 CPU (bench/README.md, "Training
# step"): smaller chunks cost the head time (64 rows: +9%, 128: +5% at 1 thread), as the dW
# accumulator's read-modify-write is amortized over fewer rows; row counts that are not a multiple
# of 16 slow the logits GEMM (250 rows: 144 GFLOP/s, 256: 175); beyond 256 rows the whole step
# gains at most 1-2%, within noise, while each buffer crosses 32 MiB, glibc's largest mmap
# threshold, above which it is page-faulted in afresh on every call instead of recycled.
CHUNK_BYTES = 32 * 2**20


def default_chunk_rows(vocab_size: int) -> int:
    return max(16, (CHUNK_BYTES - 1) // (4 * vocab_size) // 16 * 16)


def linear_cross_entropy(h_TD: torch.Tensor, weight_VD: torch.Tensor, targets_T: torch.Tensor, *,
                         logit_scale: float = 1.0, ignore_index: int = -100,
                         chunk_rows: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """`F.cross_entropy(logit_scale * h @ weight.T, targets, ignore_index=...)` (mean reduction),
    without materializing the logits; with `softcap` c, of the capped logits `c * tanh(logits / c)`.

    Under autocast the GEMMs run in the autocast dtype (as `nn.Linear` would) while the softmax
    statistics, the loss and the gradient accumulators stay in fp32; the gradients come back in
    the dtypes of `h` and `weight`. A tied weight is fine: its gradient reaches the shared
    parameter through autograd like any other use.
    """
    device_type = h_TD.device.type
    chunk_rows = chunk_rows or default_chunk_rows(weight_VD.shape[0])
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    # Inside an autograd.Function's forward grad mode is always off, so decide here which
    # gradients are needed (evaluation under no_grad computes the loss only; a frozen head skips
    # the dW GEMM).
    need_dh = torch.is_grad_enabled() and h_TD.requires_grad
    need_dW = torch.is_grad_enabled() and weight_VD.requires_grad
    return _LinearCrossEntropy.apply(h_TD, weight_VD, targets_T, float(logit_scale), ignore_index,
                                     chunk_rows, compute_dtype, need_dh, need_dW, softcap)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, weight_VD, targets_T, logit_scale, ignore_index, chunk_rows, compute_dtype,
                need_dh, need_dW, softcap):
        dtype = compute_dtype or torch.promote_types(h_TD.dtype, weight_VD.dtype)
        with torch.autocast(h_TD.device.type, enabled=False):
            loss, grad_h_TD, grad_W_VD = _loss_and_grads(
                h_TD.reshape(-1, h_TD.shape[-1]), weight_VD, targets_T.reshape(-1), logit_scale, ignore_index,
                chunk_rows, dtype, need_dh, need_dW, softcap)
        ctx.grad_h = grad_h_TD.to(h_TD.dtype).view_as(h_TD) if need_dh else None
        ctx.grad_W = grad_W_VD.to(weight_VD.dtype) if need_dW else None
        ctx.released = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # Scale in place and let go: no second [V, D] tensor, and autograd can adopt the tensor as
        # the weight's .grad without a copy. A second backward through the same graph therefore
        # has nothing left to scale.
        if ctx.released:
            raise RuntimeError("linear_cross_entropy: backward ran twice through one forward (retain_graph); "
                               "its gradients are computed in forward and handed over once")
        ctx.released = True
        grad_h, grad_W, ctx.grad_h, ctx.grad_W = ctx.grad_h, ctx.grad_W, None, None
        if grad_h is not None:
            grad_h.mul_(grad_loss)
        if grad_W is not None:
            grad_W.mul_(grad_loss)
        return grad_h, grad_W, None, None, None, None, None, None, None, None


def _loss_and_grads(h_TD, weight_VD, targets_T, scale, ignore_index, chunk_rows, dtype, need_dh, need_dW,
                    softcap=None):
    """fp32 loss (mean over non-ignored targets) and, as asked, fp32 dloss/dh [T, D] and dloss/dW [V, D]."""
    n_rows, n_vocab = h_TD.shape[0], weight_VD.shape[0]
    keep_T = targets_T != ignore_index
    n_valid = int(keep_T.sum())
    grad_W_VD = weight_VD.new_zeros(weight_VD.shape, dtype=torch.float32) if need_dW else None
    if n_valid == 0:  # F.cross_entropy's mean over no targets is 0/0; the gradients are zero
        grad_h_TD = h_TD.new_zeros(h_TD.shape, dtype=torch.float32) if need_dh else None
        return h_TD.new_tensor(float("nan"), dtype=torch.float32), grad_h_TD, grad_W_VD
    rows_T = None
    if n_valid < n_rows:  # ignored rows contribute nothing: compute only the others
        rows_T = keep_T.nonzero().squeeze(1)
        h_TD, targets_T = h_TD.index_select(0, rows_T), targets_T.index_select(0, rows_T)
    inv_n = 1.0 / n_valid

    # Scaling h instead of the logits costs a pass over [T, D] rather than [T, V]; the same scaled
    # rows are the operand of the dW GEMM.
    hs_TD = (h_TD * scale if scale != 1.0 else h_TD).to(dtype)
    w_VD = weight_VD.to(dtype)
    chunk_rows = min(chunk_rows, hs_TD.shape[0])
    z_buffer = torch.empty(chunk_rows, n_vocab, dtype=torch.float32, device=h_TD.device)
    p_buffer = torch.empty_like(z_buffer)
    grad_h_TD = torch.empty(hs_TD.shape, dtype=torch.float32, device=h_TD.device) if need_dh else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
    # With soft-capping: each row's dz/du at its target, for the onehot terms after the loop.
    cap_slope_T = torch.empty(hs_TD.shape[0], dtype=torch.float32, device=h_TD.device) if softcap else None
    for start in range(0, hs_TD.shape[0], chunk_rows):
        hs_CD, t_C = hs_TD[start:start + chunk_rows], targets_T[start:start + chunk_rows]
        z_CV, p_CV = z_buffer[:hs_CD.shape[0]], p_buffer[:hs_CD.shape[0]]
        _matmul_into(z_CV, hs_CD, w_VD.T)
        if softcap:  # z = c tanh(u / c), in the order of the unfused head
            z_CV.div_(softcap).tanh_().mul_(softcap)
        max_C = z_CV.amax(dim=1)
        target_logit_C = z_CV.gather(1, t_C[:, None]).squeeze(1)
        torch.softmax(z_CV, dim=1, out=p_CV)
        # The largest probability is exp(0) / sum(exp(z - max)), so logsumexp = max - log(max p):
        # no second exp pass, and max p >= 1/V never underflows.
        loss_sum += (max_C - p_CV.amax(dim=1).log() - target_logit_C).sum()
        if softcap and (need_dh or need_dW):  # dloss/du = (p - onehot) * (1 - (z / c)^2)
            slope_CV = z_CV.div_(softcap).square_().neg_().add_(1.0)
            cap_slope_T[start:start + hs_CD.shape[0]] = slope_CV.gather(1, t_C[:, None]).squeeze(1)
            p_CV.mul_(slope_CV)
        p_op = p_CV.to(dtype) if need_dh or need_dW else None
        if need_dh:
            _matmul_into(grad_h_TD[start:start + hs_CD.shape[0]], p_op, w_VD)  # softmax @ W
        if need_dW:
            _addmm_into(grad_W_VD, p_op.T, hs_CD, alpha=inv_n)  # softmax^T @ (s h) / n
    loss = loss_sum / n_valid

    # The onehot part of softmax - onehot; for dh also the mean's 1/n and the chain rule's s.
    if need_dh:
        w_target_TD = w_VD.index_select(0, targets_T).float()
        if softcap:
            w_target_TD.mul_(cap_slope_T[:, None])
        grad_h_TD.sub_(w_target_TD).mul_(scale * inv_n)
        if rows_T is not None:
            grad_h_TD = grad_h_TD.new_zeros(n_rows, grad_h_TD.shape[1]).index_copy_(0, rows_T, grad_h_TD)
    if need_dW:
        hs_target_TD = hs_TD.float() * cap_slope_T[:, None] if softcap else hs_TD.float()
        grad_W_VD.index_add_(0, targets_T, hs_target_TD, alpha=-inv_n)
    return loss, grad_h_TD, grad_W_VD


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, out fp32, a and b in the compute dtype: fp32 writes straight into `out`."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:  # bf16 operands: product formed in bf16, kept in fp32
        out.copy_(a @ b)


def _addmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """out += alpha * a @ b, out fp32 (the accumulator), a and b in the compute dtype."""
    if a.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(a @ b, alpha=alpha)
