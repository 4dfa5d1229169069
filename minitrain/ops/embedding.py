"""Token embedding: a row lookup whose backward is a scatter-add."""

from minitrain import backend
from minitrain.autograd import Function, RowSparse


class Embedding(Function):
    """y[n] = W[ids[n]]   for W (V, H), integer ids (...) -> y (..., H).

    y[n, h] = sum_v [ids[n] == v] W[v, h], so
      dW[v] = sum of dy[n] over every position n with ids[n] == v
    -- a scatter-ADD: a token that occurs k times receives the sum of its k gradients; rows of
    tokens that do not occur get 0 (returned as a RowSparse gradient: only the used rows are
    stored). The ids are not differentiable.
    """

    def forward(self, W, ids):
        V = W.shape[0]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
            bad = ids[(ids < 0) | (ids >= V)].reshape(-1)[0]
            raise ValueError(f"embedding: token id {int(bad)} is outside the vocabulary [0, {V})")
        self.save(ids, W.shape)
        return W[ids]  # (..., H)

    def backward(self, g):
        ids, (V, H) = self.saved
        xp = backend.xp
        used, slot = xp.unique(ids.reshape(-1), return_inverse=True)  # each distinct token once
        sums = xp.zeros((used.size, H), dtype=g.dtype)
        xp.add.at(sums, slot.reshape(-1), g.reshape(-1, H))  # repeated ids accumulate
        return RowSparse(used, sums, (V, H)), None  # zero outside the batch's rows


def embedding(W, ids):
    return Embedding.apply(W, ids)
