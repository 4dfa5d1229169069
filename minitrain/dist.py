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

Without mpiexec (no MPI environment variables) it is one process and mpi4py is not imported.
"""

import os
import time

from minitrain.errors import InputError

LAUNCH_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")  # MPICH (Hydra), Open MPI
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")


def sum_in_order(grads):
    """grads: micro-batch gradients (a list, in order, of lists of arrays, one per parameter),
    summed left to right into the first list, in place."""
    total = grads[0]
    for g in grads[1:]:
        for t, x in zip(total, g):
            t += x
    return total


class RankLost(Exception):
    """Another rank stopped answering (died or hung): this rank gives up after the timeout."""


class Single:
    """One process: rank 0 of 1."""

    rank, size = 0, 1

    def ordered_sum(self, grads):
        """grads: this rank's micro-batch gradients, in order. -> the step's gradient G."""
        return sum_in_order(grads)

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

    def ordered_sum(self, grads):
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
        self._wait([self.comm.Ibcast(t, root=self.size - 1) for t in total],  # the last rank's G to all
                   f"the step's gradient from rank {self.size - 1}")
        return total

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


def launched_by_mpi():
    return any(int(os.environ.get(v, "1")) > 1 for v in LAUNCH_VARIABLES)


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
