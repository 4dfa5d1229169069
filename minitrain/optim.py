"""Optimizers: plain SGD and AdamW (decoupled weight decay), updating parameters in place."""

import math

from minitrain import backend


class SGD:
    """p <- p - lr * g. No momentum, no weight decay."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.data -= self.lr * p.grad


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
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay and (p.data.ndim >= 2 or self.decay_1d):
                p.data *= 1 - lr * self.weight_decay
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            denom = backend.xp.sqrt(v)
            denom /= bc2_sqrt
            denom += self.eps
            p.data -= step_size * m / denom
