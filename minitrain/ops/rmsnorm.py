"""RMSNorm, as in Llama and Qwen2 (over the hidden size), and Qwen3 (also over each head of q and k):
no mean subtraction, no bias."""

import numpy

from minitrain import backend, parallel
from minitrain.autograd import Function
from minitrain.gpu import fused
from minitrain.ops.cast import bf16_weight

BLOCK = 1 << 16  # elements per block of rows on the CPU (parallel.py)


class RMSNorm(Function):
    """y = w * xhat,  xhat = x * r,  r = (mean(x^2) + eps)^(-1/2)   over the last axis.
    x (..., H), w (H,). Statistics in at least fp32, xhat cast back to x's dtype before the
    weight multiplies it (what Hugging Face does).

    Backward, with dxhat = dy * w:
      dw   = sum over all leading positions of dy * xhat
      dx_j = r * (dxhat_j - xhat_j * mean_i(dxhat_i * xhat_i))
    because dr/dx_j = -r^3 x_j / H, so
      dx_j = sum_i dxhat_i (r [i == j] - x_i r^3 x_j / H) = r dxhat_j - r xhat_j mean_i(dxhat_i xhat_i).
    """

    def forward(self, x, w, eps, w16=None):
        y, xhat, r = self.normalize(x, w, eps)
        self.save(xhat, r, w)
        return y

    def backward(self, g):
        xhat, r, w = self.saved
        return self.gradients(g, xhat, r, w, self.needs_grad)

    @staticmethod
    def normalize(x, w, eps):
        """(y, xhat, r)."""
        acc = backend.acc_dtype(x.dtype)
        xf = x.astype(acc, copy=False)
        r = 1.0 / backend.xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        xhat = (xf * r).astype(x.dtype, copy=False)  # (..., H)
        return xhat * w, xhat, r

    @staticmethod
    def gradients(g, xhat, r, w, needs):
        """(dx, dw); None where not needed."""
        acc = backend.acc_dtype(g.dtype)
        dxhat = (g * w).astype(acc, copy=False)  # (..., H)
        xh = xhat.astype(acc, copy=False)
        dx = r * (dxhat - xh * (dxhat * xh).mean(axis=-1, keepdims=True)) if needs[0] else None
        dw = (g * xhat).reshape(-1, w.shape[0]).sum(axis=0) if needs[1] else None
        return (None if dx is None else dx.astype(g.dtype, copy=False)), dw


def _normalize_blocked(x, w, eps):
    """RMSNorm.normalize on the CPU (fp32 or fp64): the rows go a block at a time to every core,
    each block through the formulas' operations in their order: the same bits as evaluating them
    whole."""
    x2 = numpy.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (N, H)
    xhat, y = numpy.empty_like(x2), numpy.empty_like(x2)
    r = numpy.empty((x2.shape[0], 1), dtype=x2.dtype)  # (N, 1)

    def block(_, sl):
        t = numpy.multiply(x2[sl], x2[sl], out=y[sl])  # x^2, in y's rows until y is formed
        rs = numpy.mean(t, axis=-1, keepdims=True, out=r[sl])
        rs += eps
        numpy.sqrt(rs, out=rs)
        numpy.divide(1.0, rs, out=rs)
        numpy.multiply(x2[sl], rs, out=xhat[sl])
        numpy.multiply(xhat[sl], w, out=y[sl])

    parallel.run(_blocks(x2), block)
    return y.reshape(x.shape), xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


def _gradients_blocked(g, xhat, r, w, needs):
    """RMSNorm.gradients likewise; dw's sum over the rows stays one sum over the whole (N, H)
    product."""
    g = numpy.ascontiguousarray(g)
    g2, xh, r2 = g.reshape(-1, w.shape[0]), xhat.reshape(-1, w.shape[0]), r.reshape(-1, 1)  # (N, H), (N, 1)
    dx = numpy.empty_like(g2) if needs[0] else None
    gx = numpy.empty_like(g2) if needs[1] else None  # dy * xhat, summed over rows after

    def block(_, sl):
        if dx is not None:
            d = numpy.multiply(g2[sl], w, out=dx[sl])  # dxhat
            mu = numpy.mean(d * xh[sl], axis=-1, keepdims=True)  # (rows, 1)
            d -= xh[sl] * mu
            d *= r2[sl]
        if gx is not None:
            numpy.multiply(g2[sl], xh[sl], out=gx[sl])

    parallel.run(_blocks(g2), block)
    return (None if dx is None else dx.reshape(g.shape)), (None if gx is None else gx.sum(axis=0))


class RMSNormBlocked(RMSNorm):
    normalize, gradients = staticmethod(_normalize_blocked), staticmethod(_gradients_blocked)


class RMSNormKernel(RMSNorm):
    """kernels/rmsnorm.cu: saves x and r, recomputes xhat. bf16 x (mixed precision): w, an fp32
    master, is read as its kept bf16 copy; dw comes back in fp32."""

    def forward(self, x, w, eps, w16=None):
        if x.dtype == backend.BF16:
            w = backend.to_bf16(w) if w16 is None else w16  # the weight's kept bf16 copy
        x2 = backend.xp.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, H)
        y, r = backend.xp.empty_like(x2), backend.xp.empty(x2.shape[0], dtype=backend.xp.float32)
        fused.rmsnorm_forward(backend.launch, x2, w, y, r, eps)
        self.save(x2, r, w, x.shape)
        return y.reshape(x.shape)

    def backward(self, g):
        xp, (x2, r, w, shape) = backend.xp, self.saved
        dx, dw = xp.empty_like(x2), xp.zeros(w.shape, dtype=xp.float32)
        partial = xp.empty((fused.rmsnorm_parts(x2.shape[0]), w.shape[0]), dtype=xp.float32)
        fused.rmsnorm_backward(backend.launch, xp.ascontiguousarray(g).reshape(x2.shape), x2, w, r, dx, dw, partial)
        return dx.reshape(shape), dw


def _blocks(x2):
    """x2 (N, H)'s rows in blocks of about BLOCK elements."""
    return parallel.slices(x2.shape[0], max(1, BLOCK // x2.shape[1]))


def rmsnorm(x, w, eps):
    op = backend.route((x, w), RMSNorm, blocked=RMSNormBlocked, kernel=RMSNormKernel)
    return op.apply(x, w, eps=eps, w16=bf16_weight(x, w))
