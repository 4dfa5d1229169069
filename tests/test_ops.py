"""Numerical properties of the ops beyond their gradients: layouts, stability, dtypes, errors."""

import tracemalloc

import numpy as np
import pytest

from minitrain import ops
from minitrain.autograd import Tensor


def test_cross_entropy_full_qwen_vocab_fp32_is_stable_and_lean():
    N, V = 8, 151_936
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((N, V)) * 3 + 40).astype(np.float32)  # large logits: exp would overflow
    t = rng.integers(0, V, N)
    x = Tensor(z, requires_grad=True)
    tracemalloc.start()
    loss = ops.cross_entropy(x, t)
    loss.backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    z64 = z.astype(np.float64)
    m = z64.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z64 - m).sum(axis=-1))
    # fp32 bounds (u = 2^-24): a pairwise sum of V terms is within (16 + log2(V / 128)) u ~ 27u of
    # the sum of their magnitudes (NumPy sums blocks of 128 with 8 accumulators, then halves), and
    # exp(z - m) adds |z - m| u <= 30u; the log turns that relative error of the sum into an absolute
    # one, so the log-sum-exp m + log(sum) is within ~60u ~ 4e-6 and the loss (~12) within 1e-5
    # relative with ~30x room. A gradient row (p - onehot) / N has sum |.| = 2 / N: its fp32 sum is
    # within 27u * 2/N plus the softmax's own ~30u per element, under 1e-6.
    assert abs(float(loss.data) - (lse - z64[np.arange(N), t]).mean()) < 1e-5 * abs(float(loss.data))
    assert x.grad.dtype == np.float32 and np.isfinite(x.grad).all()
    np.testing.assert_allclose(x.grad.sum(axis=-1), 0, atol=1e-6)  # softmax - onehot sums to 0 per row
    # one logits-sized fp32 temporary at a time (+ the gradient itself): an fp64 upcast would be > 2x
    assert peak < 2.5 * z.nbytes, f"peak {peak / z.nbytes:.2f} x logits bytes"


def test_cross_entropy_is_a_mean_over_all_tokens():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 7))
    t = rng.integers(0, 7, (2, 3))
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    expected = -np.mean([logp[b, i, t[b, i]] for b in range(2) for i in range(3)])
    assert float(ops.cross_entropy(Tensor(z), t).data) == pytest.approx(expected, rel=1e-13)


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ops.cross_entropy(Tensor(np.zeros((2, 5))), np.array([1, 5]))
    with pytest.raises(ValueError, match="and not -100"):
        ops.cross_entropy(Tensor(np.zeros((2, 5))), np.array([1, -1]))


def test_ignored_targets_are_torchs_ignore_index():
    """Targets -100 leave their positions out, as torch's cross_entropy(ignore_index=-100) does: the
    mean over the other targets and a zero gradient in the ignored rows, fused head and plain loss
    alike, in float64 to 1e-12. With no target at all the loss is 0 and so are the gradients (torch
    gives nan: a batch of prompts only would stop a run)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x, W = rng.standard_normal((2, 5, 6)), rng.standard_normal((11, 6))
    t = np.array([[-100, 3, 10, -100, 0], [4, -100, -100, -100, 7]])
    tx, tW = torch.tensor(x, requires_grad=True), torch.tensor(W, requires_grad=True)
    want = torch.nn.functional.cross_entropy((tx @ tW.T).reshape(-1, 11), torch.tensor(t).reshape(-1), ignore_index=-100)
    want.backward()
    for chunk_rows in (None, 2):
        got = [Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)]
        loss = ops.linear_cross_entropy(*got, t, chunk_rows=chunk_rows)
        loss.backward()
        assert abs(float(loss.data) - want.item()) < 1e-12
        np.testing.assert_allclose(got[0].grad, tx.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(got[1].grad, tW.grad.numpy(), rtol=0, atol=1e-12)
        assert not got[0].grad[t == -100].any()
    z = Tensor(x @ W.T, requires_grad=True)
    plain = ops.cross_entropy(z, t)
    plain.backward()
    assert abs(float(plain.data) - want.item()) < 1e-12
    none = [Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)]
    loss = ops.linear_cross_entropy(*none, np.full((2, 5), -100))
    loss.backward()
    assert float(loss.data) == 0.0 and not none[0].grad.any() and not none[1].grad.any()


def test_rmsnorm_statistics_in_fp32_for_half_inputs():
    x = np.full((2, 16), 300.0, dtype=np.float16)  # x^2 = 90000 overflows float16 (max 65504)
    x[1] = np.linspace(-300, 300, 16)
    w = np.linspace(0.5, 1.5, 16).astype(np.float16)
    y = ops.rmsnorm(Tensor(x), Tensor(w), 1e-6).data
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(axis=-1, keepdims=True) + 1e-6) * w
    assert y.dtype == np.float16 and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=2e-3)


def test_rmsnorm_matches_formula_with_eps():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((3, 8)) * 1e-3, rng.standard_normal(8)  # eps matters at this scale
    y = ops.rmsnorm(Tensor(x), Tensor(w), 1e-5).data
    np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-13)


def _hf_rope(x, theta, positions):
    """Hugging Face's formulation, written independently: emb = cat(freqs, freqs), rotate_half."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=-1)[:, None, :]  # (T, 1, hd)
    rotate_half = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
def test_rope_matches_the_hf_rotate_half_formulation(theta):
    x = np.random.default_rng(3).standard_normal((2, 11, 3, 16))
    np.testing.assert_allclose(ops.rope(Tensor(x), theta).data, _hf_rope(x, theta, np.arange(11)), atol=1e-12)
    positions = np.array([0, 5, 6, 7, 100, 2, 3, 4, 9, 1, 4096])
    np.testing.assert_allclose(ops.rope(Tensor(x), theta, positions).data, _hf_rope(x, theta, positions),
                               atol=1e-10)
    per_row = np.stack([positions, positions[::-1] + 7])  # (B, T): each row its own positions
    y = ops.rope(Tensor(x), theta, per_row).data
    for b in range(2):
        np.testing.assert_allclose(y[b], _hf_rope(x[b], theta, per_row[b]), atol=1e-10)


def test_rope_pairs_element_i_with_i_plus_half_not_its_neighbour():
    hd = 8
    x = np.zeros((1, 2, 1, hd))
    x[..., 0] = 1.0
    y = ops.rope(Tensor(x), 10_000.0).data
    np.testing.assert_allclose(y[0, 0, 0], x[0, 0, 0])  # position 0: no rotation
    assert abs(y[0, 1, 0, hd // 2]) > 0.5  # position 1, pair (0, hd/2) rotated by 1 radian
    assert y[0, 1, 0, 1] == 0.0


def test_rope_fp32_tables_follow_the_input_dtype():
    """fp32 tables, as transformers makes them, against the float64 formula. The bound, element by
    element (u = 2^-24): the angle pos * (1 / theta^(2i/hd)) is a power (at most 2 ulp = 4u
    relative), a division and a product (u each): 6u |angle|; cos and sin of it are within 4 ulp
    (<= 4u absolute, |cos| <= 1); y = x1 cos - x2 sin adds 3u of |x1| + |x2|. So
    |y - exact| <= (|x1| + |x2|) (6u |angle| + 7u): at position 299 an angle error of ~1e-5 rad
    dominates, whatever the CPU's pow and sin."""
    hd, T, u = 64, 300, 2.0 ** -24
    x = np.random.default_rng(4).standard_normal((1, T, 2, hd)).astype(np.float32)
    y = ops.rope(Tensor(x), 1_000_000.0).data
    assert y.dtype == np.float32
    angle = np.outer(np.arange(T), 1.0 / 1e6 ** (np.arange(0, hd, 2) / hd))  # (T, hd/2)
    angle = np.concatenate([angle, angle], axis=-1)[:, None, :]  # (T, 1, hd): each pair shares its angle
    pair = np.abs(x) + np.abs(np.concatenate([x[..., hd // 2:], x[..., : hd // 2]], axis=-1))  # |x1| + |x2|
    assert (np.abs(y - _hf_rope(x.astype(np.float64), 1e6, np.arange(T))) <= pair * (6 * u * angle + 7 * u)).all()


def test_embedding_rejects_ids_outside_the_vocabulary():
    W = Tensor(np.zeros((5, 2)))
    for bad in (5, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            ops.embedding(W, np.array([[0, bad]]))


def test_embedding_repeated_ids_accumulate():
    W = Tensor(np.zeros((4, 2)), requires_grad=True)
    ops.embedding(W, np.array([2, 2, 2, 0])).backward(np.ones((4, 2)))
    np.testing.assert_array_equal(W.grad, [[1, 1], [0, 0], [3, 3], [0, 0]])


def test_silu_and_swiglu_do_not_overflow_in_fp32():
    x = np.array([-1000.0, -90.0, 0.0, 90.0, 1000.0], dtype=np.float32)
    with np.errstate(all="raise"):
        y = ops.silu(Tensor(x)).data
        z = ops.swiglu(Tensor(x), Tensor(np.ones_like(x))).data
    np.testing.assert_allclose(y, [0.0, 0.0, 0.0, 90.0, 1000.0], atol=1e-30)
    np.testing.assert_array_equal(y, z)


def test_linear_any_leading_dims():
    rng = np.random.default_rng(5)
    x, W, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((6, 5)), rng.standard_normal(6)
    y = ops.linear(Tensor(x), Tensor(W), Tensor(b)).data
    assert y.shape == (2, 3, 4, 6)
    np.testing.assert_allclose(y, np.einsum("abcd,ed->abce", x, W) + b, rtol=1e-12)


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 1000])
def test_linear_cross_entropy_equals_the_unfused_pair(chunk_rows):
    rng = np.random.default_rng(6)
    x, W = rng.standard_normal((3, 11, 16)), rng.standard_normal((301, 16))
    t = rng.integers(0, 301, (3, 11))
    grads = []
    for fused in (True, False):
        xt, Wt = Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)
        loss = (ops.linear_cross_entropy(xt, Wt, t, chunk_rows=chunk_rows) if fused
                else ops.cross_entropy(ops.linear(xt, Wt), t))
        loss.backward(np.asarray(0.25))  # an upstream gradient != 1, as with --grad-accum 4
        grads.append((float(loss.data), xt.grad, Wt.grad))
    (la, dxa, dWa), (lb, dxb, dWb) = grads
    assert la == pytest.approx(lb, rel=1e-13)
    np.testing.assert_allclose(dxa, dxb, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(dWa, dWb, rtol=1e-11, atol=1e-14)


def test_linear_cross_entropy_never_holds_the_whole_logits():
    rng = np.random.default_rng(7)
    N, V, H = 400, 30011, 16
    x = Tensor(rng.standard_normal((N, H), dtype=np.float32), requires_grad=True)
    W = Tensor(rng.standard_normal((V, H), dtype=np.float32), requires_grad=True)
    t = rng.integers(0, V, N)
    tracemalloc.start()
    ops.linear_cross_entropy(x, W, t, chunk_rows=50).backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * N * V * 4, f"peak {peak / 1e6:.1f} MB vs {N * V * 4 / 1e6:.1f} MB of logits"


def _through(op, arrays, seed=0, **options):
    """op.apply's output and the gradients of sum(out * gy) for every input."""
    tensors = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    out = op.apply(*tensors, **options)
    out.backward(np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype))
    return [out.data] + [t.grad for t in tensors]


def _route_cases():
    """(name, the plain math, its CPU route, inputs (rng, dtype) -> arrays, options): each op whose
    module writes the math first and the CPU's blocked route below it (backend.route)."""
    from minitrain.ops.activations import SwiGLU, SwiGLUBlocked, SwiGLUPacked, SwiGLUPackedBlocked
    from minitrain.ops.rmsnorm import RMSNorm, RMSNormBlocked
    from minitrain.ops.rope import RoPE, RoPEBlocked

    def normal(*shape):
        return lambda r, dt: [(r.standard_normal(s) * 2).astype(dt) for s in shape]

    per_row = np.stack([np.arange(300), np.arange(300)[::-1]])  # (B, T) positions, each row its own
    return [("rmsnorm", RMSNorm, RMSNormBlocked, normal((3, 300, 100), (100,)), {"eps": 1e-6}),
            ("rope", RoPE, RoPEBlocked, normal((2, 300, 3, 64)), {"theta": 1e4}),
            ("rope per row", RoPE, RoPEBlocked, normal((2, 300, 3, 64)), {"theta": 1e6, "positions": per_row}),
            ("swiglu", SwiGLU, SwiGLUBlocked, normal((2, 300, 330), (2, 300, 330)), {}),
            ("swiglu packed", SwiGLUPacked, SwiGLUPackedBlocked, normal((2, 300, 660)), {})]


ROUTE_CASES = _route_cases()


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_each_cpu_route_computes_the_plain_math(case, dtype, rtol):
    """The blocked route (what the CPU runs, and what the gradient checks check) and the math the
    module writes first (what CuPy without the kernels runs) agree: outputs and gradients, several
    blocks of rows and every core's share. Their docstrings say the operations are the same, so
    the bound is a few ulps, not an analysis."""
    name, plain, blocked, make, options = case
    arrays = make(np.random.default_rng(8), dtype)
    for want, got in zip(_through(plain, arrays, **options), _through(blocked, arrays, **options), strict=True):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_the_cross_entropy_rows_on_the_cpu_compute_the_plain_math():
    from minitrain.ops.cross_entropy import gradients, gradients_blocked, losses, losses_blocked

    rng = np.random.default_rng(9)
    z = rng.standard_normal((40, 3001)) * 4  # several blocks of rows
    t = rng.integers(0, 3001, 40)
    (nll, lse), (nll_b, lse_b) = losses(z, t), losses_blocked(z, t)
    np.testing.assert_allclose(nll_b, nll, rtol=1e-13)
    np.testing.assert_allclose(lse_b, lse, rtol=1e-13)
    want, got = gradients(z, t, lse, 0.5, np.empty_like(z)), gradients_blocked(z, t, lse, 0.5, np.empty_like(z))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-16)


def test_a_route_that_departs_from_the_math_is_caught(monkeypatch):
    """The check above can fail: RoPE's plain rotation with its second half's sign flipped."""
    from minitrain.ops.rope import RoPE

    def flipped(x, cos, sin):
        half = x.shape[-1] // 2
        y = np.empty_like(x)
        y[..., :half] = x[..., :half] * cos - x[..., half:] * sin
        y[..., half:] = x[..., half:] * cos - x[..., :half] * sin  # + in the math
        return y

    monkeypatch.setattr(RoPE, "rotate", staticmethod(flipped))
    with pytest.raises(AssertionError):
        test_each_cpu_route_computes_the_plain_math(ROUTE_CASES[1], np.float64, 1e-13)
