"""Every op's backward against float64 central differences, and proof that the check can fail."""

import importlib

import numpy as np
import pytest

from minitrain import gradcheck as G
from minitrain.autograd import RowSparse
from minitrain.ops.attention import Attention
from minitrain.ops.cross_entropy import CrossEntropy
from minitrain.ops.embedding import Embedding
from minitrain.ops.rope import RoPE

CASES = G.cases()
IDS = [f"{c.op}-{c.note or i}".replace(" ", "_") for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_finite_differences(case):
    result = G.check(case)
    assert result.passed, result.failure


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_wrong_gradient_element_is_caught(case, monkeypatch):
    """Corrupt one element of one returned gradient: the check must fail."""
    for fn_cls in case.functions:
        original = fn_cls.backward

        def broken(self, g, original=original):
            grads = list(original(self, g))
            i = next((j for j, x in enumerate(grads) if x is not None), None)
            if i is None:  # a Columns block after the first: it wrote into the gradient the first returned
                return tuple(grads)
            bad = grads[i].dense() if isinstance(grads[i], RowSparse) else grads[i].copy()
            bad.reshape(-1)[bad.size // 2] += 0.05
            grads[i] = bad
            return tuple(grads)

        monkeypatch.setattr(fn_cls, "backward", broken)
    assert not G.check(case).passed


def _cases(op):
    return [c for c in CASES if c.op == op]


def _all_fail(op):
    return all(not G.check(c).passed for c in _cases(op))


def test_realistic_bug_embedding_assignment_instead_of_scatter_add(monkeypatch):
    def assign(self, g):
        ids, (V, H) = self.saved
        dW = np.zeros((V, H))
        dW[ids.reshape(-1)] = g.reshape(-1, H)  # repeated ids keep only one gradient
        return dW, None

    monkeypatch.setattr(Embedding, "backward", assign)
    assert not G.check(_cases("embedding")[0]).passed  # the case with repeated ids


def test_realistic_bug_rmsnorm_without_the_mean_term(rmsnorm_without_mean_term):
    assert _all_fail("rmsnorm")


def test_realistic_bug_rope_backward_rotates_forward(monkeypatch):
    def same_direction(self, g):
        cos, sin = self.saved
        return (self.rotate(g, cos, sin),)

    monkeypatch.setattr(RoPE, "backward", same_direction)
    assert not G.check(_cases("rope")[0]).passed


def test_realistic_bug_cross_entropy_summed_not_averaged(monkeypatch):
    original = CrossEntropy.backward

    def summed(self, g):
        dz, _ = original(self, g)
        return dz * self.saved[0].shape[0], None

    monkeypatch.setattr(CrossEntropy, "backward", summed)
    assert not G.check(_cases("cross_entropy")[0]).passed


def test_realistic_bug_attention_mask_missing_in_backward(monkeypatch):
    original = Attention.backward
    module = importlib.import_module("minitrain.ops.attention")  # `ops.attention` is the function

    def unmasked(self, g):
        with monkeypatch.context() as m:
            m.setattr(module, "_causal", lambda s, a, e, c, starts: s.__imul__(c))  # every key seen, none masked
            return original(self, g)

    monkeypatch.setattr(Attention, "backward", unmasked)
    assert all(not G.check(c).passed for c in _cases("attention") if c.note != "T=1")


def test_gradcheck_reports_every_op_of_the_issue():
    needed = {"linear", "embedding", "rmsnorm", "rope", "attention", "silu", "swiglu", "cross_entropy",
              "linear_distillation", "add", "mul", "sum", "mean", "reshape", "transpose"}
    assert needed <= set(G.op_names())


def test_realistic_bug_lora_dA_without_the_dropout_mask(monkeypatch):
    """dA formed from x instead of the dropped-out x_d: right without dropout, wrong with it."""
    from minitrain.ops.lora import LoRALinear

    original = LoRALinear.forward

    def undropped(self, x, W, b, A, B, *, scale, keep=None, p=0.0):
        y = original(self, x, W, b, A, B, scale=scale, keep=keep, p=p)
        saved = list(self.saved)
        saved[1] = x.reshape(-1, x.shape[-1])  # x_d := x
        self.saved = tuple(saved)
        return y

    monkeypatch.setattr(LoRALinear, "forward", undropped)
    no_dropout, dropout = _cases("lora_linear")
    assert G.check(no_dropout).passed and not G.check(dropout).passed


def test_a_frozen_weight_gets_no_gradient_and_a_zero_B_is_the_base_layer_exactly():
    from minitrain import ops
    from minitrain.autograd import Tensor

    rng = np.random.default_rng(0)
    x, W, b = (Tensor(rng.standard_normal(s), requires_grad=True) for s in ((3, 4), (5, 4), (5,)))
    A, B = Tensor(rng.standard_normal((2, 4)), requires_grad=True), Tensor(np.zeros((5, 2)), requires_grad=True)
    W.requires_grad = b.requires_grad = False
    y = ops.lora_linear(x, W, b, A, B, scale=8.0)
    assert y.data.tobytes() == ops.linear(x, W, b).data.tobytes()  # B = 0 at step 0: the base model
    assert y.ctx.saved[0] is None  # dW's input is not even kept
    ops.sum(y).backward()
    assert W.grad is None and b.grad is None and A.grad is not None and B.grad is not None
    np.testing.assert_array_equal(A.grad, 0)  # dA = s (G B)ᵀ X_d, and B = 0


def test_realistic_bug_distillation_gradient_scaled_by_T_squared(monkeypatch):
    """The soft term's gradient scaled by T^2, as its loss is, instead of T (d(z / T) / dz = 1 / T)."""
    module = importlib.import_module("minitrain.ops.distill")
    original = module._kl_gradient
    monkeypatch.setattr(module, "_kl_gradient", lambda logq, p, T, scale: original(logq, p, T, T * scale))
    assert all(not G.check(c).passed for c in _cases("linear_distillation"))
