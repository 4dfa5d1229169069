"""RMSNorm, as in Llama and Qwen2: no mean subtraction, no bias."""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import fused


class RMSNorm(Function):
    """y = w * xhat,  xhat = x * r,  r = (mean(x^2) + eps)^(-1/2)   over the last axis.
    x (..., H), w (H,). Statistics in at least fp32, xhat cast back to x's dtype before the
    weight multiplies it (what Hugging Face does). bf16 x (mixed precision): w, an fp32 master,
    is rounded to bf16 for the kernel; dw comes back in fp32.

    Backward, with dxhat = dy * w:
      dw   = sum over all leading positions of dy * xhat
      dx_j = r * (dxhat_j - xhat_j * mean_i(dxhat_i * xhat_i))
    because dr/dx_j = -r^3 x_j / H, so
      dx_j = sum_i dxhat_i (r [i == j] - x_i r^3 x_j / H) = r dxhat_j - r xhat_j mean_i(dxhat_i xhat_i).
    """

    def forward(self, x, w, eps):
        if launch := backend.kernels(x, w):  # kernels/rmsnorm.cu saves x and r, recomputes xhat
            if x.dtype == backend.BF16:
                w = backend.to_bf16(w)
            x2 = backend.xp.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (rows, H)
            y, r = backend.xp.empty_like(x2), backend.xp.empty(x2.shape[0], dtype=backend.xp.float32)
            fused.rmsnorm_forward(launch, x2, w, y, r, eps)
            self.save(x2, r, w, x.shape)
            return y.reshape(x.shape)
        acc = backend.acc_dtype(x.dtype)
        xf = x.astype(acc, copy=False)
        r = 1.0 / backend.xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
        xhat = (xf * r).astype(x.dtype, copy=False)  # (..., H)
        self.save(xhat, r, w)
        return xhat * w

    def backward(self, g):
        if launch := backend.kernels(g, self.saved[2]):
            xp, (x2, r, w, shape) = backend.xp, self.saved
            dx, dw = xp.empty_like(x2), xp.zeros(w.shape, dtype=xp.float32)
            partial = xp.empty((fused.rmsnorm_parts(x2.shape[0]), w.shape[0]), dtype=xp.float32)
            fused.rmsnorm_backward(launch, xp.ascontiguousarray(g).reshape(x2.shape), x2, w, r, dx, dw, partial)
            return dx.reshape(shape), dw
        xhat, r, w = self.saved
        acc = backend.acc_dtype(g.dtype)
        dxhat = (g * w).astype(acc, copy=False)  # (..., H)
        xh = xhat.astype(acc, copy=False)
        dx = r * (dxhat - xh * (dxhat * xh).mean(axis=-1, keepdims=True)) if self.needs_grad[0] else None
        dw = (g * xhat).reshape(-1, w.shape[0]).sum(axis=0) if self.needs_grad[1] else None
        return (None if dx is None else dx.astype(g.dtype, copy=False)), dw


def rmsnorm(x, w, eps):
    return RMSNorm.apply(x, w, eps=eps)
