"""Attention against a naive per-head loop (forward and backward), causality, and memory."""

import math

import numpy as np
import pytest

from minitrain import ops
from minitrain.autograd import Tensor


def naive_attention(q, k, v, do):
    """One head, one query row at a time. Returns o and (dq, dk, dv) for output gradient do."""
    B, T, nH, hd = q.shape
    g = nH // k.shape[2]
    c = 1 / math.sqrt(hd)
    o, dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for h in range(nH):
            kv = h // g  # consecutive groups, like HF repeat_kv
            for i in range(T):
                keys, values = k[b, : i + 1, kv], v[b, : i + 1, kv]  # causal: j <= i
                s = keys @ q[b, i, h] * c
                p = np.exp(s - s.max())
                p /= p.sum()
                o[b, i, h] = p @ values
                dp = values @ do[b, i, h]
                ds = p * (dp - p @ dp)
                dq[b, i, h] = ds @ keys * c
                dk[b, : i + 1, kv] += np.outer(ds, q[b, i, h]) * c  # summed over the group's heads
                dv[b, : i + 1, kv] += np.outer(p, do[b, i, h])
    return o, (dq, dk, dv)


SHAPES = [  # B, T, nH, nKV, hd
    (2, 5, 2, 2, 4),
    (2, 6, 8, 2, 8),
    (2, 7, 7, 1, 4),
    (1, 9, 14, 2, 8),
    (3, 1, 4, 1, 4),
]


@pytest.mark.parametrize("B,T,nH,nKV,hd", SHAPES)
def test_matches_naive_per_head_loop(B, T, nH, nKV, hd):
    rng = np.random.default_rng(T * nH)
    q, k, v = (rng.standard_normal((B, T, n, hd)) for n in (nH, nKV, nKV))
    do = rng.standard_normal(q.shape)
    tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    out = ops.attention(*tensors)
    out.backward(do)
    ref_o, ref_grads = naive_attention(q, k, v, do)
    np.testing.assert_allclose(out.data, ref_o, rtol=1e-12, atol=1e-12)
    for t, ref in zip(tensors, ref_grads):
        np.testing.assert_allclose(t.grad, ref, rtol=1e-10, atol=1e-12)


def test_fp32_matches_fp64():
    """fp32 (its inputs rounded to fp32, u each) against float64. With u = 2^-24: a score
    q.k/sqrt(8) of standard normal vectors sums 8 products, within (8 + 2 + 2)u of
    sum|q_i k_i| / sqrt(8) (~3); the softmax turns a score's absolute error into a relative one
    of p; P V sums 16 terms of |v| <= 4.
    So |o32 - o64| <= ~(3 * 12 + 16 * 4 + 10)u ~ 6e-6, inside atol + rtol |o| = 1e-5 (1 + |o|)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16, n, 8)) for n in (8, 2, 2))
    o64 = ops.attention(*(Tensor(a) for a in (q, k, v))).data
    o32 = ops.attention(*(Tensor(a.astype(np.float32)) for a in (q, k, v))).data
    assert o32.dtype == np.float32
    np.testing.assert_allclose(o32, o64, rtol=1e-5, atol=1e-5)


def test_causal_future_keys_and_values_do_not_change_the_past():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 8, n, 4)) for n in (4, 2, 2))
    before = ops.attention(Tensor(q), Tensor(k), Tensor(v)).data
    k2, v2 = k.copy(), v.copy()
    k2[:, 5:] += 3.0
    v2[:, 5:] -= 2.0
    after = ops.attention(Tensor(q), Tensor(k2), Tensor(v2)).data
    np.testing.assert_array_equal(after[:, :5], before[:, :5])
    assert not np.allclose(after[:, 5:], before[:, 5:])


def test_no_t_by_t_matrix_is_kept_for_the_backward():
    T = 64
    rng = np.random.default_rng(2)
    q, k, v = (Tensor(rng.standard_normal((2, T, n, 8)), requires_grad=True) for n in (4, 1, 1))
    out = ops.attention(q, k, v)
    saved = [a for a in out.ctx.saved if hasattr(a, "shape")]
    assert saved, "attention saved nothing?"
    for a in saved:
        assert a.size < 2 * 4 * T * T, f"a saved array of shape {a.shape} is T x T sized"


def test_rejects_heads_that_do_not_group():
    q, k = np.zeros((1, 2, 6, 4)), np.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="multiple of nKV"):
        ops.attention(Tensor(q), Tensor(k), Tensor(k))
