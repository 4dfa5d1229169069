"""Causal grouped-query attention (GQA), the NumPy/CuPy reference.

nH query heads share nKV key/value heads: query head h reads kv head h // (nH / nKV)
(consecutive groups, like Hugging Face's repeat_kv). The ratio is data: 1:1, 4:1, 7:1 all run
through the same code.

Layout trick: the g = nH / nKV query heads of one group are stacked along the row axis, so each
kv head does ONE matmul with g*T query rows. The backward's sum over a group's query heads
(dK, dV of a shared head) then falls out of the matmul's contraction over those rows.

Like FlashAttention, the forward keeps only the output and the per-row log-sum-exp; the
backward recomputes the probabilities from them, so no T x T matrix outlives a call.

The products are whole batched matmuls; the softmax's row work goes by blocks of query rows
to every core, and a block of positions a..e-1 works on its e visible key columns only (its
P is exactly 0 beyond them). Each row goes through the same operations as the whole-array
formulas, with sums over full rows: the same bits.
"""

import functools
import math

import numpy

from minitrain import backend, parallel
from minitrain.autograd import Function
from minitrain.gpu import attention as attention_kernels


BLOCK = 1 << 16  # score elements per block of rows on the CPU (parallel.py)


@functools.lru_cache(maxsize=8)
def _mask(xp, T, dtype):
    """(T, T): 0 on and below the diagonal, -inf above it; made once per size."""
    return xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)


def _causal(s, a, e, scale, starts=None):
    """s: the raw scores Q K^T of query positions a..e-1 (rows) against all T keys (columns), a
    view. Scales them and adds -inf where key j > query i; the columns j >= e, -inf on every row,
    are left out: returns the view s[:, :e] the softmax needs (the caller zeroes the rest of P).
    `starts` (e - a,): each row's first visible key (packed windows), -inf before it too."""
    seen = s[:, :e]
    seen *= scale
    seen += _mask(backend.xp, s.shape[1], s.dtype)[a:e, :e]
    if starts is not None:
        xp = backend.xp
        seen[xp.arange(e)[None, :] < starts[:, None]] = -xp.inf
    return seen


def _blocks(B, nKV, g, T):
    """The row blocks of the (B, nKV, g*T, T) scores: (b, j, rows, a, e) for query positions
    a..e-1 of one head (rows h*T+a .. h*T+e-1 of kv head j). On the CPU about BLOCK scores each,
    dealt to every core; on CuPy one block per head."""
    rows = max(1, BLOCK // T) if backend.xp is numpy else T
    return [(b, j, slice(h * T + p.start, h * T + p.stop), p.start, p.stop)
            for b in range(B) for j in range(nKV) for h in range(g) for p in parallel.slices(T, rows)]


class Attention(Function):
    """O = softmax(Q K^T / sqrt(hd) + M) V per head, M = -inf above the diagonal (causal).
    q (B, T, nH, hd), k and v (B, T, nKV, hd) -> o (B, T, nH, hd). With `starts` (B, T) (a packed
    window: several conversations one after another), query i sees keys starts[b, i] .. i only,
    the start of its own conversation (M = -inf before it too): attention never crosses them.

    Forward per row i: s_ij = q_i.k_j * c, P_ij = exp(s_ij - lse_i), lse_i = log sum_j exp(s_ij),
    o_i = sum_j P_ij v_j. Backward, with dO given:
      dV = P^T dO                               (summed over the group's stacked rows)
      dP = dO V^T
      dS_ij = P_ij (dP_ij - D_i),  D_i = sum_j P_ij dP_ij = dO_i . o_i     (softmax Jacobian)
      dQ = dS K * c,   dK = dS^T Q * c          (dK also summed over the group's rows)
    Masked entries have P_ij = 0, so they pass no gradient.
    """

    def forward(self, q, k, v, starts=None):
        starts = _checked(q, k, v, starts)
        B, T, nH, hd = q.shape
        nKV = k.shape[2]
        g = nH // nKV
        xp = backend.xp
        if q.dtype == backend.BF16:
            raise ValueError(f"attention: bf16 runs only on the kernel, which has head_dim "
                             f"{sorted(attention_kernels.FORWARD_ROWS)}; this model has {hd}")
        # heads first; the g query heads of kv head j are heads j*g .. j*g+g-1, stacked as rows
        qh = xp.ascontiguousarray(q.transpose(0, 2, 1, 3)).reshape(B, nKV, g * T, hd)
        kh = xp.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (B, nKV, T, hd)
        vh = xp.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, nKV, T, hd)
        scale = 1.0 / math.sqrt(hd)
        p = qh @ kh.swapaxes(-1, -2)  # (B, nKV, g*T, T) raw scores, P in their place
        lse = xp.empty(p.shape[:3] + (1,), dtype=p.dtype)  # (B, nKV, g*T, 1)

        def softmax(_, block):
            b, j, rows, a, e = block
            s = _causal(p[b, j, rows], a, e, scale, None if starts is None else starts[b, a:e])  # (e - a, e)
            m = s.max(axis=-1, keepdims=True)  # finite: the diagonal is never masked
            s -= m
            xp.exp(s, out=s)
            p[b, j, rows, s.shape[1]:] = 0.0
            denom = p[b, j, rows].sum(axis=-1, keepdims=True)  # over the full row
            s /= denom
            lse[b, j, rows] = m + xp.log(denom)

        parallel.run(_blocks(B, nKV, g, T), softmax)
        oh = p @ vh  # (B, nKV, g*T, hd)
        self.save(qh, kh, vh, oh, lse, scale, starts)
        return oh.reshape(B, nH, T, hd).transpose(0, 2, 1, 3).copy()  # (B, T, nH, hd) contiguous

    def backward(self, g_out):
        qh, kh, vh, oh, lse, scale, starts = self.saved
        B, T, nH, hd = g_out.shape
        xp = backend.xp
        do = xp.ascontiguousarray(g_out.transpose(0, 2, 1, 3)).reshape(oh.shape)  # (B, nKV, g*T, hd)
        nKV = kh.shape[1]
        blocks = _blocks(B, nKV, nH // nKV, T)
        p = qh @ kh.swapaxes(-1, -2)  # (B, nKV, g*T, T) raw scores, P in their place

        def probabilities(_, block):  # P recomputed from the saved log-sum-exp
            b, j, rows, a, e = block
            s = _causal(p[b, j, rows], a, e, scale, None if starts is None else starts[b, a:e])
            s -= lse[b, j, rows]
            xp.exp(s, out=s)
            p[b, j, rows, s.shape[1]:] = 0.0

        parallel.run(blocks, probabilities)
        dv = p.swapaxes(-1, -2) @ do  # (B, nKV, T, hd): sums over the g stacked heads
        ds = do @ vh.swapaxes(-1, -2)  # (B, nKV, g*T, T): dP, dS in its place

        def softmax_backward(_, block):
            b, j, rows = block[:3]
            D = (do[b, j, rows] * oh[b, j, rows]).sum(axis=-1, keepdims=True)  # (rows, 1)
            d = ds[b, j, rows]
            d -= D
            xp.multiply(p[b, j, rows], d, out=d)
            d *= scale

        parallel.run(blocks, softmax_backward)
        dq = ds @ kh  # (B, nKV, g*T, hd)
        dk = ds.swapaxes(-1, -2) @ qh  # (B, nKV, T, hd)
        return (dq.reshape(B, nH, T, hd).transpose(0, 2, 1, 3),
                dk.transpose(0, 2, 1, 3),
                dv.transpose(0, 2, 1, 3), None)


def _checked(q, k, v, starts):
    """ValueError unless q (B, T, nH, hd) and k, v (B, T, nKV, hd) with nH a multiple of nKV;
    -> starts as a contiguous (B, T) int64 array where the arrays live, or None."""
    B, T, nH, hd = q.shape
    nKV = k.shape[2]
    if nH % nKV or k.shape != v.shape or k.shape[:2] + k.shape[3:] != (B, T, hd):
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not (B, T, nH, hd) "
                         "and (B, T, nKV, hd) with nH a multiple of nKV")
    if starts is None:
        return None
    xp = backend.xp
    return xp.ascontiguousarray(xp.asarray(starts, dtype=numpy.int64))  # (B, T) first visible key of each query


class AttentionKernel(Attention):
    """kernels/attention.cu and attention_mma.cu (bf16 on the tensor cores): q, k, v, o kept in
    their (B, T, heads, hd) layout with the log-sum-exp (B, nH, T); the backward's D = rowsum(dO o)
    by its own kernel."""

    def forward(self, q, k, v, starts=None):
        B, T, nH, hd = q.shape
        xp = backend.xp
        starts = _checked(q, k, v, starts)
        q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
        o, lse = xp.empty_like(q), xp.empty((B, nH, T), dtype=xp.float32)
        attention_kernels.forward(backend.launch, q, k, v, o, lse, starts)
        self.save(q, k, v, o, lse, starts)
        return o

    def backward(self, g_out):
        q, k, v, o, lse, starts = self.saved
        xp = backend.xp
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        D = xp.empty(lse.shape, dtype=xp.float32)
        attention_kernels.backward(backend.launch, q, k, v, o, xp.ascontiguousarray(g_out), lse, dq, dk, dv, D, starts)
        return dq, dk, dv, None


def attention(q, k, v, starts=None):
    kernel = AttentionKernel if q.shape[-1] in attention_kernels.FORWARD_ROWS else None
    return backend.route((q, k, v), Attention, kernel=kernel).apply(q, k, v, starts)
