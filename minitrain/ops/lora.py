"""LoRA linear layer (Hu et al. 2021): a frozen W plus a trained low-rank update, as one Function."""

from minitrain.autograd import Function


class LoRALinear(Function):
    """y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ    for x (..., in), W (out, in), b (out,) or None,
    A (R, in), B (out, R), s = alpha / R; x_d = x * keep / (1 - p) is x under LoRA dropout (keep:
    0/1 per element of x, or None for no dropout), applied to the low-rank path only, as peft does.

    Flatten the leading dims: X (N, in), X_d likewise, G = dy (N, out), and name the rank-R
    intermediates H = s X_d Aᵀ (N, R) and GB = s G B (N, R), the scale folded into each (an N x R
    product, not an N x out or N x in one). Then y_n = W x_n + b + B (s A x_d,n), so

      dB = Gᵀ H             (out, N) @ (N, R):  sum over tokens of outer(g_n, s A x_d,n)
      dA = GBᵀ X_d          (R, N) @ (N, in):   sum over tokens of outer(s Bᵀ g_n, x_d,n)
      dX = G W + (GB A) * keep / (1 - p)        both paths back to x; dropout's mask once more
      dW = Gᵀ X,  db = sum_n G[n]               only when asked: a frozen W (the LoRA case)
                                                 gets no dW at all, not a computed-and-dropped one

    Every product is (N, R)- or (R, in)-sized beside the base layer's: the adapter adds O(N R
    (in + out)) work to the O(N in out) of x Wᵀ.
    """

    def forward(self, x, W, b, A, B, *, scale, keep=None, p=0.0):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        mask = None if keep is None else (keep.reshape(x2.shape) / (1.0 - p)).astype(x2.dtype)  # (N, in): keep / (1 - p)
        xd = x2 if mask is None else x2 * mask  # (N, in)
        H = xd @ A.T  # (N, R)
        H *= scale
        y = x2 @ W.T  # (N, out)
        y += H @ B.T
        if b is not None:
            y += b
        needs = self.needs_grad  # keep x for dW, x_d for dA, H for dB, W and A and the mask for dX, B for GB
        self.save(x2 if needs[1] else None, xd if needs[3] else None, H if needs[4] else None,
                  W if needs[0] else None, A if needs[0] else None, B, scale, mask if needs[0] else None, x.shape)
        return y.reshape(x.shape[:-1] + (W.shape[0],))

    def backward(self, g):
        x2, xd, H, W, A, B, scale, mask, x_shape = self.saved
        needs = self.needs_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        GB = g2 @ B  # (N, R)
        GB *= scale
        dx = None
        if needs[0]:
            low = GB @ A  # (N, in)
            if mask is not None:
                low *= mask
            dx = g2 @ W  # (N, in)
            dx += low
            dx = dx.reshape(x_shape)
        dW = g2.T @ x2 if needs[1] else None
        db = g2.sum(axis=0) if needs[2] else None
        dA = GB.T @ xd if needs[3] else None  # (R, in)
        dB = g2.T @ H if needs[4] else None  # (out, R)
        return dx, dW, db, dA, dB


def lora_linear(x, W, b, A, B, scale, keep=None, p=0.0):
    return LoRALinear.apply(x, W, b, A, B, scale=scale, keep=keep, p=p)
