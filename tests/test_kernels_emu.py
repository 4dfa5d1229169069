"""Every CUDA kernel, run on the CPU through kernels/cuda_emu.h, against a NumPy float64
reference on awkward sizes, with both thread schedules (forward and reverse order)."""

import numpy as np
import pytest

from kernel_emu import launch, launcher, library

from minitrain.backend import from_bf16, to_bf16
from minitrain.gpu import swiglu

SCHEDULES = [False, True]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_swiglu_forward_and_backward(dtype, reverse):
    lib = library("swiglu")
    n = 1000 + 7  # not a multiple of the block, nor of the grid's stride
    rng = np.random.default_rng(0)
    a, u, dy = (rng.standard_normal(n).astype(np.float32) * 3 for _ in range(3))
    if dtype == "bf16":
        a, u, dy = (from_bf16(to_bf16(x)) for x in (a, u, dy))  # exactly representable inputs
        enc, dec, tol = to_bf16, from_bf16, 8e-3
    else:
        enc, dec, tol = (lambda x: x), (lambda x: x), 2e-6
    y, da, du = (np.zeros(n, np.uint16 if dtype == "bf16" else np.float32) for _ in range(3))
    swiglu.forward(launcher(reverse), enc(a), enc(u), y)  # the GPU path's own launch configuration
    launch(lib, f"swiglu_backward_{dtype}", (2,), (96,), (enc(dy), enc(a), enc(u), da, du, n), reverse)  # and another
    a64, u64, g64 = (x.astype(np.float64) for x in (a, u, dy))
    s = sigmoid(a64)
    for got, want in ((y, a64 * s * u64), (da, g64 * u64 * s * (1 + a64 * (1 - s))), (du, g64 * a64 * s)):
        np.testing.assert_allclose(dec(got), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_swiglu_packed_is_the_separate_kernel(dtype, reverse):
    """gate|up packed in the rows of one array (one GEMM's output): the bits of the kernels on
    separate a and u, and the gradient packed the same way; a planted row stride of I (not 2 I)
    must fail."""
    rows, I = 7, 45
    rng = np.random.default_rng(1)
    enc = to_bf16 if dtype == "bf16" else (lambda x: x)
    gu, dy = (enc((rng.standard_normal(shape) * 3).astype(np.float32)) for shape in ((rows, 2 * I), (rows, I)))
    a, u = np.ascontiguousarray(gu[:, :I]), np.ascontiguousarray(gu[:, I:])
    y, da, du = (np.zeros((rows, I), gu.dtype) for _ in range(3))
    swiglu.forward(launcher(reverse), a, u, y)
    swiglu.backward(launcher(reverse), dy, a, u, da, du)
    y_packed, dgu = np.zeros_like(y), np.zeros_like(gu)
    swiglu.packed_forward(launcher(reverse), gu, y_packed)
    swiglu.packed_backward(launcher(reverse), dy, gu, dgu)
    assert y_packed.tobytes() == y.tobytes() and dgu.tobytes() == np.concatenate([da, du], axis=1).tobytes()
    swiglu.packed_forward(launcher(plant=("swiglu_forward(gu, gu + I, y, n, I, 2 * I)",
                                          "swiglu_forward(gu, gu + I, y, n, I, I)")), gu, y_packed)
    assert y_packed.tobytes() != y.tobytes()
