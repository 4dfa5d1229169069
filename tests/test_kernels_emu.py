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
