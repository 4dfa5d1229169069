"""Causal grouped-query attention (GQA), the NumPy/CuPy reference.

nH query heads share nKV key/value heads: query head h reads kv head h // (nH / nKV)
(consecutive groups, like Hugging Face's repeat_kv). The ratio is data: 1:1, 4:1, 7:1 all run
through the same code.

Layout trick: the g = nH / nKV query heads of one group are stacked along the row axis, so each
kv head does ONE matmul with g*T query rows. The backward's sum over a group's query heads
(dK, dV of a shared head) then falls out of the matmul's contraction over those rows.

Like FlashAttention, the forward keeps only the output and the per-row log-sum-exp; the
backward recomputes the probabilities from them, so no T x T matrix outlives a call.
"""

import functools
import math

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import attention as attention_kernels


@functools.lru_cache(maxsize=8)
def _mask(xp, T, dtype):
    """(T, T): 0 on and below the diagonal, -inf above it; made once per size."""
    return xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)


def _causal_scores(qh, kh, scale):
    """S = Q K^T * scale with -inf where key j > query i. qh (B, nKV, g*T, hd), kh (B, nKV, T, hd)."""
    T = kh.shape[2]
    s = qh @ kh.swapaxes(-1, -2)  # (B, nKV, g*T, T)
    s *= scale
    s5 = s.reshape(s.shape[:2] + (-1, T, T))  # (B, nKV, g, T, T): view, one T x T block per head
    s5 += _mask(backend.xp, T, s.dtype)
    return s


class Attention(Function):
    """O = softmax(Q K^T / sqrt(hd) + M) V per head, M = -inf above the diagonal (causal).
    q (B, T, nH, hd), k and v (B, T, nKV, hd) -> o (B, T, nH, hd).

    Forward per row i: s_ij = q_i.k_j * c, P_ij = exp(s_ij - lse_i), lse_i = log sum_j exp(s_ij),
    o_i = sum_j P_ij v_j. Backward, with dO given:
      dV = P^T dO                               (summed over the group's stacked rows)
      dP = dO V^T
      dS_ij = P_ij (dP_ij - D_i),  D_i = sum_j P_ij dP_ij = dO_i . o_i     (softmax Jacobian)
      dQ = dS K * c,   dK = dS^T Q * c          (dK also summed over the group's rows)
    Masked entries have P_ij = 0, so they pass no gradient.
    """

    def forward(self, q, k, v):
        B, T, nH, hd = q.shape
        nKV = k.shape[2]
        if nH % nKV or k.shape != v.shape or k.shape[:2] + k.shape[3:] != (B, T, hd):
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not (B, T, nH, hd) "
                             "and (B, T, nKV, hd) with nH a multiple of nKV")
        g = nH // nKV
        xp = backend.xp
        if (launch := backend.kernels(q, k, v)) and hd in attention_kernels.FORWARD_ROWS:  # kernels/attention.cu
            q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
            o, lse = xp.empty_like(q), xp.empty((B, nH, T), dtype=xp.float32)
            attention_kernels.forward(launch, q, k, v, o, lse)
            self.save(q, k, v, o, lse, None)  # no scale: marks the kernel path
            return o
        if q.dtype == backend.BF16:
            raise ValueError(f"attention: bf16 runs only on the kernel, which has head_dim "
                             f"{sorted(attention_kernels.FORWARD_ROWS)}; this model has {hd}")
        # heads first; the g query heads of kv head j are heads j*g .. j*g+g-1, stacked as rows
        qh = xp.ascontiguousarray(q.transpose(0, 2, 1, 3)).reshape(B, nKV, g * T, hd)
        kh = xp.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (B, nKV, T, hd)
        vh = xp.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, nKV, T, hd)
        scale = 1.0 / math.sqrt(hd)
        s = _causal_scores(qh, kh, scale)  # (B, nKV, g*T, T)
        m = s.max(axis=-1, keepdims=True)  # (B, nKV, g*T, 1): finite, the diagonal is never masked
        p = xp.exp(s - m, out=s)
        denom = p.sum(axis=-1, keepdims=True)
        p /= denom
        oh = p @ vh  # (B, nKV, g*T, hd)
        lse = m + xp.log(denom)  # (B, nKV, g*T, 1)
        self.save(qh, kh, vh, oh, lse, scale)
        return oh.reshape(B, nH, T, hd).transpose(0, 2, 1, 3).copy()  # (B, T, nH, hd) contiguous

    def backward(self, g_out):
        qh, kh, vh, oh, lse, scale = self.saved
        if scale is None:  # the forward ran the kernel: q, k, v, o in (B, T, heads, hd)
            xp = backend.xp
            dq, dk, dv = xp.empty_like(qh), xp.empty_like(kh), xp.empty_like(vh)
            D = xp.empty(lse.shape, dtype=xp.float32)
            attention_kernels.backward(backend.launch, qh, kh, vh, oh, xp.ascontiguousarray(g_out), lse, dq, dk, dv, D)
            return dq, dk, dv
        B, T, nH, hd = g_out.shape
        xp = backend.xp
        do = xp.ascontiguousarray(g_out.transpose(0, 2, 1, 3)).reshape(oh.shape)  # (B, nKV, g*T, hd)
        p = _causal_scores(qh, kh, scale)
        p -= lse
        xp.exp(p, out=p)  # P recomputed from the saved log-sum-exp: (B, nKV, g*T, T)
        dv = p.swapaxes(-1, -2) @ do  # (B, nKV, T, hd): sums over the g stacked heads
        dp = do @ vh.swapaxes(-1, -2)  # (B, nKV, g*T, T)
        D = (do * oh).sum(axis=-1, keepdims=True)  # (B, nKV, g*T, 1)
        dp -= D
        ds = p * dp
        ds *= scale
        dq = ds @ kh  # (B, nKV, g*T, hd)
        dk = ds.swapaxes(-1, -2) @ qh  # (B, nKV, T, hd)
        return (dq.reshape(B, nH, T, hd).transpose(0, 2, 1, 3),
                dk.transpose(0, 2, 1, 3),
                dv.transpose(0, 2, 1, 3))


def attention(q, k, v):
    return Attention.apply(q, k, v)
