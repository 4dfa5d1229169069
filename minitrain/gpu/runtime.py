"""Launching kernels/*.cu with CuPy: each source compiled once per process (NVRTC, via
cupy.RawModule) and its extern "C" kernels looked up by name. Imported only on the GPU path."""

import functools
from pathlib import Path

import numpy

KERNELS = Path(__file__).resolve().parent.parent.parent / "kernels"


@functools.lru_cache(maxsize=None)
def _module(source):
    import cupy

    path = KERNELS / f"{source}.cu"
    return cupy.RawModule(code=path.read_text(), options=("-std=c++17", f"--include-path={KERNELS}"),
                          name_expressions=None)


def _arg(a):
    if isinstance(a, (bool, numpy.bool_)):
        raise TypeError("pass flags as ints")
    if isinstance(a, (int, numpy.integer)):
        return numpy.int64(a)  # C long
    if isinstance(a, (float, numpy.floating)):
        return numpy.float32(a)
    return a  # a cupy array


def launch(source, kernel, grid, block, args):
    _module(source).get_function(kernel)(tuple(grid), tuple(block), tuple(_arg(a) for a in args))
