"""Linear layer: y = x @ W.T + b, row-major W of shape (out, in) like Hugging Face."""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import gemm
from minitrain.gpu import matmul as matmul_kernels
from minitrain.ops.cast import bf16_weight


class Linear(Function):
    """y = x @ W.T + b   for x (..., in), W (out, in), b (out,) or None -> y (..., out).

    Flatten the leading dims: X (N, in), G = dy (N, out). Then y_n = W x_n + b, so
      dX = G @ W          (N, out) @ (out, in): each output row sends g_n back through W
      dW = G.T @ X        (out, N) @ (N, in):   sum over tokens of outer(g_n, x_n)
      db = sum_n G[n]     (out,)
    """

    def forward(self, x, W, b, W16=None):
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


class LinearBF16(Linear):
    """Mixed precision (x in bf16): W and b stay fp32 masters; W is read rounded to bf16 (the copy
    the weight Tensor keeps, see Tensor.bf16_copy), the products are accumulated in fp32 (cuBLAS
    GemmEx), y is rounded to bf16 once (after the bias), and the gradients come back as dX in
    bf16, dW and db in fp32."""

    def forward(self, x, W, b, W16=None):
        xp = backend.xp
        x2 = xp.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (N, in) bf16
        W16 = backend.to_bf16(W) if W16 is None else W16  # (out, in) bf16
        if b is None:
            y = gemm.matmul(x2, W16.T, backend.BF16)  # (N, out)
        else:
            y = backend.add_bias_bf16(gemm.matmul(x2, W16.T, xp.float32), b)
        self.save(W16 if self.needs_grad[0] else None, x2 if self.needs_grad[1] else None, x.shape)
        return y.reshape(x.shape[:-1] + (W.shape[0],))

    def backward(self, g):
        W16, x2, x_shape = self.saved
        g2 = backend.xp.ascontiguousarray(g.reshape(-1, g.shape[-1]))  # (N, out) bf16
        dx = gemm.matmul(g2, W16, backend.BF16).reshape(x_shape) if self.needs_grad[0] else None
        dW = gemm.matmul(g2.T, x2, backend.xp.float32) if self.needs_grad[1] else None
        db = None
        if self.needs_grad[2]:  # sum over the rows by kernels/matmul_backward.cu, in fp32
            db = backend.xp.zeros(g2.shape[1], dtype=backend.xp.float32)
            matmul_kernels.grad_bias(backend.kernels(g2), g2, db)
        return dx, dW, db


class KernelBackward:
    """The three products of the backward by kernels/matmul_backward.cu, for fp32 or bf16 dY
    (dW and db accumulate into fp32 zeros), in place of cuBLAS (--device cuda with
    backend.matmul_backward = "kernels")."""

    def backward(self, g):
        W, x2, x_shape = self.saved
        xp, launch, needs = backend.xp, backend.launch, self.needs_grad
        g2 = xp.ascontiguousarray(g.reshape(-1, g.shape[-1]))  # (N, out)
        dx = dW = db = None
        if needs[0]:
            dx = xp.empty((g2.shape[0], W.shape[1]), dtype=g2.dtype)
            matmul_kernels.grad_input(launch, g2, W, dx)
            dx = dx.reshape(x_shape)
        if needs[1]:
            dW = xp.zeros(W.shape, dtype=xp.float32)
            matmul_kernels.grad_weight(launch, g2, xp.ascontiguousarray(x2), dW)
        if needs[2]:
            db = xp.zeros(g2.shape[1], dtype=xp.float32)
            matmul_kernels.grad_bias(launch, g2, db)
        return dx, dW, db


class LinearKernelBackward(KernelBackward, Linear):
    """fp32: the forward by cuBLAS, the backward by the kernels."""


class LinearBF16KernelBackward(KernelBackward, LinearBF16):
    """bf16: the forward by cuBLAS GemmEx, the backward by the kernels."""


def linear(x, W, b=None):
    kernel = None
    if backend.matmul_backward == "kernels":
        kernel = LinearBF16KernelBackward if x.dtype == backend.BF16 else LinearKernelBackward
    op = backend.route((x,), Linear, kernel=kernel, half=LinearBF16)
    return op.apply(x, W, b, W16=bf16_weight(x, W))
