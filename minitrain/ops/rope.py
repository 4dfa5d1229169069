"""Rotary position embedding (RoPE), Hugging Face "rotate_half" layout (APR rope_type 2, NEOX).

Element i of a head (i < hd/2) is paired with element i + hd/2 -- NOT with its neighbour i+1 --
and the pair is rotated by the angle  pos * inv_freq[i],  inv_freq[i] = theta^(-2i/hd).
Using the adjacent-pair layout on pretrained weights silently ruins them.

Llama 3.x scales the frequencies (`llama3_inv_freq`, config.RopeScaling) so that a model trained
at a context of L = original_max_position_embeddings reads s = factor times further: pair i turns
once every wavelength  w_i = 2 pi / inv_freq[i]  positions, and
    w_i < L / high_freq_factor  (high frequencies: many turns within L)    kept:      f_i
    w_i > L / low_freq_factor   (low frequencies: under a turn or so in L)  stretched: f_i / s
    between                     interpolated in 1/w:  (1 - a) f_i / s + a f_i,
                                a = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
a is 0 at the low band's edge (w = L / low_freq_factor) and 1 at the high band's, so the scaled
frequency is continuous across both. The angles stay pos * f'_i: RoPE's Jacobian is unchanged.
"""

import functools

import numpy

from minitrain import backend, parallel
from minitrain.autograd import Function
from minitrain.gpu import fused

BLOCK = 1 << 16  # elements per block of positions on the CPU (parallel.py)


@functools.lru_cache(maxsize=32)
def _tables(xp, T, hd, theta, scaling, dtype):
    """cos and sin of pos * inv_freq for pos = 0..T-1: each (T, hd/2), read-only."""
    angles = _angles(xp, xp.arange(T), hd, theta, scaling, dtype)
    cos, sin = xp.cos(angles), xp.sin(angles)
    return cos, sin


def inv_freq(xp, hd, theta, scaling, dtype):
    """(hd/2,) the pairs' angular frequencies, Llama 3-scaled when `scaling` (a RopeScaling) is
    given. Computed in the working dtype the way Hugging Face does: fp32 for fp32 models."""
    exponent = xp.arange(0, hd, 2).astype(dtype) / dtype.type(hd)  # 2i/hd, i < hd/2
    f = 1.0 / (dtype.type(theta) ** exponent)  # (hd/2,)
    return f if scaling is None else llama3_inv_freq(xp, f, scaling)


def llama3_inv_freq(xp, f, scaling):
    """Llama 3's scaled frequencies (the module's docstring derives them), for f (hd/2,); the
    Python scalars enter in f's dtype, in Hugging Face's order of operations."""
    s, low, high, L = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                       scaling.original_max_position_embeddings)
    w = 2 * numpy.pi / f  # (hd/2,) wavelengths, in positions
    a = (L / w - low) / (high - low)  # 0 at the low band's edge, 1 at the high band's
    between = (1 - a) * f / s + a * f
    return xp.where(w < L / high, f, xp.where(w > L / low, f / s, between))


def _angles(xp, positions, hd, theta, scaling, dtype):
    return positions.astype(dtype)[..., None] * inv_freq(xp, hd, theta, scaling, dtype)  # (T, hd/2) or (B, T, hd/2)


def rope_tables(T, hd, theta, dtype, positions=None, scaling=None):
    xp = backend.xp
    dtype = backend.acc_dtype(dtype)
    if positions is None:
        return _tables(xp, T, hd, float(theta), scaling, dtype)
    angles = _angles(xp, xp.asarray(positions), hd, theta, scaling, dtype)
    return xp.cos(angles), xp.sin(angles)


class RoPE(Function):
    """Rotate x (B, T, nH, hd) by position:  y = x * cos + rotate_half(x) * sin,
    rotate_half([x1, x2]) = [-x2, x1], i.e. per pair (x1_i, x2_i) with angle a = pos * inv_freq[i]:
        y1 = x1 cos a - x2 sin a
        y2 = x2 cos a + x1 sin a
    A rotation is orthogonal, so its Jacobian's transpose is the inverse rotation (a -> -a):
        dx1 = dy1 cos a + dy2 sin a
        dx2 = dy2 cos a - dy1 sin a
    `positions` (T,) defaults to 0..T-1 (every training window starts at position 0); (B, T)
    gives each row its own (a batch of left-padded prompts in the KV-cache decoder). `scaling`:
    Llama 3's frequency scaling (config.RopeScaling), or None.
    """

    def forward(self, x, theta, positions=None, scaling=None):
        B, T, nH, hd = x.shape
        cos, sin = rope_tables(T, hd, theta, x.dtype, positions, scaling)  # (T, hd/2) or (B, T, hd/2) each
        cos = cos.astype(x.dtype, copy=False)[..., None, :]  # (T, 1, hd/2) or (B, T, 1, hd/2): over heads
        sin = sin.astype(x.dtype, copy=False)[..., None, :]
        self.save(cos, sin)
        return self.rotate(x, cos, sin)

    def backward(self, g):
        cos, sin = self.saved
        return (self.rotate(g, cos, -sin),)

    @staticmethod
    def rotate(x, cos, sin):
        """cos, sin: (T, 1, hd/2) or (B, T, 1, hd/2)."""
        half = x.shape[-1] // 2
        y = backend.xp.empty(x.shape, dtype=x.dtype)
        x1, x2 = x[..., :half], x[..., half:]  # (B, T, nH, hd/2) each
        y[..., :half] = x1 * cos - x2 * sin
        y[..., half:] = x2 * cos + x1 * sin
        return y


def _rotate_blocked(x, cos, sin):
    """RoPE.rotate on the CPU: the positions go a block at a time to every core, through the same
    operations in the same order: the same bits as rotating x whole."""
    half = x.shape[-1] // 2
    y = numpy.empty(x.shape, dtype=x.dtype)
    B, T, nH = x.shape[:3]
    per_row = cos.ndim == 4  # (B, T, 1, hd/2)
    rows = max(1, BLOCK // (nH * 2 * half))  # positions per block
    scratch = [numpy.empty((rows, nH, half), x.dtype) for _ in range(parallel.WORKERS)]

    def block(w, task):
        b, ts = task
        c, s = (cos[b, ts], sin[b, ts]) if per_row else (cos[ts], sin[ts])  # (t, 1, hd/2)
        x1, x2, y1, y2 = x[b, ts, :, :half], x[b, ts, :, half:], y[b, ts, :, :half], y[b, ts, :, half:]
        t = scratch[w][: len(x1)]  # (t, nH, hd/2)
        numpy.multiply(x1, c, out=y1)  # x1 cos - x2 sin
        numpy.subtract(y1, numpy.multiply(x2, s, out=t), out=y1)
        numpy.multiply(x2, c, out=y2)  # x2 cos + x1 sin
        numpy.add(y2, numpy.multiply(x1, s, out=t), out=y2)

    parallel.run([(b, ts) for b in range(B) for ts in parallel.slices(T, rows)], block)
    return y


class RoPEBlocked(RoPE):
    rotate = staticmethod(_rotate_blocked)


class RoPEKernel(RoPE):
    """kernels/rope.cu: per-row tables are (B*T, hd/2) rows."""

    def forward(self, x, theta, positions=None, scaling=None):
        B, T, nH, hd = x.shape
        cos, sin = rope_tables(T, hd, theta, x.dtype, positions, scaling)
        y = backend.xp.empty_like(x)
        cos, sin = cos.reshape(-1, hd // 2), sin.reshape(-1, hd // 2)
        fused.rope_forward(backend.launch, backend.xp.ascontiguousarray(x), cos, sin, y)
        self.save(cos, sin)
        return y

    def backward(self, g):
        cos, sin = self.saved
        dx = backend.xp.empty(g.shape, dtype=g.dtype)
        fused.rope_backward(backend.launch, backend.xp.ascontiguousarray(g), cos, sin, dx)
        return (dx,)


def rope(x, theta, positions=None, scaling=None):
    return backend.route((x,), RoPE, blocked=RoPEBlocked, kernel=RoPEKernel).apply(x, theta=theta, positions=positions,
                                                                                   scaling=scaling)
