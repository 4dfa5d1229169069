"""Optimizers (plain SGD, AdamW with decoupled weight decay) and global-norm gradient clipping.

Both update parameters in place from `p.grad`; the learning rate is an attribute the training
loop sets at every step from the schedule. `state()` / `load_state()` carry what a resumed run
needs to continue exactly.
"""

import math

from minitrain import backend, parallel
from minitrain.gpu import fused
from minitrain.parallel import slices


CHUNK = 1 << 16  # elements per slice of the loops below: the slices of p, g, m, v and the scratch stay in cache


def sums_of_squares(arrays):
    """sum(g^2) of every CHUNK-element slice of every 1-D array (in order), each accumulated in
    float64: the exact float64 squares go to an aligned scratch and NumPy sums that (no casting
    buffer of varying alignment), so a slice's sum depends on its elements alone, not on which
    array or which rank holds it (ZeRO-1's shards start on CHUNK boundaries: minitrain/zero.py).
    On the kernel path (float32 gradients, kernels/grad_norm.cu) every slice of every array is
    summed on the device by one launch into one float64 array, and that one array comes to the
    host: one transfer a step, not one sync per slice."""
    xp = backend.xp
    if arrays and (launch := backend.kernels(*arrays)):
        arrays = [xp.ascontiguousarray(g) for g in arrays]
        table, slices_in_all = fused.sum_squares_table(arrays, CHUNK)
        sums = xp.empty(slices_in_all, dtype=xp.float64)
        fused.sum_squares(launch, xp.asarray(table), CHUNK, sums)
        return backend.to_numpy(sums).tolist()
    scratch = [backend.aligned_empty(CHUNK, xp.float64) for _ in range(parallel.WORKERS)]
    tasks = [(g, sl) for g in arrays for sl in slices(g.size, CHUNK)]

    def sum_of_squares(w, task):
        g, sl = task
        return float(xp.multiply(g[sl], g[sl], out=scratch[w][: sl.stop - sl.start], dtype=xp.float64).sum())

    return parallel.run(tasks, sum_of_squares)


def global_grad_norm(params):
    """sqrt(sum over every parameter of sum(g^2)): the true global L2 norm. The slices' float64
    sums are added exactly (math.fsum, one rounding at the end), so the total depends neither on
    the order of the parameters nor on how they are split. The norm (and the clipping factor) has
    the same bits in every run, a resumed or a sharded one included."""
    return math.sqrt(math.fsum(sums_of_squares([p.grad.reshape(-1) for p in params if p.grad is not None])))


def clip_grads(grads, norm, max_norm):
    """Scale every gradient array (in place) by max_norm / norm when the global norm exceeds
    max_norm (the direction of the update is kept; its length is capped)."""
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads:
            g *= g.dtype.type(scale)


class SGD:
    """p <- p - lr * g. No momentum, no weight decay."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.data -= p.data.dtype.type(self.lr) * p.grad
                p.bf16 = None  # a kept bf16 copy is stale now

    def state(self, assemble=None):
        return {}, {}

    def load_state(self, scalars, arrays):
        pass

    def state_bytes(self):
        return 0


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it:

        p <- p * (1 - lr * wd)                       (decay not through the gradient)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    By default 1-D tensors (norm weights, biases) get no weight decay (`decay_1d=True` changes it).
    Every line is elementwise, so any subset of the elements can be updated on its own with the
    same bits: `pieces`, (parameter index, start, stop) ranges of the flattened parameters, are
    the elements this optimizer updates and keeps m and v for (flat, one pair per piece); by
    default every parameter whole, and under ZeRO-1 this rank's shard (minitrain/zero.py).
    Mixed precision: where a parameter keeps a bf16 copy (Tensor.bf16_copy), the kernel writes it
    with the update, in the same pass: the next forward reads it as it is.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_1d=False, pieces=None):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.decay_1d = weight_decay, decay_1d
        self.t = 0
        self.pieces = [(i, 0, p.data.size) for i, p in enumerate(self.params)] if pieces is None else pieces
        self.m = [backend.xp.zeros(b - a, self.params[i].data.dtype) for i, a, b in self.pieces]
        self.v = [backend.xp.zeros(b - a, self.params[i].data.dtype) for i, a, b in self.pieces]

    def step(self):
        self.t += 1
        lr, b1, b2 = self.lr, self.beta1, self.beta2
        step_size = lr / (1 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        tasks, on_device, launch = [], [], None  # the CPU's slices; the pieces for kernels/adamw.cu and its launcher
        for (i, a, b), m, v in zip(self.pieces, self.m, self.v):
            tensor = self.params[i]
            p, g = tensor.data, tensor.grad
            if g is None:
                continue
            decays = self.weight_decay and (p.ndim >= 2 or self.decay_1d)
            ps, gs = p.reshape(-1)[a:b], backend.xp.ascontiguousarray(g).reshape(-1)[a:b]  # p is contiguous: a view
            if kernels := backend.kernels(p, g):  # kernels/adamw.cu: the same arithmetic, one pass
                launch = kernels
                copy = None if tensor.bf16 is None else tensor.bf16.reshape(-1)[a:b]  # the kept bf16 copy
                on_device.append((ps, gs, m, v, copy, decays))
                continue
            tensor.bf16 = None  # no bf16 copy is written here: drop any
            decay = 1 - lr * self.weight_decay if decays else None
            tasks += [((ps, gs, m, v), sl, decay) for sl in slices(b - a, CHUNK)]
        if on_device:  # every parameter in one launch
            table, blocks = fused.adamw_table(on_device, CHUNK)
            fused.adamw_multi(launch, backend.xp.asarray(table), blocks, CHUNK, lr=lr, b1=b1, b2=b2, eps=self.eps,
                              wd=self.weight_decay, step_size=step_size, bc2_sqrt=bc2_sqrt)
        if tasks:
            dt = tasks[0][0][0].dtype
            scratch = [(backend.aligned_empty(CHUNK, dt), backend.aligned_empty(CHUNK, dt)) for _ in range(parallel.WORKERS)]
            parallel.run(tasks, lambda w, task: self._update(*task, scratch[w], step_size, bc2_sqrt))

    def _update(self, flat, sl, decay, scratch, step_size, bc2_sqrt):
        """One slice of the update in place, through two scratch buffers: the same arithmetic,
        operation for operation, as the formula above (and as kernels/adamw.cu)."""
        xp, b1, b2 = backend.xp, self.beta1, self.beta2
        ps, gs, ms, vs = (a[sl] for a in flat)
        s1, s2 = (s[: sl.stop - sl.start] for s in scratch)
        if decay is not None:
            ps *= decay
        ms *= b1
        ms += xp.multiply(gs, 1 - b1, out=s1)  # m = b1 m + (1 - b1) g
        vs *= b2
        xp.multiply(gs, 1 - b2, out=s1)
        vs += xp.multiply(s1, gs, out=s1)  # v = b2 v + ((1 - b2) g) g
        xp.sqrt(vs, out=s1)
        s1 /= bc2_sqrt
        s1 += self.eps  # denominator
        xp.multiply(ms, step_size, out=s2)
        ps -= xp.divide(s2, s1, out=s2)

    def state(self, assemble=None):
        """(scalars, arrays): the step count, and both moments of every parameter by name, shaped
        like it. `assemble` (ZeRO-1: zero.Shards.assemble) turns the per-piece moments into whole
        ones, on the lead rank only (elsewhere: no arrays); without it the pieces are whole."""
        whole = assemble or (lambda flat: [f.reshape(self.params[i].data.shape)
                                           for (i, a, b), f in zip(self.pieces, flat)])
        m, v = whole(self.m), whole(self.v)
        if m is None:
            return {"t": self.t}, {}
        arrays = {}
        for p, pm, pv in zip(self.params, m, v):
            arrays[f"m.{p.name}"], arrays[f"v.{p.name}"] = pm, pv
        return {"t": self.t}, arrays

    def load_state(self, scalars, arrays):
        """The whole moments (any sharding saved them) -> this optimizer's pieces of them."""
        self.t = int(scalars["t"])
        for k, (i, a, b) in enumerate(self.pieces):
            p = self.params[i]
            self.m[k] = backend.xp.array(arrays[f"m.{p.name}"].reshape(-1)[a:b], dtype=p.data.dtype)  # a writable copy
            self.v[k] = backend.xp.array(arrays[f"v.{p.name}"].reshape(-1)[a:b], dtype=p.data.dtype)

    def state_bytes(self):
        """Bytes of optimizer state this process holds (m and v)."""
        return sum(m.nbytes + v.nbytes for m, v in zip(self.m, self.v))
