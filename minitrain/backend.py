"""The one place that chooses the array module and the dtype policy.

Model and op code never import numpy or cupy for array work: they use ``backend.xp``.
`use("cpu")` (the default) makes ``xp`` NumPy; `use("cuda")` makes it CuPy, imported only then,
so everything imports and runs with CuPy absent.

Dtype policy: parameters and activations are created in ``backend.dtype`` -- float32 for
training, float64 for gradient checks (`precision("fp64")`). Ops keep the dtype of their inputs
and accumulate statistics (RMSNorm mean square, softmax sums) in at least float32: see
`acc_dtype`. Mixed precision (`set_dtype("bf16")`, ``backend.bf16``): parameters, their
gradients and the optimizer stay float32; activations are bfloat16, stored as their 16 raw bits
(``BF16`` = uint16, since NumPy and CuPy have no bfloat16 type), and only the CUDA kernels and
the bf16 matmul compute on them.
"""

import ctypes
import sys
from contextlib import contextmanager

import numpy

xp = numpy
dtype = numpy.dtype(numpy.float32)
# The CUDA kernels' launcher (minitrain.gpu.runtime.launch on the GPU; the tests plug in the CPU
# emulation of the same kernels), or None for the NumPy/CuPy reference ops. Ops call kernels(...)
# to know which path to take.
launch = None
MATMUL_BACKWARD = ("cublas", "kernels")
matmul_backward = "cublas"  # the linear layer's backward on the GPU: xp.matmul or kernels/matmul_backward.cu

DTYPES = {"fp32": numpy.dtype(numpy.float32), "fp64": numpy.dtype(numpy.float64)}
PRECISIONS = (*DTYPES, "bf16")  # the names set_dtype (and --dtype) accepts
BF16 = numpy.dtype(numpy.uint16)  # bfloat16 storage: the top 16 bits of a float32
bf16 = False  # activations in bf16 (set_dtype("bf16")); parameters stay in `dtype`, float32


def use(device: str) -> None:
    """Choose the array module once, before any array is made: 'cpu' or 'cuda' (CuPy arrays and
    the CUDA kernels of kernels/)."""
    global xp, launch
    if device == "cpu":
        xp, launch = numpy, None
    elif device == "cuda":
        try:
            import cupy
        except ImportError as e:
            raise RuntimeError("--device cuda needs CuPy: pip install 'minitrain[gpu]' (CUDA 12) or "
                               "'minitrain[gpu-cuda13]' (CUDA 13)") from e
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("--device cuda: CuPy is installed but sees no CUDA device")
        from minitrain.gpu.runtime import launch as gpu_launch

        xp, launch = cupy, gpu_launch
    else:
        raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def set_dtype(name: str) -> None:
    """Set the dtype new parameters and inputs are created in: 'fp32' or 'fp64'; or 'bf16':
    float32 parameters with bf16 activations (mixed precision, on the CUDA kernels)."""
    global dtype, bf16
    if name not in PRECISIONS:
        raise ValueError(f"unknown dtype {name!r}: expected one of {list(PRECISIONS)}")
    dtype, bf16 = DTYPES.get(name, DTYPES["fp32"]), name == "bf16"


@contextmanager
def precision(name: str):
    """Temporarily create arrays in another dtype (gradient checks run in 'fp64')."""
    saved = dtype, bf16
    set_dtype(name)
    try:
        yield
    finally:
        globals()["dtype"], globals()["bf16"] = saved


def _cast_kernels():
    """minitrain.gpu.cast where the casts run as kernels/cast.cu (on the GPU: one pass each instead
    of about 11 generated CuPy kernels), else None (NumPy: the expressions below, which the
    kernels match bit for bit)."""
    if xp is numpy or launch is None:
        return None
    from minitrain.gpu import cast

    return cast


def to_bf16(a):
    """float32 -> bf16 bits (uint16), rounded to nearest even, NaN kept a quiet NaN: the same
    rounding as the kernels' store() in kernels/common.cuh."""
    x = xp.ascontiguousarray(a, dtype=xp.float32)
    if cast := _cast_kernels():
        out = xp.empty(x.shape, dtype=BF16)
        cast.to_bf16(launch, x, out)
        return out
    u = x.view(xp.uint32)
    rounded = (u + xp.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16
    return xp.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, rounded).astype(xp.uint16)


def from_bf16(b):
    """bf16 bits (uint16) -> float32, exactly (a bf16 is the top half of a float32)."""
    if cast := _cast_kernels():
        x, out = xp.ascontiguousarray(b), xp.empty(b.shape, dtype=xp.float32)
        cast.from_bf16(launch, x, out)
        return out
    return (b.astype(xp.uint32) << 16).view(xp.float32)


def add_bf16(a, b, out=None):
    """a + b for bf16 bits: widened, added in fp32, rounded once (never an integer sum of bits);
    into `out` when given (it may be a: an accumulation in place). On the GPU one kernel pass;
    operands of different shapes are broadcast first."""
    if cast := _cast_kernels():
        if a.shape != b.shape or not (a.flags.c_contiguous and b.flags.c_contiguous):
            a, b = (xp.ascontiguousarray(x) for x in xp.broadcast_arrays(a, b))
        if out is None:
            out = xp.empty(a.shape, dtype=BF16)
        elif out.shape != a.shape or not out.flags.c_contiguous:
            raise ValueError(f"add_bf16: out must be C-contiguous {tuple(a.shape)}; found {tuple(out.shape)}")
        cast.add_bf16(launch, a, b, out)
        return out
    s = to_bf16(from_bf16(a) + from_bf16(b))
    if out is None:
        return s
    out[...] = s
    return out


def add_bias_bf16(acc, b):
    """acc (..., cols) float32 + b (cols,) float32, rounded once to bf16 bits (a bf16 linear's
    output with its bias); on the GPU one kernel pass."""
    if cast := _cast_kernels():
        out = xp.empty(acc.shape, dtype=BF16)
        cast.add_bias(launch, xp.ascontiguousarray(acc), xp.ascontiguousarray(b), out)
        return out
    return to_bf16(acc + b)


def acc_dtype(dt) -> "numpy.dtype":
    """Accumulation dtype for reductions over an array of dtype `dt`: at least float32."""
    return numpy.dtype(numpy.float64) if numpy.dtype(dt) == numpy.float64 else numpy.dtype(numpy.float32)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of giving it back to the kernel.

    A training step allocates and frees the same activation and gradient arrays every step. By
    default glibc serves blocks over 128 KiB (a threshold that adapts, up to 32 MiB) with a fresh
    mmap and unmaps them on free, and trims the heap's free top: the next step gets new pages
    again, and the kernel zero-fills every one on first touch. On this project's 2-core VM that
    was ~210 000 page faults and ~2.5 s of system time per llama-370m step (tools/bench_cpu.py,
    docs/performance.md). With the threshold at its maximum and trimming off, freed blocks stay
    in the heap and the next step reuses them; peak memory is unchanged (the high-water mark is
    the same), the process just does not shrink after it. A no-op where malloc is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


keep_freed_memory()  # NumPy is the default module; CuPy has its own memory pool for device arrays


def asarray(a, dt=None):
    """`a` as an array of the chosen module, in `dt` (default: the policy dtype)."""
    return xp.asarray(a, dtype=dtype if dt is None else dt)


def to_numpy(a):
    """A host (NumPy) copy of an array of either module."""
    return a.get() if hasattr(a, "get") and xp is not numpy else numpy.asarray(a)


def host_value(a):
    """float(a) where reading it costs nothing (a host array or number); None for a device array,
    whose value only a device-to-host transfer could tell."""
    return None if hasattr(a, "get") and xp is not numpy else float(a)


def kernels(*arrays):
    """The kernel launcher when the CUDA kernels should run on these arrays (all float32 or bf16
    bits), else None: the reference ops handle every other case (float64 checks, a CPU run).
    bf16 arrays have no reference path: without the kernels they are an error, not a silent
    integer computation."""
    if launch is None:
        if any(a.dtype == BF16 for a in arrays):
            raise RuntimeError("bf16 activations run only on the CUDA kernels (--device cuda)")
        return None
    if any(a.dtype not in (numpy.float32, BF16) for a in arrays):
        return None
    return launch


def route(arrays, plain, blocked=None, kernel=None, half=None):
    """The one place that chooses how an op runs on its input arrays (Tensors or arrays). Each op
    module writes its math first, as a Function (`plain`), and each other way of computing the same
    thing as a subclass of it; this picks, first match:
        kernel    the CUDA kernels take the arrays (kernels(): --device cuda, or the tests' CPU
                  emulation of kernels/*.cu)
        half      bf16 activations without a kernel of their own (cuBLAS GemmEx; NumPy on the CPU)
        blocked   NumPy in fp32 or fp64: the plain math's operations, a block at a time on every core
        plain     everything else (CuPy without the kernels, fp16 on the CPU)
    """
    if kernel is not None and kernels(*arrays):
        return kernel
    if half is not None and any(a.dtype == BF16 for a in arrays):
        return half
    if blocked is not None and xp is numpy and all(a.dtype in DTYPES.values() for a in arrays):
        return blocked
    return plain


def aligned_empty(n, dt, alignment=64):
    """An uninitialized 1-D array whose data starts on an `alignment`-byte boundary. NumPy's SIMD
    reductions sum in an order that depends on where the data starts; a fixed alignment makes such
    a sum give the same bits in every run (CuPy's allocations are always 256-byte aligned)."""
    dt = numpy.dtype(dt)
    if xp is not numpy:
        return xp.empty(n, dtype=dt)
    buf = numpy.empty(n + alignment // dt.itemsize, dtype=dt)
    start = (-buf.ctypes.data % alignment) // dt.itemsize
    return buf[start:start + n]
