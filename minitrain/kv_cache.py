"""The KV cache of the decoder: each layer's keys and values of every token seen so far, so a
new token costs one token's work instead of a rerun of the whole context.

A batch of prompts of different lengths is LEFT-padded to one length P: row b has pad[b] padding
slots, then its tokens. All rows then advance in lockstep, one slot per step, and

    token at slot s of row b sits at position  s - pad[b]      (RoPE sees the true position)
    query slot i of row b may read key slot j  iff  pad[b] <= j <= i

so a row never sees another row's padding or its own. (A padding slot's query reads only its own
key, j = i, so that its softmax is defined; its output is never used.)

Attention over the cache is the training op's math (ops/attention.py) with the mask above instead
of the plain causal one: for t new queries of row b and head h, over the n + t cached keys,

    S = q K^T / sqrt(hd) + M,  P = softmax(S),  O = P V          (t, n+t) -> (t, hd)

with the g = nH / nKV query heads of a group reading one cached kv head (GQA). Inference only:
no graph, no backward.
"""

import math

from minitrain import backend
from minitrain.autograd import Tensor


class KVCache:
    def __init__(self, config, pad, capacity):
        """pad (B,) integers: each row's padding slots; capacity: the slots to hold (padded
        prompt + new tokens, at most max_position_embeddings beyond the padding)."""
        if backend.bf16:
            raise ValueError("the KV cache runs in fp32 or fp64, not under bf16 mixed precision")
        xp = backend.xp
        self.pad = xp.asarray(pad, dtype=xp.int64)  # (B,)
        B, nKV, hd = len(pad), config.num_key_value_heads, config.head_dim
        self.k = [xp.empty((B, nKV, capacity, hd), dtype=backend.dtype) for _ in range(config.num_hidden_layers)]
        self.v = [xp.empty((B, nKV, capacity, hd), dtype=backend.dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # slots filled, the same for every row

    @property
    def capacity(self):
        return self.k[0].shape[2]

    def positions(self, t):
        """(B, t): the true positions of the next t slots of every row (negative: padding)."""
        slots = backend.xp.arange(self.length, self.length + t)
        return slots[None, :] - self.pad[:, None]

    def attend(self, layer, q, k, v):
        """Store the t new tokens' k, v (B, t, nKV, hd) in `layer`'s cache and attend with their
        q (B, t, nH, hd) over every cached slot. -> Tensor (B, t, nH, hd)."""
        xp = backend.xp
        n, (B, t, nH, hd) = self.length, q.shape
        if n + t > self.capacity:
            raise ValueError(f"KV cache: {n} + {t} slots exceed its capacity {self.capacity}")
        K, V = self.k[layer], self.v[layer]  # (B, nKV, S, hd)
        K[:, :, n:n + t] = k.data.transpose(0, 2, 1, 3)
        V[:, :, n:n + t] = v.data.transpose(0, 2, 1, 3)
        nKV = K.shape[1]
        qh = q.data.transpose(0, 2, 1, 3).reshape(B, nKV, nH // nKV * t, hd)  # (B, nKV, g*t, hd): a group's rows
        s = qh @ K[:, :, :n + t].swapaxes(-1, -2)  # (B, nKV, g*t, n+t)
        s *= 1.0 / math.sqrt(hd)
        s5 = s.reshape(B, nKV, nH // nKV, t, n + t)  # (B, nKV, g, t, n+t): view
        s5 += self._mask(n, t)[:, None, None]  # (B, 1, 1, t, n+t)
        s -= s.max(axis=-1, keepdims=True)  # finite: every row may read at least its own slot
        p = xp.exp(s, out=s)
        p /= p.sum(axis=-1, keepdims=True)
        o = p @ V[:, :, :n + t]  # (B, nKV, g*t, hd)
        return Tensor(o.reshape(B, nH, t, hd).transpose(0, 2, 1, 3).copy())  # (B, t, nH, hd)

    def advance(self, t):
        """The t slots every layer has just stored are part of the context from now on."""
        self.length += t

    def keep(self, rows):
        """Drop every row not in `rows` (finished prompts), keeping the order given."""
        rows = backend.xp.asarray(rows, dtype=backend.xp.int64)
        self.pad = self.pad[rows]
        self.k = [K[rows] for K in self.k]
        self.v = [V[rows] for V in self.v]

    def _mask(self, n, t):
        """(B, t, n+t): 0 where query slot i = n.. may read key slot j, -inf elsewhere."""
        xp = backend.xp
        i = xp.arange(n, n + t)[None, :, None]  # (1, t, 1)
        j = xp.arange(n + t)[None, None, :]  # (1, 1, n+t)
        allowed = (j <= i) & ((j >= self.pad[:, None, None]) | (j == i))
        return xp.where(allowed, 0.0, -xp.inf).astype(backend.dtype)
