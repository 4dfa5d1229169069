"""Launching kernels/swiglu.cu: y = silu(a) * u and its backward, elementwise."""

from minitrain.gpu import BLOCK, elementwise_grid, suffix


def forward(launch, a, u, y):
    launch("swiglu", f"swiglu_forward_{suffix(a)}", elementwise_grid(a.size), (BLOCK,), (a, u, y, a.size))


def backward(launch, dy, a, u, da, du):
    launch("swiglu", f"swiglu_backward_{suffix(a)}", elementwise_grid(a.size), (BLOCK,), (dy, a, u, da, du, a.size))
