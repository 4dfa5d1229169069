"""Token embedding: a row lookup whose backward is a scatter-add."""

from minitrain import backend
from minitrain.autograd import Function


class Embedding(Function):
    """y[n] = W[ids[n]]   for W (V, H), integer ids (...) -> y (..., H).

    y[n, h] = sum_v [ids[n] == v] W[v, h], so
      dW[v] = sum of dy[n] over every position n with ids[n] == v
    -- a scatter-ADD: a token that occurs k times receives the sum of its k gradients; rows of
    tokens that do not occur get 0. The ids are not differentiable.
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
        dW = backend.xp.zeros((V, H), dtype=g.dtype)
        backend.xp.add.at(dW, ids.reshape(-1), g.reshape(-1, H))  # repeated ids accumulate
        return dW, None


def embedding(W, ids):
    return Embedding.apply(W, ids)
