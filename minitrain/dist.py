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

With `--device cuda` each rank takes one GPU and the same chain runs over NCCL (NCCLGroup).
Without mpiexec (no MPI environment variables) it is one process and mpi4py is not imported.
"""

import os
import time

import numpy

from minitrain import backend, gpu
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
        whole = [numpy.empty(x.shape, x.dtype) for x in like]  # host arrays: for a checkpoint
        for m, (i, a, b) in zip(mine, layout[0]):
            whole[i].reshape(-1)[a:b] = backend.to_numpy(m)
        return whole

    def gather(self, rows, per_rank, width):
        """This rank's rows (tuples of `width` floats, at most per_rank of them; a rank may have
        none) -> every rank's, in rank order."""
        return list(rows)


class MPIGroup(Single):
    """MPI's world. Every exchange is non-blocking and polled (1 ms sleeps, so a waiting rank
    leaves the cores to the ranks still computing) against a deadline of `timeout` seconds: a
    rank that died or hung makes the others raise RankLost instead of waiting forever.

    The gradient and parameter buffers move through _send, _recv and _bcast, which start an
    exchange, and _flush, which waits for the started ones (NCCLGroup moves them on the GPU)."""

    def __init__(self, comm, timeout):
        self.comm, self.rank, self.size, self.timeout = comm, comm.Get_rank(), comm.Get_size(), timeout

    def _send(self, buf, dest, tag):
        return self.comm.Isend(buf, dest=dest, tag=tag)

    def _recv(self, buf, source, tag):
        return self.comm.Irecv(buf, source=source, tag=tag)

    def _bcast(self, buf, root):
        return self.comm.Ibcast(buf, root=root)

    def _flush(self, started, what):
        self._wait(started, what)

    def ordered_sum(self, grads, layout=None):
        if self.rank == 0:
            total = sum_in_order(grads)
        else:
            total = [x.copy() for x in grads[0]]  # a buffer of each shape and dtype, overwritten
            self._flush([self._recv(t, self.rank - 1, i) for i, t in enumerate(total)],
                        f"the running gradient sum from rank {self.rank - 1}")
            total = sum_in_order([total] + grads)
        if self.rank < self.size - 1:
            self._flush([self._send(t, self.rank + 1, i) for i, t in enumerate(total)],
                        f"rank {self.rank + 1} to take the running gradient sum")
        last = self.size - 1
        if layout is None:
            self._flush([self._bcast(t, last) for t in total],  # the last rank's G to all
                        f"the step's gradient from rank {last}")
        elif self.rank == last:  # its pieces to the owners
            self._flush([self._send(total[i].reshape(-1)[a:b], q, k) for q, k, (i, a, b) in _numbered(layout)
                         if q != last], "every rank to take its shard of the step's gradient")
        else:
            self._flush([self._recv(total[i].reshape(-1)[a:b], last, k) for q, k, (i, a, b) in _numbered(layout)
                         if q == self.rank], f"this rank's shard of the step's gradient from rank {last}")
        return total

    def share(self, arrays, layout):
        self._flush([self._bcast(arrays[i].reshape(-1)[a:b], q) for q, _, (i, a, b) in _numbered(layout)],
                    "every rank's shard of the updated parameters")

    def collect(self, mine, layout, like):  # on the host: a checkpoint is written from there
        own = [k for q, k, _ in _numbered(layout) if q == self.rank]
        if self.rank != 0:
            self._wait([self.comm.Isend(backend.to_numpy(m), dest=0, tag=k) for m, k in zip(mine, own)],
                       "rank 0 to take this rank's shard of the optimizer state")
            return None
        whole = Single.collect(self, mine, layout, like)
        self._wait([self.comm.Irecv(whole[i].reshape(-1)[a:b], source=q, tag=k)
                    for q, k, (i, a, b) in _numbered(layout) if q != 0],
                   "every rank's shard of the optimizer state")
        return whole

    def gather(self, rows, per_rank, width):
        mine = numpy.full((per_rank, width + 1), numpy.nan)  # column 0: 1 for a row, NaN for padding
        if rows:
            mine[:len(rows), 0], mine[:len(rows), 1:] = 1.0, rows
        every = numpy.empty((self.size, per_rank, mine.shape[1]))
        self._wait([self.comm.Iallgather(mine, every)], "every rank's losses")
        return [tuple(float(v) for v in row[1:]) for row in every.reshape(-1, mine.shape[1]) if row[0] == 1.0]

    def _wait(self, requests, what):
        from mpi4py import MPI

        self._poll(lambda: MPI.Request.Testall(requests), what)

    def _poll(self, done, what):
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                raise RankLost(f"rank {self.rank}: waited {self.timeout:g} s for {what}: that rank died or hung "
                               "(--dist-timeout)")
            time.sleep(0.001)


class NCCLGroup(MPIGroup):
    """--device cuda under mpiexec: one GPU per rank. The gradient chain, ZeRO-1's scatter and the
    parameter broadcasts move device to device through NCCL (`nccl`: cupy.cuda.nccl), on the
    stream the step's kernels run on: the same chain in the same order, so the same bits. The
    small host exchanges (the losses, the norm's slice sums, a checkpoint's optimizer shards) stay
    on MPI. NCCL's unique id is made on rank 0 and broadcast over MPI.

    NCCL matches the messages between two ranks in the order they were posted (no tags): the
    chain posts them in parameter order on both sides. The started calls of one exchange go in
    one NCCL group; the stream is then polled against the timeout, and on expiry the NCCL
    communicator is aborted (its kernels would wait forever) before RankLost is raised."""

    def __init__(self, comm, timeout, nccl, stream):
        super().__init__(comm, timeout)
        self.nccl, self.stream = nccl, stream
        unique_id = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.communicator = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _call(self, method, buf, peer):
        address = gpu.address(buf)  # CuPy; NumPy: tests' stand-in
        return lambda: method(address, buf.size, self.types[buf.dtype.name], peer, self.stream.ptr)

    def _send(self, buf, dest, tag):
        return self._call(self.communicator.send, buf, dest)

    def _recv(self, buf, source, tag):
        return self._call(self.communicator.recv, buf, source)

    def _bcast(self, buf, root):
        return self._call(self.communicator.bcast, buf, root)

    def _flush(self, started, what):
        self.nccl.groupStart()
        for call in started:
            call()
        self.nccl.groupEnd()
        try:
            self._poll(lambda: self.stream.done, what)
        except RankLost:
            self.communicator.abort()
            raise


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


def world(timeout, device="cpu"):
    """The process group this process belongs to: under mpiexec -n N > 1, MPI's world (waits
    bounded by `timeout` seconds), with NCCL for --device cuda (this rank's GPU chosen: the
    rank's index among the ranks of its node); else Single."""
    if not launched_by_mpi():
        return Single()
    try:
        from mpi4py import MPI
    except ImportError:
        raise InputError("started by mpiexec with several ranks, but mpi4py is not installed: "
                         "pip install 'minitrain[dist]'") from None
    if device != "cuda":
        return MPIGroup(MPI.COMM_WORLD, timeout)
    import cupy
    from cupy.cuda import nccl

    if not nccl.available:
        raise InputError("--device cuda with several ranks moves the gradients over NCCL, which CuPy cannot load: "
                         "pip install nvidia-nccl-cu12 (CUDA 12) or nvidia-nccl-cu13 (CUDA 13)")
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    gpus = cupy.cuda.runtime.getDeviceCount()
    if node.Get_size() > gpus:
        raise InputError(f"--device cuda: {node.Get_size()} ranks on this node, {gpus} GPU(s): one GPU per rank "
                         f"(mpiexec -n {gpus} per node)")
    cupy.cuda.Device(node.Get_rank()).use()
    return NCCLGroup(MPI.COMM_WORLD, timeout, nccl, cupy.cuda.get_current_stream())
