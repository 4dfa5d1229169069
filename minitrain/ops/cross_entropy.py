"""Softmax cross-entropy over the vocabulary (mean over target tokens), alone and fused with the
lm_head matmul.

For logits z_n (V,) and target t_n: loss_n = lse_n - z_n[t_n], lse_n = log sum_v exp(z_n,v),
computed stably as m_n + log sum_v exp(z_n,v - m_n), m_n = max_v z_n,v. Since
d lse_n / d z_n,v = softmax_n,v, the gradient of the mean over N targets is
    dz_n,v = (softmax_n,v - [v == t_n]) / N.
Nothing is upcast beyond fp32: a 151 936-way vocabulary costs one logits-sized buffer.

The file reads in that order: the rows' math (`losses`, `gradients`), the two ops built on it,
then the same rows computed on the CPU's cores and by kernels/cross_entropy.cu, and the dispatch
(`row_losses`, `row_gradients`) that picks one.
"""

import math

import numpy

from minitrain import backend, parallel
from minitrain.autograd import Function
from minitrain.gpu import fused, gemm
from minitrain.ops.cast import bf16_weight

BLOCK = 1 << 16  # elements of a CPU row block (at least one row)
IGNORE = -100  # a target that is none (Hugging Face's convention): its position counts for nothing


def losses(z, t):
    """(nll, lse) per row of logits z (N, V), targets t (N,): both (N,) in at least fp32."""
    xp = backend.xp
    acc = backend.acc_dtype(z.dtype)
    m = z.max(axis=-1, keepdims=True).astype(acc)  # (N, 1)
    e = z.astype(acc, copy=False) - m  # (N, V): the one big temporary ...
    lse = m[:, 0] + xp.log(xp.exp(e, out=e).sum(axis=-1))  # (N,)   ... exponentiated in place
    return lse - z[xp.arange(z.shape[0]), t].astype(acc), lse


def gradients(z, t, lse, scale, out):
    """out (N, V) = (softmax(z) - onehot(t)) * scale, the softmax rebuilt from lse; out may be z."""
    xp = backend.xp
    xp.subtract(z, lse[:, None].astype(z.dtype), out=out)
    xp.exp(out, out=out)  # softmax (N, V), in the output buffer
    out[xp.arange(z.shape[0]), t] -= 1.0
    out *= scale
    return out


class CrossEntropy(Function):
    """loss = mean over the N targets of lse_n - z_n[t_n]; logits z (..., V), targets t (...),
    IGNORE where a position has no target (its row is left out; no target at all: loss 0).
    Only the logits and one lse per row are kept; the softmax is rebuilt in the backward:
      dz = (softmax - onehot) * g / N   (0 in the rows left out)."""

    def forward(self, logits, targets):
        z, t, keep = flat_rows(logits, targets, logits.shape[-1])  # (N, V), (N,)
        nll, lse = row_losses(z, t)
        self.save(z, t, lse, keep, logits.shape)
        return (nll.sum(dtype=backend.xp.float64) / max(1, t.shape[0])).astype(logits.dtype)  # () scalar

    def backward(self, g):
        z, t, lse, keep, shape = self.saved
        dz = row_gradients(z, t, lse, float(g) / max(1, z.shape[0]), backend.xp.empty_like(z))
        return all_rows(dz, keep, shape), None


class LinearCrossEntropy(Function):
    """loss = cross_entropy(x W^T, targets): the lm_head and the loss fused, over chunks of rows,
    so the (N, V) logits never exist whole (at most `chunk_rows` x V, about 256 MB).

    The loss is a scalar at the end of the graph, so its gradient can be formed while the logits
    of a chunk c are at hand, then the logits dropped:
        z_c = x_c W^T,   dz_c = (softmax(z_c) - onehot) / N   (in place of z_c)
        dx_c = dz_c W,   dW += dz_c^T x_c
    backward(g) only scales the saved dx and dW by the incoming gradient g.
    x (..., H), W (V, H), targets (...) -> a scalar. Rows whose target is IGNORE are left out
    before the first product (N counts the others): they never reach the head, and their dx is 0.

    A chunk holds its logits (and, in bf16, their gradient): rows are sized by those bytes per
    logit, within BUDGET on the CPU (cache and RAM) and DEVICE_BUDGET on the GPU, where fewer,
    taller chunks mean fewer launches, fuller GEMMs and fewer passes over dW (each chunk reads and
    writes it).
    """

    BUDGET = 1 << 28  # bytes per chunk on the CPU
    DEVICE_BUDGET = 1 << 30  # on the GPU

    def forward(self, x, W, targets, chunk_rows=None, W16=None):
        xp = backend.xp
        x2, t, keep = flat_rows(x, targets, W.shape[0])  # (N, H), (N,): the rows with a target
        N, V = x2.shape[0], W.shape[0]
        Wc = self.weight(W, W16)  # (V, H) in the precision of x
        rows = chunk_rows or max(1, (self.BUDGET if xp is numpy else self.DEVICE_BUDGET) // (V * self.per_logit(W)))
        dx = xp.empty_like(x2) if self.needs_grad[0] else None
        dW = None
        total = 0.0  # the float64 sum of the rows' losses, chunk by chunk (on the device: no sync)
        for start in range(0, N, rows):
            xc, tc = x2[start:start + rows], t[start:start + rows]
            z = self.logits(xc, Wc)  # (r, V) in W's dtype (fp32 under bf16)
            nll, lse = row_losses(z, tc)
            total = total + nll.sum(dtype=xp.float64)
            if not any(self.needs_grad):
                continue
            dz = row_gradients(z, tc, lse, 1.0 / N, out=self.gradient_buffer(z))  # (r, V)
            if dx is not None:
                self.input_gradient(dz, Wc, dx[start:start + rows])  # dx_c = dz_c W
            if self.needs_grad[1]:
                dW = self.weight_gradient(dz, xc, dW)  # dW += dz_c^T x_c
        if self.needs_grad[1] and dW is None:  # no target at all: a zero gradient
            dW = xp.zeros(W.shape, dtype=W.dtype)
        self.save(dx, dW, keep, x.shape)
        return xp.asarray(total / max(1, N)).astype(W.dtype)

    def backward(self, g):
        dx, dW, keep, shape = self.saved
        if backend.host_value(g) != 1.0:  # e.g. 1/grad_accum; a device g is applied unread (no sync)
            dx = None if dx is None else self.scaled(dx, g)
            dW = None if dW is None else dW * g
        return (None if dx is None else all_rows(dx, keep, shape)), dW, None

    # the chunk's products, in W's precision
    def weight(self, W, W16):
        return W

    def per_logit(self, W):
        return W.dtype.itemsize

    def logits(self, xc, W):
        return xc @ W.T

    def gradient_buffer(self, z):
        return z  # dz in place of the logits

    def input_gradient(self, dz, W, out):
        backend.xp.matmul(dz, W, out=out)

    def weight_gradient(self, dz, xc, dW):
        part = dz.T @ xc  # (V, H)
        if dW is None:
            return part
        dW += part
        return dW

    def scaled(self, dx, g):
        return dx * g


class LinearCrossEntropyBF16(LinearCrossEntropy):
    """Mixed precision (x in bf16): W is rounded to bf16 (its kept copy) for the two products with
    x, but the logits, the softmax and the loss stay fp32; dz is written in bf16 by the softmax
    kernel itself, for dx (bf16, written by its GEMM straight into its rows of dx) and dW (fp32,
    summed over the chunks by the GEMM: beta = 1, no (V, H) temporary per chunk)."""

    def weight(self, W, W16):
        return backend.to_bf16(W) if W16 is None else W16

    def per_logit(self, W):
        return W.dtype.itemsize + 2  # the fp32 logits, then their bf16 gradient

    def logits(self, xc, W16):
        return gemm.matmul(xc, W16.T, backend.xp.float32)

    def gradient_buffer(self, z):
        return backend.xp.empty(z.shape, backend.BF16)

    def input_gradient(self, dz, W16, out):
        gemm.matmul(dz, W16, backend.BF16, out=out)

    def weight_gradient(self, dz, xc, dW):
        if dW is None:
            return gemm.matmul(dz.T, xc, backend.xp.float32)
        gemm.matmul_add(dz.T, xc, dW)  # dW += dz^T x_c, by the GEMM
        return dW

    def scaled(self, dx, g):
        return backend.to_bf16(backend.from_bf16(dx) * g)


def cross_entropy(logits, targets):
    return CrossEntropy.apply(logits, targets)


def linear_cross_entropy(x, W, targets, chunk_rows=None):
    op = backend.route((x,), LinearCrossEntropy, half=LinearCrossEntropyBF16)
    return op.apply(x, W, targets, chunk_rows=chunk_rows, W16=bf16_weight(x, W))


# --- the rows with a target ------------------------------------------------------------------

def device_targets(targets, rows, V):
    """targets (any shape; host data, as a batch is) -> (the targets that are not IGNORE, (n,)
    int64 where the logits live; keep): keep is None when every row has a target, else the host
    indices of the n rows that do. Each target is checked to be in [0, V) or IGNORE on the host
    first: on the GPU the check waits for nothing, and the ids go up once (CuPy stages a host array
    through pinned memory, asynchronously)."""
    t = backend.to_numpy(targets).reshape(-1)
    if t.shape[0] != rows:
        raise ValueError(f"cross_entropy: {t.shape[0]} targets for {rows} rows of logits")
    ignored = t == IGNORE
    if ((t < 0) & ~ignored).any() or (t >= V).any():
        raise ValueError(f"cross_entropy: a target id is outside the vocabulary [0, {V}) (and not {IGNORE}, "
                         f"which ignores its position)")
    keep = numpy.flatnonzero(~ignored) if ignored.any() else None
    return backend.xp.asarray(t if keep is None else t[keep], dtype=numpy.int64), keep


def flat_rows(x, targets, V):
    """x (..., K) -> the contiguous (n, K) rows that have a target, their targets and keep, as
    device_targets gives them: rows whose target is IGNORE never reach the head or the loss."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, K)
    t, keep = device_targets(targets, x2.shape[0], V)
    if keep is not None:
        x2 = x2[backend.xp.asarray(keep)]  # (n, K): a gather
    return backend.xp.ascontiguousarray(x2), t, keep


def all_rows(d, keep, shape):
    """The gradient of all N rows (shape (..., K)) from that of the kept rows d (n, K): zeros
    where the target was ignored."""
    if keep is None:
        return d.reshape(shape)
    full = backend.xp.zeros((math.prod(shape[:-1]), shape[-1]), dtype=d.dtype)  # (N, K)
    full[backend.xp.asarray(keep)] = d  # a scatter
    return full.reshape(shape)


# --- the same rows on the CPU's cores and on the GPU, and the dispatch --------------------------

def losses_blocked(z, t):
    """losses() on the CPU, by row blocks on every core, each block's exponentials in an aligned
    cache-sized scratch buffer, with the same operations per row. z is fp32 or fp64 here, its own
    accumulation dtype."""
    N, V = z.shape
    rows = max(1, BLOCK // V)
    scratch = [backend.aligned_empty(rows * V, z.dtype) for _ in range(parallel.WORKERS)]

    def block_losses(w, rb):
        zb = z[rb]
        m = zb.max(axis=-1, keepdims=True)  # (r, 1)
        e = scratch[w][: zb.size].reshape(zb.shape)
        numpy.subtract(zb, m, out=e)
        lse_b = m[:, 0] + numpy.log(numpy.exp(e, out=e).sum(axis=-1))  # (r,)
        return lse_b - zb[numpy.arange(zb.shape[0]), t[rb]], lse_b

    parts = parallel.run(parallel.slices(N, rows), block_losses)
    return numpy.concatenate([p[0] for p in parts]), numpy.concatenate([p[1] for p in parts])


def gradients_blocked(z, t, lse, scale, out):
    """gradients() on the CPU, by row blocks on every core."""
    N, V = z.shape

    def block_gradients(w, rb):
        o = out[rb]
        numpy.subtract(z[rb], lse[rb, None], out=o)
        numpy.exp(o, out=o)  # softmax rebuilt from lse
        o[numpy.arange(o.shape[0]), t[rb]] -= 1.0
        o *= scale

    parallel.run(parallel.slices(N, max(1, BLOCK // V)), block_gradients)
    return out


def losses_kernel(z, t):
    """kernels/cross_entropy.cu: one online pass per row."""
    nll, lse = (backend.xp.empty(z.shape[0], dtype=backend.xp.float32) for _ in range(2))
    fused.cross_entropy_forward(backend.launch, z, t, nll, lse)
    return nll, lse


def gradients_kernel(z, t, lse, scale, out):
    """kernels/cross_entropy.cu; `out` may be bf16 (mixed precision's dz)."""
    fused.cross_entropy_backward(backend.launch, z, t, lse, out, scale)
    return out


def row_losses(z, t):
    return backend.route((z,), losses, blocked=losses_blocked, kernel=losses_kernel)(z, t)


def row_gradients(z, t, lse, scale, out):
    return backend.route((z,), gradients, blocked=gradients_blocked, kernel=gradients_kernel)(z, t, lse, scale, out)
