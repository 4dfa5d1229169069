"""Launching kernels/swiglu.cu: y = silu(a) * u and its backward, elementwise; a and u as two
arrays, or packed side by side in the rows of one (the gate|up output of one GEMM)."""

from minitrain.gpu import BLOCK, elementwise_grid, suffix


def forward(launch, a, u, y):
    launch("swiglu", f"swiglu_forward_{suffix(a)}", elementwise_grid(a.size), (BLOCK,), (a, u, y, a.size))


def backward(launch, dy, a, u, da, du):
    launch("swiglu", f"swiglu_backward_{suffix(a)}", elementwise_grid(a.size), (BLOCK,), (dy, a, u, da, du, a.size))


def _packed(gu, y):
    I = gu.shape[-1] // 2
    if gu.shape[-1] != 2 * I or y.shape != gu.shape[:-1] + (I,):
        raise ValueError(f"packed swiglu kernel: gu (..., 2 I) and y (..., I); found gu {tuple(gu.shape)}, "
                         f"y {tuple(y.shape)}")
    return I


def packed_forward(launch, gu, y):
    """y (..., I) = silu(a) * u for gu (..., 2 I) = [a | u] in each row."""
    I = _packed(gu, y)
    launch("swiglu", f"swiglu_packed_forward_{suffix(gu)}", elementwise_grid(y.size), (BLOCK,), (gu, y, y.size, I))


def packed_backward(launch, dy, gu, dgu):
    """dgu (like gu) = [da | du] in each row."""
    I = _packed(gu, dy)
    launch("swiglu", f"swiglu_packed_backward_{suffix(gu)}", elementwise_grid(dy.size), (BLOCK,),
           (dy, gu, dgu, dy.size, I))
