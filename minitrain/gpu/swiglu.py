"""Launching kernels/swiglu.cu: y = silu(a) * u and its backward, elementwise."""

BLOCK = 256
MAX_BLOCKS = 4096  # a grid-stride loop covers the rest


def suffix(a):
    """Kernel name suffix for an array's element type: float32 or bf16 bits (uint16)."""
    return {"float32": "f32", "uint16": "bf16"}[a.dtype.name]


def _grid(n):
    return (max(1, min(MAX_BLOCKS, -(-n // BLOCK))),)


def forward(launch, a, u, y):
    launch("swiglu", f"swiglu_forward_{suffix(a)}", _grid(a.size), (BLOCK,), (a, u, y, a.size))


def backward(launch, dy, a, u, da, du):
    launch("swiglu", f"swiglu_backward_{suffix(a)}", _grid(a.size), (BLOCK,), (dy, a, u, da, du, a.size))
