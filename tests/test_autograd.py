"""The engine: accumulation, tied weights, no_grad, graph release, ownership of .grad."""

import numpy as np
import pytest

from minitrain import ops
from minitrain.autograd import Tensor, no_grad


def test_tied_weight_gets_the_sum_of_both_uses():
    """Embedding lookup and lm_head share W (tied): W.grad = lookup part + head part."""
    rng = np.random.default_rng(0)
    V, H = 7, 4
    W0 = rng.standard_normal((V, H))
    ids, targets = np.array([[1, 3, 3, 6]]), np.array([[3, 0, 6, 1]])

    def loss(W_embed, W_head):
        h = ops.embedding(W_embed, ids)
        return ops.cross_entropy(ops.linear(h, W_head), targets)

    W = Tensor(W0.copy(), requires_grad=True)
    loss(W, W).backward()
    We, Wh = Tensor(W0.copy(), requires_grad=True), Tensor(W0.copy(), requires_grad=True)
    loss(We, Wh).backward()
    np.testing.assert_allclose(W.grad, We.grad + Wh.grad, rtol=1e-14)
    assert np.abs(We.grad).sum() > 0 and np.abs(Wh.grad).sum() > 0


def test_same_tensor_twice_in_one_op():
    x = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    ops.mul(x, x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, -4.0])


def test_leaf_gradients_accumulate_across_backward_calls_until_zero_grad():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])
    x.zero_grad()
    assert x.grad is None
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 2.0])


def test_no_grad_records_no_graph():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2.0).sum()
    assert y.ctx is None and not y.requires_grad
    z = (x * 2.0).sum()
    assert z.ctx is not None and z.requires_grad


def test_graph_is_released_after_backward():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    W = Tensor(np.ones((4, 3)), requires_grad=True)
    hidden = ops.linear(x, W)
    loss = hidden.sum()
    loss.backward()
    assert hidden.ctx.inputs is None and hidden.ctx.saved is None
    with pytest.raises(RuntimeError, match="already released"):
        loss.backward()


def test_leaf_grads_never_share_memory():
    """Add hands one array to both inputs and Reshape hands out views: each leaf must own its
    .grad, or an in-place update of one (clipping, accumulation) would change another."""
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    b = Tensor(np.ones((2, 3)), requires_grad=True)
    c = Tensor(np.ones(6), requires_grad=True)
    (a + b + c.reshape(2, 3)).sum().backward()
    a.grad *= 10.0
    np.testing.assert_array_equal(b.grad, np.ones((2, 3)))
    np.testing.assert_array_equal(c.grad, np.ones(6))
    assert not np.shares_memory(a.grad, b.grad) and not np.shares_memory(b.grad, c.grad)


def test_deep_graph_does_not_recurse():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.backward()
    assert float(x.grad) == 1.0


def test_only_tensors_that_need_it_get_gradients():
    x = Tensor(np.ones((2, 3)))
    W = Tensor(np.ones((4, 3)), requires_grad=True)
    ops.linear(x, W).sum().backward()
    assert x.grad is None and W.grad.shape == (4, 3)


def test_backward_of_a_non_scalar_needs_a_gradient():
    y = Tensor(np.ones(3), requires_grad=True) * 2.0
    with pytest.raises(ValueError, match="needs a scalar"):
        y.backward()
    with pytest.raises(ValueError, match="gradient shape"):
        y.backward(np.ones(4))
