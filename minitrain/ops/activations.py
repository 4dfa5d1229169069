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
    On the CPU both run slice by slice on every core (parallel.py), each slice through scratch
    buffers in cache, with the operations, in the order, of the formulas: the same bits as
    evaluating them whole.
    """

    def forward(self, a, u):
        self.save(a, u)
        if launch := backend.kernels(a, u):  # kernels/swiglu.cu: the same math, one pass
            y = backend.xp.empty_like(a)
            swiglu_kernels.forward(launch, a, u, y)
            return y
        return _forward(a, u)

    def backward(self, g):
        a, u = self.saved
        if launch := backend.kernels(g, a, u):
            da, du = backend.xp.empty_like(a), backend.xp.empty_like(u)
            swiglu_kernels.backward(launch, backend.xp.ascontiguousarray(g), a, u, da, du)
            return da, du
        return _backward(g, a, u, self.needs_grad)


class SwiGLUPacked(Function):
    """y = silu(a) * u for gu = [a | u] (..., 2 I) -> (..., I): SwiGLU on the output of one GEMM
    over the concatenated gate and up weights (ops/packed.py). The same math; the gradient comes
    packed the same way, dgu = [da | du], which is that GEMM's output gradient as it is. On the
    kernels a and u are read in place (kernels/swiglu.cu's packed variants); the reference path
    takes contiguous copies of the two halves."""

    def forward(self, gu):
        self.save(gu)
        xp, I = backend.xp, gu.shape[-1] // 2
        if launch := backend.kernels(gu):
            y = xp.empty(gu.shape[:-1] + (I,), dtype=gu.dtype)
            swiglu_kernels.packed_forward(launch, xp.ascontiguousarray(gu), y)
            return y
        return _forward(xp.ascontiguousarray(gu[..., :I]), xp.ascontiguousarray(gu[..., I:]))

    def backward(self, g):
        (gu,) = self.saved
        xp, I = backend.xp, gu.shape[-1] // 2
        if launch := backend.kernels(g, gu):
            dgu = xp.empty_like(gu)
            swiglu_kernels.packed_backward(launch, xp.ascontiguousarray(g), xp.ascontiguousarray(gu), dgu)
            return (dgu,)
        da, du = _backward(g, xp.ascontiguousarray(gu[..., :I]), xp.ascontiguousarray(gu[..., I:]), (True, True))
        return (xp.concatenate([da, du], axis=-1),)


def _forward(a, u):
    """silu(a) * u by the reference ops: on the CPU slice by slice on every core."""
    if backend.xp is numpy:
        y = numpy.empty_like(a)
        _by_slices(lambda sl, s, t: numpy.multiply(numpy.multiply(a.reshape(-1)[sl], s, out=t), u.reshape(-1)[sl],
                                                   out=y.reshape(-1)[sl]), a)
        return y
    return a * sigmoid(a) * u


def _backward(g, a, u, needs):
    """(da, du) by the reference ops; None where not needed."""
    if backend.xp is numpy:
        return _backward_cpu(numpy.ascontiguousarray(g), a, u, needs)
    s = sigmoid(a)
    da = g * u * s * (1.0 + a * (1.0 - s)) if needs[0] else None
    du = g * a * s if needs[1] else None
    return da, du


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


def _backward_cpu(g, a, u, needs):
    """The two gradients of SwiGLU.backward's formulas, slice by slice."""
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


def silu(x):
    return SiLU.apply(x)


def swiglu(a, u):
    return SwiGLU.apply(a, u)


def swiglu_packed(gu):
    return SwiGLUPacked.apply(gu)
