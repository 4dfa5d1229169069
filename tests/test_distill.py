"""Distillation's fused head + loss (ops/distill.py): against torch's unfused composition, its
exact cases, and its memory. The gradient check itself is in `minitrain gradcheck`."""

import tracemalloc

import numpy as np
import pytest

from minitrain import ops
from minitrain.autograd import Tensor


def _inputs(rng, N=13, H=16, Ht=24, V=301, dtype=np.float64):
    x, W = rng.standard_normal((1, N, H)), rng.standard_normal((V, H)) * 0.5
    xt, Wt = rng.standard_normal((1, N, Ht)), rng.standard_normal((V, Ht)) * 0.5
    return [a.astype(dtype) for a in (x, W, xt, Wt)] + [rng.integers(0, V, (1, N))]


def _ours(x, W, xt, Wt, t, weight, T, chunk_rows=None, g=1.0):
    xs, Ws = Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)
    parts = {}
    loss = ops.linear_distillation(xs, Ws, xt, Wt, t, weight, T, chunk_rows=chunk_rows, parts=parts)
    loss.backward(np.asarray(g, dtype=x.dtype))
    return loss.data, parts, xs.grad, Ws.grad


@pytest.mark.numerics
@pytest.mark.parametrize("weight, T, chunk_rows", [(0.5, 2.0, None), (0.9, 1.0, 4), (1.0, 4.0, 1), (0.3, 0.7, 13)])
def test_equals_torchs_unfused_composition_in_float64(weight, T, chunk_rows):
    """(1 - w) F.cross_entropy + w T^2 F.kl_div(log q, log p, batchmean) on the whole logits."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, W, xt, Wt, t = _inputs(np.random.default_rng(1))
    loss, parts, dx, dW = _ours(x, W, xt, Wt, t, weight, T, chunk_rows, g=0.25)  # g != 1, as with --grad-accum 4

    xs, Ws = torch.tensor(x[0], requires_grad=True), torch.tensor(W, requires_grad=True)
    z, zt = xs @ Ws.T, torch.tensor(xt[0] @ Wt.T)
    ce = F.cross_entropy(z, torch.tensor(t[0]))
    kd = T * T * F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(zt / T, -1), reduction="batchmean", log_target=True)
    ref = (1 - weight) * ce + weight * kd
    (0.25 * ref).backward()
    # float64 both sides, a few hundred operations per value: 1e-12 relative is ~5000 ulps of room
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-12)
    assert parts["ce_loss"] == pytest.approx(float(ce.detach()), rel=1e-12)
    assert parts["kd_loss"] == pytest.approx(float(kd.detach()), rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(dx[0], xs.grad.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(dW, Ws.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_student_as_its_own_teacher_has_zero_kl_and_zero_gradient(dtype):
    x, W, _, _, t = _inputs(np.random.default_rng(2), dtype=dtype)
    loss, parts, dx, dW = _ours(x, W, x, W, t, 1.0, 2.0, chunk_rows=5)
    assert float(loss) == 0.0 and parts["kd_loss"] == 0.0
    assert not dx.any() and not dW.any()
    assert parts["ce_loss"] > 1.0  # the CE term was formed, and weighted out


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_weight_zero_is_the_plain_loss_bit_for_bit(chunk_rows):
    x, W, xt, Wt, t = _inputs(np.random.default_rng(3), dtype=np.float32)
    loss, parts, dx, dW = _ours(x, W, xt, Wt, t, 0.0, 2.0, chunk_rows)
    xs, Ws = Tensor(x.copy(), requires_grad=True), Tensor(W.copy(), requires_grad=True)
    plain = ops.linear_cross_entropy(xs, Ws, t, chunk_rows=chunk_rows)
    plain.backward()
    assert loss.tobytes() == plain.data.tobytes()
    assert dx.tobytes() == xs.grad.tobytes() and dW.tobytes() == Ws.grad.tobytes()
    assert parts["kd_loss"] > 0.0  # the teacher differs: the KL term was formed, and weighted out


def test_never_holds_either_models_whole_logits_at_qwens_vocabulary():
    """V = 151 936 (Qwen2.5's vocabulary), N = 256 rows in chunks of 8: the two models' logits
    would be 2 x 156 MB whole; a chunk holds six (8, V) fp32 arrays (29 MB) and dW's two (V, 16)."""
    rng = np.random.default_rng(4)
    N, V, H = 256, 151_936, 16
    x = Tensor(rng.standard_normal((N, H), dtype=np.float32), requires_grad=True)
    W = Tensor(rng.standard_normal((V, H), dtype=np.float32), requires_grad=True)
    xt, Wt = rng.standard_normal((N, H), dtype=np.float32), rng.standard_normal((V, H), dtype=np.float32)
    t = rng.integers(0, V, N)
    tracemalloc.start()
    ops.linear_distillation(x, W, xt, Wt, t, 0.5, 2.0, chunk_rows=8).backward()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.5 * N * V * 4, f"peak {peak / 1e6:.1f} MB vs {N * V * 4 / 1e6:.1f} MB of one model's logits"
    assert np.isfinite(x.grad).all() and np.isfinite(W.grad).all()


def test_a_teacher_of_another_vocabulary_is_refused_with_both_sizes():
    x, W, xt, Wt, t = _inputs(np.random.default_rng(5))
    with pytest.raises(ValueError, match="301"):
        ops.linear_distillation(Tensor(x), Tensor(W), xt, Wt[:300], t, 0.5, 2.0)
