"""Launching kernels/*.cu with CuPy: each source compiled once per process (NVRTC, via
cupy.RawModule) and each of its extern "C" kernels looked up once. Imported only on the GPU path.

Two facts of CuPy's compilation (CuPy 14): it appends `-ftz=true` after our options, so the
kernels flush fp32 subnormals to zero (a bit-for-bit claim against NumPy, AdamW's, holds for
normal numbers); and its on-disk cache is keyed by the source text and options, not by the
headers the source includes, so the options carry a hash of kernels/*.cuh: editing common.cuh
compiles every kernel again instead of reusing a stale binary.
"""

import functools
import hashlib
from pathlib import Path

import numpy

KERNELS = Path(__file__).resolve().parent.parent.parent / "kernels"


def headers_digest():
    """A hash of every header the kernels may include (kernels/*.cuh)."""
    digest = hashlib.sha256()
    for header in sorted(KERNELS.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()[:16]


def options():
    """NVRTC options: C++17, kernels/ on the include path, and the headers' hash as a macro."""
    return ("-std=c++17", f"--include-path={KERNELS}", f"-DMINITRAIN_HEADERS={headers_digest()}")


@functools.lru_cache(maxsize=None)
def _module(source):
    import cupy

    return cupy.RawModule(code=(KERNELS / f"{source}.cu").read_text(), options=options())


@functools.lru_cache(maxsize=None)
def _function(source, kernel):
    return _module(source).get_function(kernel)


def _arg(a):
    if isinstance(a, (bool, numpy.bool_)):
        raise TypeError("pass flags as ints")
    if isinstance(a, (int, numpy.integer)):
        return numpy.int64(a)  # C long
    if isinstance(a, (float, numpy.floating)):
        return numpy.float32(a)
    return a  # a cupy array


def launch(source, kernel, grid, block, args):
    _function(source, kernel)(tuple(grid), tuple(block), tuple(_arg(a) for a in args))
