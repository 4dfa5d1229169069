"""Optimizers (plain SGD, AdamW with decoupled weight decay) and global-norm gradient clipping.

Both update parameters in place from `p.grad`; the learning rate is an attribute the training
loop sets at every step from the schedule. `state()` / `load_state()` carry what a resumed run
needs to continue exactly.
"""

import concurrent.futures
import math
import os

import numpy

from minitrain import backend
from minitrain.gpu import fused


CHUNK = 1 << 16  # elements per slice of the loops below: the slices of p, g, m, v and the scratch stay in cache
WORKERS = max(1, min(4, os.cpu_count() or 1))  # NumPy's elementwise ufuncs use one core; these loops use all
_pool = None


def _run_slices(tasks, work):
    """work(worker, task) for every task, the tasks dealt round-robin to WORKERS threads (NumPy
    releases the GIL inside its loops); the results come back in task order, so a sum of them is
    the same in every run."""
    global _pool
    if WORKERS == 1 or backend.xp is not numpy or len(tasks) < 2:
        return [work(0, t) for t in tasks]
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="minitrain-optim")
    results = [None] * len(tasks)

    def run(w):
        for i in range(w, len(tasks), WORKERS):
            results[i] = work(w, tasks[i])

    for f in [_pool.submit(run, w) for w in range(WORKERS)]:
        f.result()
    return results


def _slices(n):
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


def global_grad_norm(params):
    """sqrt(sum over every parameter of sum(g^2)), accumulated in float64: the true global L2 norm.
    Slice by slice, the exact float64 squares go to an aligned scratch and NumPy sums that (no
    casting buffer of varying alignment); the slices' sums are added exactly (math.fsum, one
    rounding at the end), so the total does not depend on the order of the parameters either.
    The norm (and the clipping factor) has the same bits in every run, a resumed one included."""
    xp = backend.xp
    scratch = [backend.aligned_empty(CHUNK, xp.float64) for _ in range(WORKERS)]
    tasks = [(g, sl) for p in params if p.grad is not None for g in [p.grad.reshape(-1)] for sl in _slices(g.size)]

    def sum_of_squares(w, task):
        g, sl = task
        return float(xp.multiply(g[sl], g[sl], out=scratch[w][: sl.stop - sl.start], dtype=xp.float64).sum())

    return math.sqrt(math.fsum(_run_slices(tasks, sum_of_squares)))


def clip_grads(params, norm, max_norm):
    """Scale every gradient by max_norm / norm when the global norm exceeds max_norm (the
    direction of the update is kept; its length is capped)."""
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad *= p.grad.dtype.type(scale)


class SGD:
    """p <- p - lr * g. No momentum, no weight decay."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.data -= p.data.dtype.type(self.lr) * p.grad

    def state(self):
        return {}, {}

    def load_state(self, scalars, arrays):
        pass


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW computes it:

        p <- p * (1 - lr * wd)                       (decay not through the gradient)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    By default 1-D tensors (norm weights, biases) get no weight decay (`decay_1d=True` changes it).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decay_1d=False):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.decay_1d = weight_decay, decay_1d
        self.t = 0
        self.m = [backend.xp.zeros_like(p.data) for p in self.params]
        self.v = [backend.xp.zeros_like(p.data) for p in self.params]

    def step(self):
        self.t += 1
        lr, b1, b2 = self.lr, self.beta1, self.beta2
        step_size = lr / (1 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1 - b2 ** self.t)
        tasks = []
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            decays = self.weight_decay and (p.data.ndim >= 2 or self.decay_1d)
            if launch := backend.kernels(p.data, g):  # kernels/adamw.cu: the same arithmetic, one pass
                fused.adamw_step(launch, p.data.reshape(-1), backend.xp.ascontiguousarray(g).reshape(-1),
                                 m.reshape(-1), v.reshape(-1), lr=lr, b1=b1, b2=b2, eps=self.eps,
                                 wd=self.weight_decay if decays else 0.0, step_size=step_size, bc2_sqrt=bc2_sqrt)
                continue
            flat = (p.data.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1))
            decay = 1 - lr * self.weight_decay if decays else None
            tasks += [(flat, sl, decay) for sl in _slices(p.data.size)]
        if tasks:
            dt = tasks[0][0][0].dtype
            scratch = [(backend.aligned_empty(CHUNK, dt), backend.aligned_empty(CHUNK, dt)) for _ in range(WORKERS)]
            _run_slices(tasks, lambda w, task: self._update(*task, scratch[w], step_size, bc2_sqrt))

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

    def state(self):
        """(scalars, arrays): the step count, and both moments of every parameter by name."""
        arrays = {}
        for p, m, v in zip(self.params, self.m, self.v):
            arrays[f"m.{p.name}"], arrays[f"v.{p.name}"] = m, v
        return {"t": self.t}, arrays

    def load_state(self, scalars, arrays):
        self.t = int(scalars["t"])
        for i, p in enumerate(self.params):
            self.m[i] = backend.xp.array(arrays[f"m.{p.name}"], dtype=p.data.dtype)  # a writable copy
            self.v[i] = backend.xp.array(arrays[f"v.{p.name}"], dtype=p.data.dtype)
