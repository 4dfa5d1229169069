"""Knowledge distillation (Hinton et al. 2015) fused with the student's lm_head: one Function for
the head and the combined loss, over chunks of rows like LinearCrossEntropy."""

import math

from minitrain import backend
from minitrain.autograd import Function
from minitrain.ops.cross_entropy import all_rows, flat_rows, row_gradients, row_losses


def _log_softmax(a):
    """a (r, V) -> log softmax(a), in place, stably: a - m - log sum exp(a - m), m the row max."""
    xp = backend.xp
    a -= a.max(axis=-1, keepdims=True)
    a -= xp.log(xp.exp(a).sum(axis=-1, keepdims=True))
    return a


def _kl_gradient(logq, p, T, scale):
    """T (q - p) * scale, the gradient of T^2 KL(p || q) with respect to z, in log q's buffer."""
    q = backend.xp.exp(logq, out=logq)
    q -= p
    q *= T * scale
    return q


class LinearDistillation(Function):
    """loss = (1 - w) CE(z, targets) + w T^2 KL(p || q),  mean over the N rows, where
    z = x W^T (the student's logits), p = softmax(zt / T) (the teacher's, zt = xt Wt^T, fixed) and
    q = softmax(z / T). x (..., H), W (V, H); xt (..., Ht), Wt (V, Ht) the teacher's last hidden
    state and head (arrays: no gradient); targets (...), IGNORE where a position has none: its row
    is left out of both terms (N counts the others). Returns the loss, and writes the two
    means, "ce_loss" = CE and "kd_loss" = T^2 KL, into the dict `parts` when one is given.

    Per row, KL(p || q) = sum_v p_v (log p_v - log q_v), with log q_v = z_v / T - lse(z / T):
      d(-sum_v p_v log q_v) / dz_u = -p_u / T + (sum_v p_v) softmax(z / T)_u / T = (q_u - p_u) / T
    (sum_v p_v = 1; the entropy of p does not depend on z), so
      d(T^2 KL) / dz = T (q - p),
    the T^2 keeping the soft gradient's size independent of T. With the CE gradient
    softmax(z) - onehot (LinearCrossEntropy), per chunk c of rows:
      dz_c = (1 - w) (softmax(z_c) - onehot) / N + w T (q_c - p_c) / N      (in place of z_c)
      dx_c = dz_c W,   dW += dz_c^T x_c
    and, as in LinearCrossEntropy, backward(g) only scales the saved dx and dW. KL is formed as
    sum_v p_v (log p_v - log q_v), both log-softmaxes by the same operations: the student as its
    own teacher (zt = z) has log p = log q bit for bit, so KL and its gradient are exactly 0.

    Neither model's (N, V) logits exist whole: a chunk of rows holds its two (r, V) logits and
    a few (r, V) temporaries. With w = 0 the loss and gradients are LinearCrossEntropy's, bit for
    bit (the soft term is added as exact zeros).
    """

    BUDGET = 1 << 28  # bytes of a chunk's (r, V) arrays, all of them together
    ARRAYS = 6  # z, zt, log p, log q, and the temporaries of the two log-softmaxes

    def forward(self, x, W, xt, Wt, targets, *, weight, temperature, chunk_rows=None, parts=None):
        xp = backend.xp
        x2, t, keep = flat_rows(x, targets, W.shape[0])  # (N, H), (N,): the rows with a target
        xt2 = xt.reshape(-1, xt.shape[-1])  # (all rows, Ht)
        N, V = x2.shape[0], W.shape[0]
        if xt2.shape[0] != math.prod(x.shape[:-1]) or Wt.shape[0] != V:
            raise ValueError(f"distillation: the teacher's {xt2.shape[0]} rows x {Wt.shape[0]} logits do not "
                             f"match the student's {math.prod(x.shape[:-1])} x {V}")
        xt2 = xp.ascontiguousarray(xt2 if keep is None else xt2[xp.asarray(keep)])  # (N, Ht): the same rows
        rows = chunk_rows or max(1, self.BUDGET // (self.ARRAYS * V * W.dtype.itemsize))
        dx = xp.empty_like(x2) if self.needs_grad[0] else None
        dW = None
        ce = kd = 0.0  # float64 sums over rows of the CE and of KL (on the device: no sync per chunk)
        T, w = float(temperature), float(weight)
        for start in range(0, N, rows):
            xc, tc = x2[start:start + rows], t[start:start + rows]
            z = xc @ W.T  # (r, V) the student's logits
            nll, lse = row_losses(z, tc)
            logp = _log_softmax(xt2[start:start + rows] @ Wt.T / T)  # (r, V) the teacher's log p
            logq = _log_softmax(z / T)  # (r, V) the student's log q at temperature T
            p = xp.exp(logp)
            logp -= logq
            ce = ce + nll.sum(dtype=xp.float64)
            kd = kd + (p * logp).sum(dtype=xp.float64)  # sum over the chunk's rows of KL(p || q)
            if not any(self.needs_grad):
                continue
            dz = row_gradients(z, tc, lse, (1.0 - w) / N, out=z)  # (r, V), in place of the logits
            dz += _kl_gradient(logq, p, T, w / N)
            if dx is not None:
                xp.matmul(dz, W, out=dx[start:start + rows])
            if self.needs_grad[1]:
                part = dz.T @ xc  # (V, H)
                if dW is None:
                    dW = part
                else:
                    dW += part
        if self.needs_grad[1] and dW is None:  # no target at all: a zero gradient
            dW = xp.zeros(W.shape, dtype=W.dtype)
        ce, kd = ce / max(1, N), T * T * kd / max(1, N)  # CE and T^2 KL, means over the N rows
        if parts is not None:
            parts.update(ce_loss=ce, kd_loss=kd)
        self.save(dx, dW, keep, x.shape)
        return xp.asarray((1.0 - w) * ce + w * kd).astype(W.dtype)

    def backward(self, g):
        dx, dW, keep, shape = self.saved
        if backend.host_value(g) != 1.0:  # e.g. 1/grad_accum; a device g is applied unread (no sync)
            dx = None if dx is None else dx * g
            dW = None if dW is None else dW * g
        return (None if dx is None else all_rows(dx, keep, shape)), dW, None, None, None


def linear_distillation(x, W, xt, Wt, targets, weight, temperature, chunk_rows=None, parts=None):
    return LinearDistillation.apply(x, W, xt, Wt, targets, weight=weight, temperature=temperature,
                                    chunk_rows=chunk_rows, parts=parts)
