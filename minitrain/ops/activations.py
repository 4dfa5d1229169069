"""SiLU and the fused SwiGLU gate of the Llama/Qwen2 MLP."""

import numpy

from minitrain import backend, parallel
from minitrain.autograd import Function
from minitrain.gpu import swiglu as swiglu_kernels

SLICE = 1 << 16  # elements per slice on the CPU (fewer calls per slice than smaller ones, as fast)


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
        return self.product(a, u)

    def backward(self, g):
        a, u = self.saved
        return self.gradients(g, a, u, self.needs_grad)

    @staticmethod
    def product(a, u):
        return a * sigmoid(a) * u

    @staticmethod
    def gradients(g, a, u, needs):
        """(da, du); None where not needed."""
        s = sigmoid(a)
        da = g * u * s * (1.0 + a * (1.0 - s)) if needs[0] else None
        du = g * a * s if needs[1] else None
        return da, du


class SwiGLUPacked(SwiGLU):
    """y = silu(a) * u for gu = [a | u] (..., 2 I) -> (..., I): SwiGLU on the output of one GEMM
    over the concatenated gate and up weights (ops/packed.py). The same math, on contiguous copies
    of the two halves; the gradient comes packed the same way, dgu = [da | du], which is that
    GEMM's output gradient as it is."""

    def forward(self, gu):
        self.save(gu)
        return self.product(*_halves(gu))

    def backward(self, g):
        (gu,) = self.saved
        da, du = self.gradients(g, *_halves(gu), (True, True))
        return (backend.xp.concatenate([da, du], axis=-1),)


def _halves(gu):
    xp, I = backend.xp, gu.shape[-1] // 2
    return xp.ascontiguousarray(gu[..., :I]), xp.ascontiguousarray(gu[..., I:])


# --- on the CPU's cores ---------------------------------------------------------------------

def _by_slices(work, a):
    """work(sl, s, t) for every SLICE of a's elements, s = sigmoid(a[sl]) in a scratch buffer and t
    a second one, on all cores. s is formed as `sigmoid` forms it: 0.5 (1 + tanh(a / 2))."""
    flat = a.reshape(-1)
    scratch = [(numpy.empty(SLICE, a.dtype), numpy.empty(SLICE, a.dtype)) for _ in range(parallel.WORKERS)]

    def one(w, sl):
        s, t = (buf[: sl.stop - sl.start] for buf in scratch[w])
        numpy.multiply(flat[sl], 0.5, out=s)
        numpy.tanh(s, out=s)
        s += 1.0
        s *= 0.5
        work(sl, s, t)

    parallel.run(parallel.slices(flat.size, SLICE), one)


def _product_blocked(a, u):
    """SwiGLU.product slice by slice on every core, through scratch buffers in cache, with the
    formula's operations in its order: the same bits as evaluating it whole."""
    y = numpy.empty_like(a)
    _by_slices(lambda sl, s, t: numpy.multiply(numpy.multiply(a.reshape(-1)[sl], s, out=t), u.reshape(-1)[sl],
                                               out=y.reshape(-1)[sl]), a)
    return y


def _gradients_blocked(g, a, u, needs):
    """SwiGLU.gradients slice by slice, likewise."""
    g = numpy.ascontiguousarray(g)
    da = numpy.empty_like(a) if needs[0] else None
    du = numpy.empty_like(u) if needs[1] else None
    gf, af, uf = g.reshape(-1), a.reshape(-1), u.reshape(-1)

    def work(sl, s, t):
        if da is not None:  # (g u) s (1 + a (1 - s))
            numpy.subtract(1.0, s, out=t)
            t *= af[sl]
            t += 1.0
            d = numpy.multiply(gf[sl], uf[sl], out=da.reshape(-1)[sl])
            d *= s
            d *= t
        if du is not None:  # (g a) s
            d = numpy.multiply(gf[sl], af[sl], out=du.reshape(-1)[sl])
            d *= s

    _by_slices(work, a)
    return da, du


class SwiGLUBlocked(SwiGLU):
    product, gradients = staticmethod(_product_blocked), staticmethod(_gradients_blocked)


class SwiGLUPackedBlocked(SwiGLUPacked):
    product, gradients = staticmethod(_product_blocked), staticmethod(_gradients_blocked)


# --- on the GPU: kernels/swiglu.cu, the same math in one pass ----------------------------------

class SwiGLUKernel(SwiGLU):
    def forward(self, a, u):
        self.save(a, u)
        y = backend.xp.empty_like(a)
        swiglu_kernels.forward(backend.launch, a, u, y)
        return y

    def backward(self, g):
        a, u = self.saved
        da, du = backend.xp.empty_like(a), backend.xp.empty_like(u)
        swiglu_kernels.backward(backend.launch, backend.xp.ascontiguousarray(g), a, u, da, du)
        return da, du


class SwiGLUPackedKernel(SwiGLUPacked):
    """a and u read in place (kernels/swiglu.cu's packed variants)."""

    def forward(self, gu):
        self.save(gu)
        xp, I = backend.xp, gu.shape[-1] // 2
        y = xp.empty(gu.shape[:-1] + (I,), dtype=gu.dtype)
        swiglu_kernels.packed_forward(backend.launch, xp.ascontiguousarray(gu), y)
        return y

    def backward(self, g):
        (gu,) = self.saved
        xp = backend.xp
        dgu = xp.empty_like(gu)
        swiglu_kernels.packed_backward(backend.launch, xp.ascontiguousarray(g), xp.ascontiguousarray(gu), dgu)
        return (dgu,)


def silu(x):
    return SiLU.apply(x)


def swiglu(a, u):
    return backend.route((a, u), SwiGLU, blocked=SwiGLUBlocked, kernel=SwiGLUKernel).apply(a, u)


def swiglu_packed(gu):
    return backend.route((gu,), SwiGLUPacked, blocked=SwiGLUPackedBlocked, kernel=SwiGLUPackedKernel).apply(gu)
