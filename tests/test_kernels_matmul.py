"""kernels/matmul_backward.cu on the CPU (kernels/cuda_emu.h), launched by minitrain.gpu.matmul:
dX = G W, dW += G^T X, db += column sums of G against NumPy float64, on sizes that are not
multiples of the tiles, fp32 and bf16 inputs, both thread schedules; and planted bugs that the
comparison must catch.

Every array sits at the front of a longer buffer: inputs are followed by NaN, so that any read
past an input's end poisons the result, and outputs by a sentinel that must survive, so that any
write past an output's end is seen."""

import numpy as np
import pytest

from kernel_emu import launcher

from minitrain.backend import from_bf16, to_bf16
from minitrain.gpu import matmul

SCHEDULES = [False, True]
# (leading dims of G and X, in, out), N their product. Tiles are 64 x 64 with K slices of 16:
# the sizes mostly leave remainders (130 x 64 x 96 has exact multiples too), and the last two
# span several tiles along the rows (N = 130, out = 96) and the columns (in = 70) of dX and dW.
CASES = [((37,), 45, 61), ((1,), 7, 3), ((2, 65), 64, 96), ((20,), 70, 66)]
GUARD = 4096  # > 16 rows (a whole K slice) of the widest operand
SENTINEL = 7.0


def guarded(a, fill):
    buf = np.full(a.size + GUARD, fill, a.dtype)
    buf[: a.size] = a.ravel()
    return buf[: a.size].reshape(a.shape)  # C-contiguous, the guard right after it


def guard_intact(a, fill):
    return bool(np.all(a.base[a.size :] == fill))


def backward(launch, case, dtype, seed=0):
    """Run the three kernels on random inputs; [(name, result, float64 reference, rtol)] and
    whether every output's guard is intact."""
    lead, n_in, n_out = case
    rng = np.random.default_rng(seed)
    g, x, w = (rng.standard_normal(shape).astype(np.float32)
               for shape in (lead + (n_out,), lead + (n_in,), (n_out, n_in)))
    dw0, db0 = rng.standard_normal((n_out, n_in)).astype(np.float32), rng.standard_normal(n_out).astype(np.float32)
    if dtype == "bf16":
        g, x, w = (from_bf16(to_bf16(a)).reshape(a.shape) for a in (g, x, w))  # exactly representable
        enc, dec, nan, dx_rtol = to_bf16, from_bf16, np.uint16(0x7FC0), 1e-2
    else:
        enc, dec, nan, dx_rtol = (lambda a: a), (lambda a: a), np.float32("nan"), 1e-5
    sentinel = enc(np.float32(SENTINEL))
    G, X, W = (guarded(enc(a).reshape(a.shape), nan) for a in (g, x, w))
    dx = guarded(np.zeros(x.shape, G.dtype), sentinel)
    dw, db = guarded(dw0, np.float32(SENTINEL)), guarded(db0, np.float32(SENTINEL))

    matmul.grad_input(launch, G, W, dx)
    matmul.grad_weight(launch, G, X, dw)
    matmul.grad_bias(launch, G, db)

    g2, x2 = g.reshape(-1, n_out).astype(np.float64), x.reshape(-1, n_in).astype(np.float64)  # (N, out), (N, in)
    results = [("dX", dec(dx).reshape(x.shape), (g2 @ w.astype(np.float64)).reshape(x.shape), dx_rtol),
               ("dW", dw, dw0 + g2.T @ x2, 1e-5),  # accumulated onto the non-zero dW0, db0
               ("db", db, db0 + g2.sum(axis=0), 1e-5)]
    return results, guard_intact(dx, sentinel) and guard_intact(dw, SENTINEL) and guard_intact(db, SENTINEL)


def close(got, want, rtol):
    return np.allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0] + c[1:])))
def test_matmul_backward(case, dtype, reverse):
    results, guards = backward(launcher(reverse), case, dtype)
    for name, got, want, rtol in results:
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
    assert guards, "a kernel wrote past the end of an output"


def test_repeated_accumulation_is_a_sum():
    """Two micro-batches (or a weight used twice) accumulate into one dW and db."""
    run = launcher()
    rng = np.random.default_rng(1)
    g1, g2 = rng.standard_normal((2, 29, 19)).astype(np.float32)
    x1, x2 = rng.standard_normal((2, 29, 23)).astype(np.float32)
    dw, db = np.zeros((19, 23), np.float32), np.zeros(19, np.float32)
    for g, x in ((g1, x1), (g2, x2)):
        matmul.grad_weight(run, g, x, dw)
        matmul.grad_bias(run, g, db)
    g64, x64 = np.concatenate([g1, g2]).astype(np.float64), np.concatenate([x1, x2]).astype(np.float64)
    np.testing.assert_allclose(dw, g64.T @ x64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, g64.sum(axis=0), rtol=1e-5, atol=1e-5)


def test_accumulators_must_be_float32():
    g = np.zeros((4, 3), np.uint16)
    with pytest.raises(TypeError, match="dW must be a float32 accumulator, found uint16"):
        matmul.grad_weight(launcher(), g, np.zeros((4, 5), np.uint16), np.zeros((3, 5), np.uint16))


# bug: (source text, its replacement, the schedules that must catch it). A missing barrier before
# the bias partial sums are combined shows only when the combining row group runs first.
PLANTED = {
    "no barrier after loading a slice": ("__syncthreads();  // the slice is loaded", "", SCHEDULES),
    "no barrier before the next slice overwrites":
        ("__syncthreads();  // every thread is done with the slice before the next one overwrites it", "", SCHEDULES),
    "K bound off by one": ("k < depth ? to_f32(*p)", "k <= depth ? to_f32(*p)", SCHEDULES),
    "K bound off by one in the transposed load": ("k + 8 < depth", "k + 8 <= depth", SCHEDULES),
    "no bound check on the K remainder": ("t < rows && k < depth ? to_f32(*p)", "t < rows ? to_f32(*p)", SCHEDULES),
    "output row bound off by one": ("row < M && col < P", "row <= M && col < P", SCHEDULES),
    "dW overwritten, not accumulated": ("C[row * P + col] += acc[i][j]", "C[row * P + col] = acc[i][j]", SCHEDULES),
    "db overwritten, not accumulated": ("db[c] += sum;", "db[c] = sum;", SCHEDULES),
    "no barrier in the bias reduction": ("__syncthreads();  // every row group's partial sum is in", "", [False]),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_planted_bug_is_caught(bug):
    old, new, schedules = PLANTED[bug]
    for reverse in schedules:
        results, guards = backward(launcher(reverse, plant=(old, new)), CASES[0], "f32")
        caught = not (guards and all(close(got, want, rtol) for _, got, want, rtol in results))
        assert caught, f"{bug} not caught with reverse={reverse}"
