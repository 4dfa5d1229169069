"""A CPU stand-in for the part of cupy.cuda.nccl that dist.NCCLGroup calls, over MPI: as the
CUDA kernels run through their CPU emulation, NCCLGroup's chain, scatter and broadcasts run here
on NumPy buffers (addresses, counts and NCCL datatypes, as CuPy takes them) on CPU ranks.

What it holds NCCLGroup to: every call inside groupStart/groupEnd (it refuses any other), the
messages between two ranks matched in the order they were posted (NCCL has no tags), the unique
id the same on every rank, the datatype the buffer's. "The stream" is done when the group's MPI
requests are; abort() is recorded.

Run under mpiexec (tests/test_dist.py): `python tests/nccl_standin.py same-bits` checks that
NCCLGroup gives the bytes MPIGroup gives, for every exchange, with and without a ZeRO-1 layout;
`python tests/nccl_standin.py hang` has rank 1 never post: rank 0 must abort NCCL and raise
RankLost within the timeout.
"""

import ctypes
import sys
import time

import numpy
from mpi4py import MPI

from minitrain import dist
from minitrain.zero import layout


class Stream:
    ptr = 0

    def __init__(self):
        self.requests = []

    @property
    def done(self):
        return MPI.Request.Testall(self.requests)


class StandIn:
    NCCL_FLOAT32, NCCL_FLOAT64 = 7, 8
    TYPES = {7: numpy.float32, 8: numpy.float64}

    def __init__(self, comm, stream):
        self.comm, self.stream = comm, stream
        self.grouped, self.posted, self.aborted = None, {}, False

    def get_unique_id(self):
        return tuple(int(b) for b in numpy.random.default_rng().integers(-128, 128, 128))

    def NcclCommunicator(self, ranks, unique_id, rank):  # noqa: N802 -- CuPy's name
        assert ranks == self.comm.Get_size() and rank == self.comm.Get_rank()
        assert all(other == unique_id for other in self.comm.allgather(unique_id)), "unique ids differ"
        return self

    def groupStart(self):  # noqa: N802
        assert self.grouped is None, "groupStart inside a group"
        self.grouped = []

    def groupEnd(self):  # noqa: N802
        calls, self.grouped = self.grouped, None
        self.stream.requests = [call() for call in calls]

    def _buffer(self, address, count, datatype, stream):
        assert self.grouped is not None, "an NCCL call outside groupStart/groupEnd"
        assert stream == self.stream.ptr
        t = numpy.dtype(self.TYPES[datatype])
        return numpy.frombuffer((ctypes.c_byte * (count * t.itemsize)).from_address(address), t)

    def _order(self, kind, peer):
        """The k-th message of this kind to or from `peer`: the tag that pairs it as NCCL would."""
        k = self.posted[kind, peer] = self.posted.get((kind, peer), -1) + 1
        return k % 32768

    def send(self, address, count, datatype, peer, stream):
        buf, tag = self._buffer(address, count, datatype, stream), self._order("send", peer)
        self.grouped.append(lambda: self.comm.Isend(buf, dest=peer, tag=tag))

    def recv(self, address, count, datatype, peer, stream):
        buf, tag = self._buffer(address, count, datatype, stream), self._order("recv", peer)
        self.grouped.append(lambda: self.comm.Irecv(buf, source=peer, tag=tag))

    def bcast(self, address, count, datatype, root, stream):
        buf = self._buffer(address, count, datatype, stream)
        self.grouped.append(lambda: self.comm.Ibcast(buf, root=root))

    def abort(self):
        self.aborted = True


def exchanges(group, rank, dtype, xp=numpy):
    """Every exchange of a step on the same inputs (arrays of module xp); -> the bytes each
    produced on this rank. (tools/nccl_check.py runs it on a GPU with CuPy and the real NCCL.)"""
    shapes = [(70000,), (3, 5), (1,), (2, 65536)]
    rng = numpy.random.default_rng(rank)
    grads = [[xp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes] for _ in range(2)]  # this rank's A = 2
    owned = layout([int(numpy.prod(s)) for s in shapes], group.size)
    out = [t.tobytes() for t in group.ordered_sum([[g.copy() for g in m] for m in grads])]
    sharded = group.ordered_sum([[g.copy() for g in m] for m in grads], owned)
    out += [sharded[i].reshape(-1)[a:b].tobytes() for i, a, b in owned[rank]]  # only its own pieces are G
    params = [xp.full(s, rank, dtype) for s in shapes]
    group.share(params, owned)
    out += [p.tobytes() for p in params]
    whole = group.collect([xp.full(b - a, 10 * i + 1, dtype) for i, a, b in owned[rank]], owned, params)
    out += [w.tobytes() for w in whole] if whole is not None else []
    return out


def main(mode):
    comm = MPI.COMM_WORLD
    rank, stream = comm.Get_rank(), Stream()
    nccl = StandIn(comm, stream)
    group = dist.NCCLGroup(comm, 5.0, nccl, stream)
    if mode == "same-bits":
        for dtype in (numpy.float32, numpy.float64):
            assert exchanges(group, rank, dtype) == exchanges(dist.MPIGroup(comm, 5.0), rank, dtype), dtype
        comm.Barrier()
        print(f"rank {rank}: NCCLGroup == MPIGroup", flush=True)
    else:  # hang: rank 1 goes silent; rank 0 waits for its running sum and must give up
        group.timeout = 1.0
        if rank == 1:
            time.sleep(4.0)
            return
        start = time.monotonic()
        try:
            group.ordered_sum([[numpy.ones(4, numpy.float32)]])
        except dist.RankLost as e:
            print(f"rank {rank}: RankLost after {time.monotonic() - start:.1f} s, aborted={nccl.aborted}: {e}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
