"""The GPU path: raw CUDA kernels (kernels/*.cu) and how to launch them.

Each topic module (swiglu.py, ...) holds backend-agnostic launch functions: given arrays, they
choose the kernel variant, the grid and the block, and call a `launch(source, kernel, grid,
block, args)` callable. runtime.py provides that callable for CuPy (cupy.RawModule, compiled once
and cached); the tests provide one that runs the same kernels on the CPU through
kernels/cuda_emu.h. So the launch configuration the GPU uses is the one the CPU tests check.

Argument conventions for every kernel: arrays are C-contiguous device arrays (float32, or
bfloat16 stored as uint16 raw bits), integers are C `long`, floats are C `float`.
"""

BLOCK = 256  # threads per block of the elementwise kernels
MAX_BLOCKS = 4096  # their grid-stride loops cover the rest


def suffix(a):
    """Kernel name suffix for an array's element type: float32, or bf16 bits (uint16)."""
    return {"float32": "f32", "uint16": "bf16"}[a.dtype.name]


def warps(n, most):
    """n threads rounded up to whole warps, between one warp and `most` threads."""
    return min(most, max(32, -(-n // 32) * 32))


def address(a):
    """Where an array's data starts: a CuPy array's device pointer, or a NumPy array's (the tests'
    CPU stand-ins for the device)."""
    return a.data.ptr if hasattr(a.data, "ptr") else a.ctypes.data


def elementwise_grid(n):
    """The grid of an elementwise kernel over n items."""
    return (max(1, min(MAX_BLOCKS, -(-n // BLOCK))),)
