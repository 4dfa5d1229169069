"""Token embedding: a row lookup whose backward is a scatter-add."""

import numpy

from minitrain import backend
from minitrain.autograd import Function, RowSparse
from minitrain.gpu import embedding as embedding_kernels


class Embedding(Function):
    """y[n] = W[ids[n]]   for W (V, H), integer ids (...) -> y (..., H).

    y[n, h] = sum_v [ids[n] == v] W[v, h], so
      dW[v] = sum of dy[n] over every position n with ids[n] == v
    -- a scatter-ADD: a token that occurs k times receives the sum of its k gradients; rows of
    tokens that do not occur get 0 (returned as a RowSparse gradient: only the used rows are
    stored). The ids are not differentiable.

    The ids are host data (the batch), checked and grouped on the host: on the GPU nothing here
    waits for the device. Each used row's sum adds its positions in increasing order, NumPy's
    add.at order -- on the kernel path by one block per row (kernels/embedding.cu), so the GPU
    gives the CPU's bits, run after run (no atomics).
    """

    def forward(self, W, ids):
        V = W.shape[0]
        ids = backend.to_numpy(ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            bad = ids[(ids < 0) | (ids >= V)].reshape(-1)[0]
            raise ValueError(f"embedding: token id {int(bad)} is outside the vocabulary [0, {V})")
        self.save(ids, W.shape)
        return W[backend.xp.asarray(ids)]  # (..., H)

    def backward(self, g):
        ids, (V, H) = self.saved
        used, slot = numpy.unique(ids.reshape(-1), return_inverse=True)  # each distinct token once
        dy = g.reshape(-1, H)  # (N, H)
        sums = backend.xp.zeros((used.size, H), dtype=g.dtype)
        backend.xp.add.at(sums, backend.xp.asarray(slot.reshape(-1)), dy)  # repeated ids accumulate, in position order
        return RowSparse(backend.xp.asarray(used), sums, (V, H)), None  # zero outside the batch's rows


class EmbeddingKernel(Embedding):
    """The backward by kernels/embedding.cu: one block per used row, summing its positions in
    order (the host groups them), as add.at does."""

    def backward(self, g):
        ids, (V, H) = self.saved
        xp = backend.xp
        used, slot = numpy.unique(ids.reshape(-1), return_inverse=True)
        slot = slot.reshape(-1)
        dy = g.reshape(-1, H)  # (N, H)
        order = numpy.argsort(slot, kind="stable")  # positions grouped by token, each group in order
        starts = numpy.searchsorted(slot[order], numpy.arange(used.size + 1))  # (U + 1,)
        sums = xp.empty((used.size, H), dtype=dy.dtype)
        embedding_kernels.backward(backend.launch, xp.ascontiguousarray(dy), xp.asarray(order), xp.asarray(starts),
                                   sums)
        return RowSparse(xp.asarray(used), sums, (V, H)), None


def embedding(W, ids):
    return backend.route((W,), Embedding, kernel=EmbeddingKernel).apply(W, ids)
