"""Linear layer: y = x @ W.T + b, row-major W of shape (out, in) like Hugging Face."""

from minitrain.autograd import Function


class Linear(Function):
    """y = x @ W.T + b   for x (..., in), W (out, in), b (out,) or None -> y (..., out).

    Flatten the leading dims: X (N, in), G = dy (N, out). Then y_n = W x_n + b, so
      dX = G @ W          (N, out) @ (out, in): each output row sends g_n back through W
      dW = G.T @ X        (out, N) @ (N, in):   sum over tokens of outer(g_n, x_n)
      db = sum_n G[n]     (out,)
    """

    def forward(self, x, W, b):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = x2 @ W.T  # (N, out)
        if b is not None:
            y += b
        # what dX needs (W), what dW needs (X), the input shape
        self.save(W if self.needs_grad[0] else None, x2 if self.needs_grad[1] else None, x.shape)
        return y.reshape(x.shape[:-1] + (W.shape[0],))

    def backward(self, g):
        W, x2, x_shape = self.saved
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        dx = (g2 @ W).reshape(x_shape) if self.needs_grad[0] else None
        dW = g2.T @ x2 if self.needs_grad[1] else None
        db = g2.sum(axis=0) if self.needs_grad[2] else None
        return dx, dW, db


def linear(x, W, b=None):
    return Linear.apply(x, W, b)
