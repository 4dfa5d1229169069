"""SiLU and the fused SwiGLU gate of the Llama/Qwen2 MLP."""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import swiglu as swiglu_kernels


def sigmoid(x):
    """1 / (1 + exp(-x)) written as 0.5 (1 + tanh(x/2)): the same function, no overflow."""
    return 0.5 * (1.0 + backend.xp.tanh(0.5 * x))


class SiLU(Function):
    """y = x * s,  s = sigmoid(x).
    ds/dx = s (1 - s), so dy/dx = s + x s (1 - s) = s (1 + x (1 - s)):   dx = dy * s (1 + x (1 - s)).
    """

    def forward(self, x):
        self.save(x)
        return x * sigmoid(x)

    def backward(self, g):
        (x,) = self.saved
        s = sigmoid(x)
        return (g * s * (1.0 + x * (1.0 - s)),)


class SwiGLU(Function):
    """y = silu(a) * u   (a = gate_proj(x), u = up_proj(x); both (..., I)).
    One fused op: the intermediate silu(a) is never stored.
      da = dy * u * s (1 + a (1 - s))     (the SiLU derivative above, s = sigmoid(a))
      du = dy * silu(a)
    """

    def forward(self, a, u):
        self.save(a, u)
        if launch := backend.kernels(a, u):  # kernels/swiglu.cu: the same math, one pass
            y = backend.xp.empty_like(a)
            swiglu_kernels.forward(launch, a, u, y)
            return y
        return a * sigmoid(a) * u

    def backward(self, g):
        a, u = self.saved
        if launch := backend.kernels(g, a, u):
            da, du = backend.xp.empty_like(a), backend.xp.empty_like(u)
            swiglu_kernels.backward(launch, backend.xp.ascontiguousarray(g), a, u, da, du)
            return da, du
        s = sigmoid(a)
        da = g * u * s * (1.0 + a * (1.0 - s)) if self.needs_grad[0] else None
        du = g * a * s if self.needs_grad[1] else None
        return da, du


def silu(x):
    return SiLU.apply(x)


def swiglu(a, u):
    return SwiGLU.apply(a, u)
