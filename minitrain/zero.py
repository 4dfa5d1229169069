"""ZeRO stage 1 (`--zero 1`; Rajbhandari et al. 2020): AdamW's moments sharded across the N ranks.

Without it every rank keeps m and v for every parameter (8 bytes per fp32 parameter) and makes
the same update. With it the parameters, flattened and laid end to end (P elements), are cut into
N shards of about P/N elements; rank q keeps m and v for shard q alone (8P/N bytes) and updates
only shard q. A step (dist.py does the moving):

  1. reduce-scatter: the chain sums the micro-batch gradients in global order as before; the
     last rank, which then holds G, sends each shard of it to its owner instead of broadcasting G;
  2. norm: each rank forms sum(g^2) of every CHUNK-element slice of its shard; every rank's
     sums are gathered and added exactly (math.fsum). That is the norm one process forms over
     all of G, bit for bit: the slices are the same ones (a shard's pieces start on CHUNK
     boundaries of their parameter) and an exact sum does not depend on the order;
  3. clip and update, elementwise, on the shard only: the same arithmetic on the same elements;
  4. all-gather: each owner broadcasts its updated shard of the parameters to every rank.

So the weights have the same bits as without ZeRO, and as one process, for every N. Checkpoints
hold the whole optimizer state (collected on rank 0), so a run can resume on another N.
"""

import math

from minitrain.optim import CHUNK, sums_of_squares


def layout(sizes, ranks):
    """sizes: element counts of the parameters, in order. -> per rank, the (parameter index,
    start, stop) pieces it owns. The parameters' CHUNK-element units, end to end, are dealt out
    in order: the unit starting at global element o goes to rank o * ranks // total, so every
    rank owns one contiguous run of about total/ranks elements (within a unit of it)."""
    total, offset = sum(sizes), 0
    owned = [[] for _ in range(ranks)]
    for i, size in enumerate(sizes):
        for start in range(0, size, CHUNK):
            stop = min(start + CHUNK, size)
            pieces = owned[(offset + start) * ranks // total]
            if pieces and pieces[-1][0] == i and pieces[-1][2] == start:  # the same parameter goes on
                pieces[-1] = (i, pieces[-1][1], stop)
            else:
                pieces.append((i, start, stop))
        offset += size
    return owned


class Shards:
    """This rank's shard of the parameters under ZeRO-1, and the step's exchanges over it."""

    def __init__(self, group, params):
        self.group, self.params = group, list(params)
        self.layout = layout([p.data.size for p in self.params], group.size)
        self.mine = self.layout[group.rank]  # the pieces AdamW updates here
        self.slices = max(sum(-(-(b - a) // CHUNK) for _, a, b in pieces) for pieces in self.layout)

    def grads(self):
        """This rank's pieces of the gradients: views, so clipping them clips the update's input."""
        return [self.params[i].grad.reshape(-1)[a:b] for i, a, b in self.mine]

    def grad_norm(self):
        """The global L2 norm of G from every rank's shard (exact float64 sum of the slice sums)."""
        mine = [(s,) for s in sums_of_squares(self.grads())]
        return math.sqrt(math.fsum(s for s, in self.group.gather(mine, self.slices, 1)))

    def share(self):
        """Every rank's updated shard of the parameters to every rank (the all-gather)."""
        self.group.share([p.data for p in self.params], self.layout)
        for p in self.params:
            p.bf16 = None  # the kept bf16 copies were updated in this rank's shard only

    def assemble(self, flat):
        """This rank's per-piece moments -> the whole moments, per parameter, on rank 0 (else None)."""
        return self.group.collect(flat, self.layout, [p.data for p in self.params])
