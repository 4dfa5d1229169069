"""The log-probability of each sequence's target tokens under the model, the lm_head fused in:
what DPO compares between the policy and its reference (ops/dpo.py).

For sequence s with rows n (its positions that have a target t_n) and logits z_n = x_n W^T (V,),
    L_s = sum_{n in s} log softmax(z_n)[t_n] = sum_{n in s} (z_n[t_n] - lse_n),
lse_n = log sum_v exp(z_n,v), i.e. minus the rows' cross-entropies (ops/cross_entropy.py), summed
per sequence instead of averaged over all rows. Since d lse_n / d z_n = softmax(z_n),
    d L_s / d z_n,v = [v == t_n] - softmax(z_n)_v   for n in s (0 for the rows of other sequences),
so with an incoming gradient g (S,), one value per sequence,
    dz_n = g_s(n) (onehot(t_n) - softmax(z_n)) = -g_s(n) (softmax(z_n) - onehot(t_n)),
    dx_n = dz_n W,   dW = sum_n dz_n^T x_n.
Unlike a loss at the end of the graph, g is known only in the backward: the forward keeps the
rows' inputs and their lse (one number a row), and the backward forms the logits again, chunk by
chunk, so the (N, V) logits never exist whole -- one head GEMM more than LinearCrossEntropy, the
memory of its chunks and nothing else.

x (S, T, H), W (V, H), targets (S, T) with IGNORE where a position has no target (a prompt token,
the padding after the sequence) -> (S,) in W's dtype; a sequence without a target has L_s = 0.
Each L_s is the float64 sum of its rows' fp32 (or fp64) log-probabilities in position order.
"""

import numpy

from minitrain import backend
from minitrain.autograd import Function
from minitrain.ops.cross_entropy import LinearCrossEntropy, all_rows, flat_rows, row_gradients, row_losses


class LinearSequenceLogprob(Function):
    BUDGET = LinearCrossEntropy.BUDGET  # bytes of a chunk's logits on the CPU (the same chunks as the loss)
    DEVICE_BUDGET = LinearCrossEntropy.DEVICE_BUDGET

    def forward(self, x, W, targets, chunk_rows=None):
        xp = backend.xp
        S, T = x.shape[0], x.shape[1]
        x2, t, keep = flat_rows(x, targets, W.shape[0])  # (N, H), (N,): the rows with a target
        rows = chunk_rows or max(1, (self.BUDGET if xp is numpy else self.DEVICE_BUDGET)
                                 // (W.shape[0] * W.dtype.itemsize))
        lse, logp = xp.empty(x2.shape[0], dtype=backend.acc_dtype(W.dtype)), xp.zeros(S * T, dtype=xp.float64)
        where = xp.arange(S * T) if keep is None else xp.asarray(keep)  # each row's place in (S*T,)
        for start in range(0, x2.shape[0], rows):
            nll, lse[start:start + rows] = row_losses(x2[start:start + rows] @ W.T, t[start:start + rows])
            logp[where[start:start + rows]] = -nll  # a scatter: rows of no target stay 0
        self.save(x2, W, t, lse, where // T, keep, x.shape, rows)
        return logp.reshape(S, T).sum(axis=1).astype(W.dtype)  # (S,): each sequence's sum, in position order

    def backward(self, g):
        x2, W, t, lse, seq, keep, shape, rows = self.saved
        xp = backend.xp
        dx = xp.empty_like(x2) if self.needs_grad[0] else None
        dW = xp.zeros(W.shape, dtype=W.dtype) if self.needs_grad[1] else None
        for start in range(0, x2.shape[0], rows):
            xc, tc = x2[start:start + rows], t[start:start + rows]
            z = xc @ W.T  # (r, V): the chunk's logits again
            dz = row_gradients(z, tc, lse[start:start + rows], 1.0, out=z)  # softmax - onehot, in place
            dz *= -g[seq[start:start + rows]].astype(W.dtype)[:, None]  # (r, V): -g_s (softmax - onehot)
            if dx is not None:
                xp.matmul(dz, W, out=dx[start:start + rows])
            if dW is not None:
                dW += dz.T @ xc
        return (None if dx is None else all_rows(dx, keep, shape)), dW, None


def linear_sequence_logprob(x, W, targets, chunk_rows=None):
    """x (S, T, H), W (V, H), targets (S, T) -> (S,): each sequence's summed target log-probabilities."""
    return LinearSequenceLogprob.apply(x, W, targets, chunk_rows=chunk_rows)
