"""Data parallel training over MPI (`mpiexec -n N minitrain pretrain ...`), through mpi4py.

N ranks each run `grad_accum` = A micro-batches of every step: rank r takes the step's global
micro-batches r*A .. r*A + A-1, the very windows one process with grad-accum N*A would use. The
step's gradient must have the same bits as that one process's, so it is DEFINED as the sum of the
micro-batch gradients g_0, g_1, ... (each formed on its own, weight 1/(N*A) included) in global
micro-batch order, strictly left to right:

    G = (((g_0 + g_1) + g_2) + ... + g_{NA-1})

Floating-point addition is not associative, so no reduction whose grouping depends on N (an MPI
all-reduce, a tree, a ring) can give it. The chain below does, for every N and A: rank 0 sums its
g's in order and sends the running sum to rank 1, which adds its own in order and passes it on;
the last rank broadcasts G. Rank r > 0 holds its A gradients until the running sum arrives
(A gradient-sized buffers); rank 0 and a single process stream them into one.

The losses of the micro-batches travel the same way (gathered, then summed in order), so every
rank reports the same mean loss, computes the same norm, clips and updates alike: the weights
stay identical on every rank without ever being sent.

Under ZeRO-1 (`--zero 1`, minitrain/zero.py) the last rank scatters G, each piece to the rank
that owns it, instead of broadcasting it whole, and each owner broadcasts its updated piece of the
parameters (`share`); a checkpoint's optimizer state is collected on rank 0 (`collect`).
A `layout` is, per rank, the (parameter index, start, stop) pieces of the flattened parameters
that rank owns.

Without mpiexec (no MPI environment variables) it is one process and mpi4py is not imported.
"""

import os
import time

from minitrain import backend
from minitrain.errors import InputError

LAUNCH_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")  # MPICH (Hydra), Open MPI
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")


def sum_in_order(grads):
    """grads: micro-batch gradients (a list, in order, of lists of arrays, one per parameter),
    summed left to right into the first list's arrays (in place where they are contiguous)."""
    total = [backend.xp.ascontiguousarray(t) for t in grads[0]]  # C order: pieces are slices of reshape(-1)
    for g in grads[1:]:
        for t, x in zip(total, g):
            t += x
    return total


class RankLost(Exception):
    """Another rank stopped answering (died or hung): this rank gives up after the timeout."""


class Single:
    """One process: rank 0 of 1."""

    rank, size = 0, 1

    def ordered_sum(self, grads, layout=None):
        """grads: this rank's micro-batch gradients, in order. -> the step's gradient G: all of it,
        or with a layout, correct in this rank's pieces (the rest of the arrays are partial sums)."""
        return sum_in_order(grads)

    def share(self, arrays, layout):
        """Each piece of `arrays` from the rank that owns it to every rank, in place."""

    def collect(self, mine, layout, like):
        """This rank's per-piece arrays (`mine`, in the order of layout[rank]) -> on rank 0, whole
        arrays shaped like the arrays `like`, each piece from its owner; None on the other ranks."""
        whole = [backend.xp.empty_like(x) for x in like]
        for m, (i, a, b) in zip(mine, layout[0]):
            whole[i].reshape(-1)[a:b] = m
        return whole

    def gather(self, rows, per_rank, width):
        """This rank's rows (tuples of `width` floats, at most per_rank of them; a rank may have
        none) -> every rank's, in rank order."""
        return list(rows)


class MPIGroup(Single):
    """MPI's world. Every exchange is non-blocking and polled (1 ms sleeps, so a waiting rank
    leaves the cores to the ranks still computing) against a deadline of `timeout` seconds: a
    rank that died or hung makes the others raise RankLost instead of waiting forever."""

    def __init__(self, comm, timeout):
        self.comm, self.rank, self.size, self.timeout = comm, comm.Get_rank(), comm.Get_size(), timeout

    def ordered_sum(self, grads, layout=None):
        if self.rank == 0:
            total = sum_in_order(grads)
        else:
            total = [x.copy() for x in grads[0]]  # a buffer of each shape and dtype, overwritten
            self._wait([self.comm.Irecv(t, source=self.rank - 1, tag=i) for i, t in enumerate(total)],
                       f"the running gradient sum from rank {self.rank - 1}")
            total = sum_in_order([total] + grads)
        if self.rank < self.size - 1:
            self._wait([self.comm.Isend(t, dest=self.rank + 1, tag=i) for i, t in enumerate(total)],
                       f"rank {self.rank + 1} to take the running gradient sum")
        last = self.size - 1
        if layout is None:
            self._wait([self.comm.Ibcast(t, root=last) for t in total],  # the last rank's G to all
                       f"the step's gradient from rank {last}")
        elif self.rank == last:  # its pieces to the owners
            self._wait([self.comm.Isend(total[i].reshape(-1)[a:b], dest=q, tag=k)
                        for q, k, (i, a, b) in _numbered(layout) if q != last],
                       "every rank to take its shard of the step's gradient")
        else:
            self._wait([self.comm.Irecv(total[i].reshape(-1)[a:b], source=last, tag=k)
                        for q, k, (i, a, b) in _numbered(layout) if q == self.rank],
                       f"this rank's shard of the step's gradient from rank {last}")
        return total

    def share(self, arrays, layout):
        self._wait([self.comm.Ibcast(arrays[i].reshape(-1)[a:b], root=q) for q, _, (i, a, b) in _numbered(layout)],
                   "every rank's shard of the updated parameters")

    def collect(self, mine, layout, like):
        own = [k for q, k, _ in _numbered(layout) if q == self.rank]
        if self.rank != 0:
            self._wait([self.comm.Isend(m, dest=0, tag=k) for m, k in zip(mine, own)],
                       "rank 0 to take this rank's shard of the optimizer state")
            return None
        whole = Single.collect(self, mine, layout, like)
        self._wait([self.comm.Irecv(whole[i].reshape(-1)[a:b], source=q, tag=k)
                    for q, k, (i, a, b) in _numbered(layout) if q != 0],
                   "every rank's shard of the optimizer state")
        return whole

    def gather(self, rows, per_rank, width):
        import numpy

        mine = numpy.full((per_rank, width + 1), numpy.nan)  # column 0: 1 for a row, NaN for padding
        if rows:
            mine[:len(rows), 0], mine[:len(rows), 1:] = 1.0, rows
        every = numpy.empty((self.size, per_rank, mine.shape[1]))
        self._wait([self.comm.Iallgather(mine, every)], "every rank's losses")
        return [tuple(float(v) for v in row[1:]) for row in every.reshape(-1, mine.shape[1]) if row[0] == 1.0]

    def _wait(self, requests, what):
        from mpi4py import MPI

        deadline = time.monotonic() + self.timeout
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                raise RankLost(f"rank {self.rank}: waited {self.timeout:g} s for {what}: that rank died or hung "
                               "(--dist-timeout)")
            time.sleep(0.001)


def _numbered(layout):
    """(owner, piece number, piece) for every piece of a layout: the number is the message tag."""
    owned = [(q, piece) for q, pieces in enumerate(layout) for piece in pieces]
    return [(q, k, piece) for k, (q, piece) in enumerate(owned)]


def launch_size():
    """How many ranks the launcher started (1 without mpiexec), known before MPI starts."""
    return max([int(os.environ[v]) for v in LAUNCH_VARIABLES if v in os.environ] or [1])


def launched_by_mpi():
    return launch_size() > 1


def launch_rank():
    """This process's rank as the launcher set it (0 without mpiexec), known before MPI starts:
    only rank 0 prints what every rank finds alike (a bad input, the report)."""
    return next((int(os.environ[v]) for v in RANK_VARIABLES if v in os.environ), 0)


def world(timeout):
    """The process group this process belongs to: MPI's world under mpiexec -n N > 1 (waits
    bounded by `timeout` seconds), else Single."""
    if not launched_by_mpi():
        return Single()
    try:
        from mpi4py import MPI
    except ImportError:
        raise InputError("started by mpiexec with several ranks, but mpi4py is not installed: "
                         "pip install 'minitrain[dist]'") from None
    return MPIGroup(MPI.COMM_WORLD, timeout)
