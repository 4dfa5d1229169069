"""The single-GPU NCCL path, for real (tools/gpu_check.sh runs it on a lent GPU): dist.NCCLGroup
over a one-rank NCCL communicator (cupy.cuda.nccl, its unique id through mpi4py's one-process
world) must move the bytes dist.Single gives, in every exchange of a step (the chain with
grad-accum 2, ZeRO-1's scatter, the parameter broadcast, the optimizer-state collection), in
float32 and float64. Several GPUs (NCCL refuses two ranks on one GPU) are not checked here:
tests/test_dist.py runs the same exchanges with 2 and 4 CPU ranks through a stand-in for NCCL."""

import sys
from pathlib import Path

import cupy
import numpy
from cupy.cuda import nccl
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nccl_standin import exchanges  # noqa: E402

from minitrain import backend, dist  # noqa: E402

TIMEOUT = 20.0  # seconds NCCLGroup waits on a stalled exchange: under gpu_check.sh's cap, so its diagnostic is what shows


def main():
    backend.use("cuda")
    group = dist.NCCLGroup(MPI.COMM_WORLD, TIMEOUT, nccl, cupy.cuda.get_current_stream())
    for dtype in (numpy.float32, numpy.float64):
        same = exchanges(group, 0, dtype, cupy) == exchanges(dist.Single(), 0, dtype, cupy)
        print(f"NCCL {nccl.get_version()}, one rank, {numpy.dtype(dtype).name}: "
              f"{'the bytes of dist.Single' if same else 'DIFFERENT bytes from dist.Single'}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
