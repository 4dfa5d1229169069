"""The fused kernels (RMSNorm, RoPE, cross-entropy, AdamW, the gradient norm's sums of squares,
the embedding's backward, the bf16 casts), run on the CPU through
kernels/cuda_emu.h with minitrain.gpu.fused's own launch configurations, against NumPy float64
references on awkward sizes, in fp32 and bf16, with both thread schedules; AdamW against
minitrain.optim.AdamW itself. Each kernel also has a planted bug that must make its results wrong."""

import math

import numpy as np
import pytest

from kernel_emu import launcher

from minitrain.autograd import Tensor
from minitrain.backend import from_bf16, to_bf16
from minitrain.gpu import embedding, fused
from minitrain.ops.rope import rope, rope_tables
from minitrain.optim import AdamW

SCHEDULES = [False, True]


def codec(dtype):
    """(encode float32 -> kernel array, decode -> float32, storage dtype, relative tolerance)."""
    if dtype == "bf16":
        return to_bf16, from_bf16, np.uint16, 8e-3
    return (lambda x: x), (lambda x: x), np.float32, 1e-5


def inputs(rng, dtype, shape, scale=1.0, offset=0.0):
    """Random float32 values that the dtype represents exactly (so the reference sees the same)."""
    x = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
    return from_bf16(to_bf16(x)) if dtype == "bf16" else x


def close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# RMSNorm ------------------------------------------------------------------------------------------

EPS = 1e-6


def rmsnorm_reference(x, w, dy):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)
    xhat, dxhat = x * r, dy * w
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return xhat * w, r[:, 0], dx, (dy * xhat).sum(axis=0)


def run_rmsnorm(run, dtype, x, w, dy, dw, parts):
    enc, dec, store, _ = codec(dtype)
    rows, H = x.shape
    y, dx = np.zeros((rows, H), store), np.zeros((rows, H), store)
    r, dw = np.zeros(rows, np.float32), dw.copy()
    fused.rmsnorm_forward(run, enc(x), enc(w), y, r, EPS)
    partial = np.full((parts, H), np.nan, np.float32)  # scratch the kernel must overwrite entirely
    fused.rmsnorm_backward(run, enc(dy), enc(x), enc(w), r, dx, dw, partial)
    return dec(y), r, dec(dx), dw


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("H", [100, 896])
def test_rmsnorm(H, dtype, reverse):
    rows = 7
    rng = np.random.default_rng(H)
    x, dy = inputs(rng, dtype, (rows, H), 2.0), inputs(rng, dtype, (rows, H))
    w = inputs(rng, dtype, H, 0.2, 1.0)
    dw0 = rng.standard_normal(H).astype(np.float32)  # dw accumulates into what is there
    y_want, r_want, dx_want, dw_want = rmsnorm_reference(x, w, dy)
    tol = codec(dtype)[3]
    # the launch functions' own scratch size (one row per block), then fewer blocks than rows
    for parts in (fused.rmsnorm_parts(rows), 4):
        y, r, dx, dw = run_rmsnorm(launcher(reverse), dtype, x, w, dy, dw0, parts)
        close(y, y_want, tol)
        close(dx, dx_want, tol)
        np.testing.assert_allclose(r, r_want, rtol=2e-6)
        close(dw, dw0 + dw_want, 2e-6)


def test_rmsnorm_hidden_size_limit():
    with pytest.raises(ValueError, match="hidden size 8193 is over 8192"):
        fused.rmsnorm_forward(None, np.zeros((1, 8193), np.float32), None, None, None, EPS)


def test_rmsnorm_planted_missing_barrier():
    """Without the barrier in rmsnorm_dw_reduce, row 0 of the block sums its column before the
    other rows have written their partial sums (in forward thread order)."""
    rows, H = 13, 100
    rng = np.random.default_rng(1)
    x, dy, w = inputs(rng, "f32", (rows, H)), inputs(rng, "f32", (rows, H)), inputs(rng, "f32", H, 0.2, 1.0)
    dw0 = np.zeros(H, np.float32)
    *_, dw_want = rmsnorm_reference(x, w, dy)
    *_, dw = run_rmsnorm(launcher(plant=("__syncthreads();", "")), "f32", x, w, dy, dw0, rows)
    assert not np.allclose(dw, dw_want, rtol=1e-3, atol=1e-3)


# RoPE ---------------------------------------------------------------------------------------------

THETA = 10000.0


def rotate_reference(x, cos, sin):
    """x (B, T, nH, hd) rotated pairwise (i, i + hd/2) by the angles of cos, sin (T, hd/2), in float64."""
    half = x.shape[-1] // 2
    x = x.astype(np.float64)
    c, s = cos.astype(np.float64)[:, None, :], sin.astype(np.float64)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_case(dtype, seed=0):
    B, T, nH, hd = 2, 7, 3, 64  # T odd
    rng = np.random.default_rng(seed)
    cos, sin = (np.ascontiguousarray(t) for t in rope_tables(T, hd, THETA, np.dtype(np.float32)))
    return inputs(rng, dtype, (B, T, nH, hd)), inputs(rng, dtype, (B, T, nH, hd)), cos, sin


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_rope(dtype, reverse):
    enc, dec, store, tol = codec(dtype)
    x, dy, cos, sin = rope_case(dtype)
    y = np.zeros(x.shape, store)
    fused.rope_forward(launcher(reverse), enc(x), cos, sin, y)
    dx = enc(dy.copy())  # in place
    fused.rope_backward(launcher(reverse), dx, cos, sin, dx)
    close(dec(y), rotate_reference(x, cos, sin), tol)
    close(dec(dx), rotate_reference(dy, cos, -sin), tol)
    if dtype == "f32":  # the model's own op, on the same fp32 input
        close(dec(y), rope(Tensor(x), THETA).data, tol)


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_rope_with_each_rows_own_positions(reverse):
    """Tables of (B*T, hd/2) rows: row b's token t at its own position (left-padded prompts in
    the KV-cache decoder), against the model's op given the (B, T) positions."""
    x, _, _, _ = rope_case("f32")
    B, T, _, hd = x.shape
    positions = np.array([np.arange(T) + 40, np.arange(T) - 3])  # (B, T); negative: padding slots
    cos, sin = (np.ascontiguousarray(t.reshape(B * T, hd // 2))
                for t in rope_tables(T, hd, THETA, np.dtype(np.float32), positions))
    y = np.zeros(x.shape, np.float32)
    fused.rope_forward(launcher(reverse), x, cos, sin, y)
    close(y, rope(Tensor(x), THETA, positions).data, 1e-5)
    for b in range(B):  # and row by row, each against the reference at its positions
        cb, sb = rope_tables(T, hd, THETA, np.dtype(np.float32), positions[b])
        close(y[b:b + 1], rotate_reference(x[b:b + 1], cb, sb), 1e-5)


def test_rope_planted_backward_sign():
    x, dy, cos, sin = rope_case("f32")
    dx = np.zeros(dy.shape, np.float32)
    fused.rope_backward(launcher(plant=("-1.0f", "1.0f")), dy, cos, sin, dx)
    assert not np.allclose(dx, rotate_reference(dy, cos, -sin), rtol=1e-3, atol=1e-3)


# Cross-entropy ------------------------------------------------------------------------------------

def cross_entropy_reference(z, t, scale):
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
    rows = np.arange(len(t))
    dz = np.exp(z - lse[:, None])
    dz[rows, t] -= 1
    return lse - z[rows, t], lse, dz * scale


def run_cross_entropy(run, dtype, z, t, scale):
    """dtype f32 or bf16: logits and gradient in it, the gradient in place; f32_bf16: fp32 logits,
    the gradient written in bf16 (the bf16 head)."""
    enc, dec, _, _ = codec(dtype.split("_")[0])
    N = len(t)
    loss, lse, dz = np.zeros(N, np.float32), np.zeros(N, np.float32), enc(z).copy()
    fused.cross_entropy_forward(run, enc(z), t, loss, lse)
    if dtype == "f32_bf16":
        dz16 = np.zeros(z.shape, np.uint16)
        fused.cross_entropy_backward(run, dz, t, lse, dz16, scale)
        return loss, lse, from_bf16(dz16)
    fused.cross_entropy_backward(run, dz, t, lse, dz, scale)  # in place
    return loss, lse, dec(dz)


def check_cross_entropy(dtype, reverse, N, V, seed):
    rng = np.random.default_rng(seed)
    z = inputs(rng, dtype, (N, V), 3.0)
    z[1::2] = inputs(rng, dtype, z[1::2].shape, 3.0, 100.0)  # exp(100) overflows fp32: the max must go first
    t = rng.integers(0, V, N)
    t[0] = V - 1  # the last column
    scale = 0.7 / N
    loss, lse, dz = run_cross_entropy(launcher(reverse), dtype, z, t, scale)
    loss_want, lse_want, dz_want = cross_entropy_reference(z, t, scale)
    np.testing.assert_allclose(lse, lse_want, rtol=2e-6)
    np.testing.assert_allclose(loss, loss_want, atol=4e-6 * np.abs(lse_want).max())
    close(dz, dz_want, 2e-5 if dtype == "f32" else 8e-3)


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f32_bf16"])
def test_cross_entropy(dtype, reverse):
    check_cross_entropy(dtype, reverse, N=7, V=1000 + 3, seed=0)


@pytest.mark.parametrize("dtype, reverse", [("f32", False), ("bf16", True)])
def test_cross_entropy_qwen_vocabulary(dtype, reverse):
    check_cross_entropy(dtype, reverse, N=2, V=151936, seed=1)


def test_cross_entropy_bf16_gradient_is_the_rounded_fp32_one():
    """From fp32 logits the bf16 gradient is the fp32 kernel's gradient rounded once, bit for bit
    (one store, no second rounding on the way); a planted numeric conversion in place of the
    rounding to bf16 bits must fail."""
    rng = np.random.default_rng(4)
    z, t = inputs(rng, "f32", (5, 1003), 3.0), rng.integers(0, 1003, 5)
    want = to_bf16(run_cross_entropy(launcher(), "f32", z, t, 0.3)[2])
    got = run_cross_entropy(launcher(), "f32_bf16", z, t, 0.3)[2]
    assert to_bf16(got).tobytes() == want.tobytes()
    planted = run_cross_entropy(launcher(plant=("store(dlogits, row * V + v,", "dlogits[row * V + v] = D(")),
                                "f32_bf16", z, t, 0.3)[2]
    assert to_bf16(planted).tobytes() != want.tobytes()


def test_cross_entropy_planted_row_bound():
    """`j <= V` reads one logit past the row: the next row's first one (made large here; the
    buffer has a spare row, so the last row's over-read stays inside it)."""
    N, V = 5, 1003
    rng = np.random.default_rng(2)
    buf = inputs(rng, "f32", (N + 1, V))
    buf[:, 0] = 10.0
    z, t = buf[:N], rng.integers(0, V, N)
    loss, lse, _ = run_cross_entropy(launcher(plant=("j < V", "j <= V")), "f32", z, t, 1.0 / N)
    assert not np.allclose(lse, cross_entropy_reference(z, t, 1.0)[1], rtol=1e-3)


def test_cross_entropy_planted_no_max_subtraction():
    N, V = 3, 1003
    rng = np.random.default_rng(3)
    z, t = inputs(rng, "f32", (N, V), 3.0, 100.0), rng.integers(0, V, N)
    loss, lse, _ = run_cross_entropy(launcher(plant=("expf(zj - m)", "expf(zj)")), "f32", z, t, 1.0 / N)
    assert not np.allclose(lse, cross_entropy_reference(z, t, 1.0)[1], rtol=1e-3)


# AdamW --------------------------------------------------------------------------------------------

LR, BETAS, ADAM_EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


def run_adamw(run, copy, chunk=300):
    """Three steps of the kernel (one launch for both tensors, each in chunks of `chunk`) and of
    minitrain.optim.AdamW on the same weights and gradients: a matrix (decayed) and a vector (not
    decayed). Returns both sides' (p, m, v, bf16 copy) lists."""
    rng = np.random.default_rng(4)
    shapes = [(23, 45), (1000 + 7,)]
    params = [Tensor(rng.standard_normal(s).astype(np.float32), name=f"p{i}") for i, s in enumerate(shapes)]
    ours = [[p.data.copy(), np.zeros(s, np.float32), np.zeros(s, np.float32), np.zeros(s, np.uint16)]
            for p, s in zip(params, shapes)]
    opt = AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    b1, b2 = BETAS
    for t in range(1, 4):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        table, blocks = fused.adamw_table([(w.reshape(-1), p.grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                                            w16.reshape(-1) if copy else None, w.ndim >= 2)
                                           for p, (w, m, v, w16) in zip(params, ours)], chunk)
        fused.adamw_multi(run, table, blocks, chunk, lr=LR, b1=b1, b2=b2, eps=ADAM_EPS, wd=WD,
                          step_size=LR / (1 - b1 ** t), bc2_sqrt=math.sqrt(1 - b2 ** t))
        opt.step()
    return ours, [[p.data, m.reshape(p.shape), v.reshape(p.shape)] for p, m, v in zip(params, opt.m, opt.v)]  # flat moments


@pytest.mark.parametrize("reverse", SCHEDULES)
@pytest.mark.parametrize("copy", [False, True], ids=["f32", "bf16_copy"])
def test_adamw_matches_optimizer(copy, reverse):
    """Bit for bit (the same rounded operations, in the same order)."""
    ours, theirs = run_adamw(launcher(reverse, host_pointers=True), copy)
    for (w, m, v, w16), (w_want, m_want, v_want) in zip(ours, theirs):
        for got, want in ((w, w_want), (m, m_want), (v, v_want)):
            assert got.tobytes() == want.tobytes()
        np.testing.assert_array_equal(w16, to_bf16(w) if copy else 0)


def test_adamw_planted_no_bias_correction_and_wrong_row():
    ours, theirs = run_adamw(launcher(plant=("__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt)", "__fsqrt_rn(vi)")), False)
    assert not np.allclose(ours[0][0], theirs[0][0], rtol=1e-3, atol=0)
    ours, theirs = run_adamw(launcher(plant=("table_row(table, 8, rows, blockIdx.x)",
                                             "table_row(table, 8, rows - 1, blockIdx.x)")), False)
    assert not all(np.array_equal(o[0], t[0]) for o, t in zip(ours, theirs))


# Gradient norm: sums of squares --------------------------------------------------------------------

def run_sum_squares(launch, arrays, chunk):
    table, slices = fused.sum_squares_table(arrays, chunk)
    sums = np.full(slices, np.nan)
    fused.sum_squares(launch, table, chunk, sums)
    return sums


def slice_sums(arrays, chunk):
    return [math.fsum(np.square(g[i:i + chunk].astype(np.float64))) for g in arrays for i in range(0, g.size, chunk)]


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_sum_squares_per_slice(reverse):
    """Each slice's sum (of every slice of every array, in order, one launch) to float64 rounding
    of the exact sum, and the same bits wherever the slice sits (here: behind a whole slice of
    other values), as ZeRO-1's shards need."""
    rng = np.random.default_rng(0)
    g, before, small = (rng.standard_normal(n).astype(np.float32) * 3 for n in (2500, 1000, 7))
    sums = run_sum_squares(launcher(reverse, host_pointers=True), [g, small], 1000)
    np.testing.assert_allclose(sums, slice_sums([g, small], 1000), rtol=1e-14)
    shifted = run_sum_squares(launcher(reverse, host_pointers=True), [small, np.concatenate([before, g])], 1000)
    assert shifted[2:].tobytes() == sums[:3].tobytes() and shifted[0] == sums[3]


def test_sum_squares_planted_missing_barrier():
    g = np.random.default_rng(0).standard_normal(2500).astype(np.float32)
    sums = run_sum_squares(launcher(plant=("        __syncthreads();\n    }\n    if (threadIdx.x == 0) sums",
                                           "    }\n    if (threadIdx.x == 0) sums")), [g], 1000)
    assert not np.allclose(sums, slice_sums([g], 1000), rtol=1e-6)


# Embedding backward ---------------------------------------------------------------------------------

def run_embedding_backward(launch, dy, ids):
    """The kernel's (U, H) row sums, and NumPy's add.at of the same rows (the CPU op's reference)."""
    used, slot = np.unique(ids, return_inverse=True)
    order = np.argsort(slot, kind="stable")
    starts = np.searchsorted(slot[order], np.arange(used.size + 1))
    sums = np.full((used.size, dy.shape[1]), np.nan, np.float32)
    embedding.backward(launch, dy, order, starts, sums)
    want = np.zeros_like(sums)
    np.add.at(want, slot, dy)
    return sums, want


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_embedding_backward_is_add_at_bit_for_bit(reverse):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 9, 70)  # every token several times
    dy = rng.standard_normal((70, 300)).astype(np.float32)  # H over one block's columns
    got, want = run_embedding_backward(launcher(reverse), dy, ids)
    assert got.tobytes() == want.tobytes()


def test_embedding_backward_planted_segment_overrun():
    rng = np.random.default_rng(0)
    ids, dy = rng.integers(0, 9, 70), rng.standard_normal((70, 40)).astype(np.float32)
    got, want = run_embedding_backward(launcher(plant=("j < last", "j <= last && j < starts[gridDim.x]")), dy, ids)
    assert not np.allclose(got, want)


# bf16 casts and sum ---------------------------------------------------------------------------------

def special_f32(rng, n):
    """Random fp32 values of every magnitude, and the cases rounding must get right: ties to even,
    the largest values, infinities, NaNs (quiet and signalling), signed zeros, subnormals."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    edge = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000,
                     0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00000000, 0x80000000, 0x00000001, 0x807FFFFF],
                    np.uint32)
    return np.concatenate([edge, bits]).view(np.float32)


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_casts_are_the_backends_bits(reverse):
    from minitrain.gpu import cast

    rng = np.random.default_rng(0)
    x = special_f32(rng, 3000)
    y = np.empty(x.size, np.uint16)
    cast.to_bf16(launcher(reverse), x, y)
    assert y.tobytes() == to_bf16(x).tobytes()
    back = np.empty(y.size, np.float32)
    cast.from_bf16(launcher(reverse), y, back)
    assert back.tobytes() == from_bf16(y).tobytes()


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_add_bf16_is_one_rounded_fp32_sum(reverse):
    """Normal values only: on the GPU a sum below the normal range flushes to zero (-ftz=true)."""
    from minitrain.gpu import cast

    rng = np.random.default_rng(1)
    a, b = (to_bf16((rng.standard_normal(3000) * 10.0 ** rng.integers(-3, 4, 3000)).astype(np.float32))
            for _ in range(2))
    out = np.empty_like(a)
    cast.add_bf16(launcher(reverse), a, b, out)
    assert out.tobytes() == to_bf16(from_bf16(a) + from_bf16(b)).tobytes()
    cast.add_bf16(launcher(reverse), a, b, a)  # in place
    assert a.tobytes() == out.tobytes()


@pytest.mark.parametrize("reverse", SCHEDULES)
def test_add_bias_bf16_is_one_rounded_fp32_sum(reverse):
    """Each row of an fp32 product plus the bias, rounded once: the bits of to_bf16(acc + b); a
    bias indexed by row instead of column must fail."""
    from minitrain.gpu import cast

    rng = np.random.default_rng(2)
    acc, b = (rng.standard_normal((37, 45)) * 5).astype(np.float32), rng.standard_normal(45).astype(np.float32)
    want = to_bf16(acc + b).tobytes()
    out = np.empty(acc.shape, np.uint16)
    cast.add_bias(launcher(reverse), acc, b, out)
    assert out.tobytes() == want
    cast.add_bias(launcher(plant=("b[i % cols]", "b[i / cols]"), planted_in="cast"), acc, b, out)
    assert out.tobytes() != want


def test_casts_planted_truncation_and_wrong_operand():
    from minitrain.gpu import cast

    x = special_f32(np.random.default_rng(0), 500)
    y = np.empty(x.size, np.uint16)
    cast.to_bf16(launcher(plant=("store(y, i, x[i]);", "y[i] = (bf16)(__float_as_uint(x[i]) >> 16);")), x, y)
    assert y.tobytes() != to_bf16(x).tobytes()
    a = b = to_bf16(np.linspace(-3, 3, 500, dtype=np.float32))
    b = to_bf16(np.linspace(5, 1, 500, dtype=np.float32))
    out = np.empty_like(a)
    cast.add_bf16(launcher(plant=("to_f32(a[i]) + to_f32(b[i])", "to_f32(a[i]) + to_f32(a[i])")), a, b, out)
    assert out.tobytes() != to_bf16(from_bf16(a) + from_bf16(b)).tobytes()
