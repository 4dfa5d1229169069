"""Fused softmax + cross-entropy over the vocabulary, mean over target tokens."""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import fused


class CrossEntropy(Function):
    """loss = mean over the N targets of -log softmax(z_n)[t_n] = mean_n (lse_n - z_n[t_n]),
    lse_n = log sum_v exp(z_n,v), computed stably as m_n + log sum_v exp(z_n,v - m_n), m_n = max_v z_n,v.
    logits z (..., V), integer targets t (...) -> a scalar.

    d lse_n / d z_n,v = softmax_n,v, so
      dz_n,v = (softmax_n,v - [v == t_n]) / N   (times the incoming gradient of the loss).
    Only the logits and one lse per row are kept; the softmax is rebuilt in the backward. Nothing
    is upcast beyond fp32, so a 151 936-way vocabulary costs one logits-sized temporary.
    """

    def forward(self, logits, targets):
        xp = backend.xp
        V = logits.shape[-1]
        z = logits.reshape(-1, V)  # (N, V)
        t = targets.reshape(-1)  # (N,)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"cross_entropy: {t.shape[0]} targets for {z.shape[0]} rows of logits")
        if t.size and (int(t.min()) < 0 or int(t.max()) >= V):
            raise ValueError(f"cross_entropy: a target id is outside the vocabulary [0, {V})")
        if launch := backend.kernels(z):  # kernels/cross_entropy.cu: one online pass per row
            z, t = xp.ascontiguousarray(z), xp.ascontiguousarray(t, dtype=xp.int64)
            nll, lse = (xp.empty(z.shape[0], dtype=xp.float32) for _ in range(2))
            fused.cross_entropy_forward(launch, z, t, nll, lse)
            self.save(z, t, lse, logits.shape)
            return nll.mean(dtype=xp.float64).astype(logits.dtype)
        acc = backend.acc_dtype(z.dtype)
        m = z.max(axis=-1, keepdims=True).astype(acc)  # (N, 1)
        e = xp.exp(z.astype(acc) - m)  # (N, V) the one big temporary
        lse = (m[:, 0] + xp.log(e.sum(axis=-1)))  # (N,)
        rows = xp.arange(z.shape[0])
        nll = lse - z[rows, t].astype(acc)  # (N,)
        self.save(z, t, lse, logits.shape)
        return nll.mean(dtype=xp.float64).astype(logits.dtype)  # () scalar

    def backward(self, g):
        xp = backend.xp
        z, t, lse, shape = self.saved
        N = z.shape[0]
        if launch := backend.kernels(z):
            dz = xp.empty_like(z)
            fused.cross_entropy_backward(launch, z, t, lse, dz, float(g) / N)
            return dz.reshape(shape), None
        dz = xp.exp(z.astype(lse.dtype) - lse[:, None])  # softmax (N, V)
        dz[xp.arange(N), t] -= 1.0
        dz *= g / N
        return dz.astype(z.dtype, copy=False).reshape(shape), None


def cross_entropy(logits, targets):
    return CrossEntropy.apply(logits, targets)
