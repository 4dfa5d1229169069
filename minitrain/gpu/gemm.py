"""C = A @ B on bf16 operands with fp32 accumulation: the matmuls of mixed precision.

On the GPU this is cuBLAS GemmEx (bf16 inputs, fp32 compute: tensor cores), called directly
because CuPy has no bfloat16 array type. Anywhere else (the CPU, where the tests drive the
kernel path through the emulation) it is the same product in NumPy: both operands widened to
fp32 exactly, multiplied in fp32, the result rounded once.

A and B are 2-D bf16 arrays (uint16 bits), each C-contiguous or the transpose of a C-contiguous
array (so `W.T` needs no copy); C is float32, or bf16 rounded to nearest even.
"""

import numpy

from minitrain import backend

# cuBLAS / CUDA enums (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_R_32F, _R_16BF = 0, 14
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1


def matmul(a, b, out_dtype, out=None):
    """a (M, K) @ b (K, N) -> (M, N) in out_dtype (float32 or backend.BF16); written into `out`
    (C-contiguous, (M, N), out_dtype) when given: a row block of a bigger array takes the product
    without a copy."""
    _check(a, b)
    if out is not None and (out.shape != (a.shape[0], b.shape[1]) or out.dtype != out_dtype
                            or not out.flags.c_contiguous):
        raise ValueError(f"bf16 matmul: out must be C-contiguous {numpy.dtype(out_dtype).name} "
                         f"{(a.shape[0], b.shape[1])}; found {out.dtype.name} {tuple(out.shape)}")
    if backend.xp is numpy:
        c = backend.from_bf16(a) @ backend.from_bf16(b)  # exact widening, fp32 products and sums
        c = c if out_dtype == numpy.float32 else backend.to_bf16(c)
        if out is None:
            return c
        out[...] = c
        return out
    return _gemm_ex(a, b, backend.xp.empty((a.shape[0], b.shape[1]), dtype=out_dtype) if out is None else out, 0.0)


def matmul_add(a, b, c):
    """c (M, N) float32 += a (M, K) @ b (K, N): the sum accumulated by the GEMM itself (beta = 1),
    no product-sized temporary and no separate add (the head's dW over its row chunks)."""
    _check(a, b)
    if c.shape != (a.shape[0], b.shape[1]) or c.dtype != numpy.float32 or not c.flags.c_contiguous:
        raise ValueError(f"bf16 matmul_add: c must be C-contiguous float32 {(a.shape[0], b.shape[1])}; "
                         f"found {c.dtype.name} {tuple(c.shape)}")
    if backend.xp is numpy:
        c += backend.from_bf16(a) @ backend.from_bf16(b)
        return c
    return _gemm_ex(a, b, c, 1.0)


def _check(a, b):
    if a.dtype != backend.BF16 or b.dtype != backend.BF16 or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"bf16 matmul: needs 2-D bf16 operands (M, K) @ (K, N); found {a.dtype.name} "
                         f"{tuple(a.shape)} @ {b.dtype.name} {tuple(b.shape)}")


def _layout(x):
    """(cuBLAS op, leading dimension) that reads the row-major matrix x as its column-major transpose."""
    if x.flags.c_contiguous:
        return _OP_N, x.shape[1]
    if x.T.flags.c_contiguous:
        return _OP_T, x.shape[0]
    raise ValueError(f"bf16 matmul: operand of strides {x.strides} is neither C-contiguous nor a transpose of one")


def _gemm_ex(a, b, c, beta):
    """c = a b + beta c. Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets (B, A) with
    m = N, n = M."""
    import cupy
    from cupy.cuda import cublas

    (M, K), N = a.shape, b.shape[1]
    op_b, ld_b = _layout(b)
    op_a, ld_a = _layout(a)
    one, scale = numpy.ones(1, numpy.float32), numpy.full(1, beta, numpy.float32)  # fp32 compute: fp32 scalars
    cublas.gemmEx(cupy.cuda.device.get_cublas_handle(), op_b, op_a, N, M, K,
                  one.ctypes.data, b.data.ptr, _R_16BF, ld_b, a.data.ptr, _R_16BF, ld_a,
                  scale.ctypes.data, c.data.ptr, _R_32F if c.dtype == numpy.float32 else _R_16BF, N,
                  _COMPUTE_32F, _GEMM_DEFAULT)
    return c
