"""The ops' kernel path (what --device cuda runs) checked on the CPU: backend.launch is pointed at
the emulation of kernels/*.cu, so every op that has a kernel calls it through the same launch
functions and buffers as on the GPU; the results must match the reference ops."""

import numpy as np
import pytest
from kernel_emu import launcher

from minitrain import backend, ops
from minitrain.autograd import Tensor
from minitrain.config import ModelConfig
from minitrain.model import Model
from minitrain.optim import SGD, AdamW

RTOL = 2e-5


@pytest.fixture
def kernels(monkeypatch):
    """use() switches the ops to their kernel path (through the CPU emulation) and returns the set
    of kernel sources launched, so a test can show the kernels really ran."""
    launched = set()

    def use():
        emulated = launcher()

        def recording(source, kernel, grid, block, args):
            launched.add(source)
            emulated(source, kernel, grid, block, args)

        monkeypatch.setattr(backend, "launch", recording)
        monkeypatch.setattr(backend, "matmul_backward", "kernels")
        return launched
    return use


def run(fn, arrays, seed=0):
    """fn's output and the gradients of sum(out * gy) for every float input."""
    tensors = [Tensor(a.copy(), requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*tensors)
    gy = np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32)
    out.backward(gy)
    return [out.data] + [t.grad for t in tensors if isinstance(t, Tensor)]


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.abs(b).max()))


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CASES = {  # op -> (function, inputs); the op's kernel source has the same name but for linear
    "swiglu": (ops.swiglu, lambda r: [_f32(r, 2, 5, 33, scale=3), _f32(r, 2, 5, 33)]),
    "rmsnorm": (lambda x, w: ops.rmsnorm(x, w, 1e-6), lambda r: [_f32(r, 3, 7, 100), 1 + _f32(r, 100, scale=0.3)]),
    "rope": (lambda x: ops.rope(x, 1e6), lambda r: [_f32(r, 2, 7, 3, 64)]),
    "attention": (ops.attention, lambda r: [_f32(r, 2, 9, 4, 64), _f32(r, 2, 9, 1, 64), _f32(r, 2, 9, 1, 64)]),
    "cross_entropy": (ops.cross_entropy, lambda r: [_f32(r, 2, 5, 301, scale=3), r.integers(0, 301, (2, 5))]),
    "linear": (ops.linear, lambda r: [_f32(r, 2, 7, 45), _f32(r, 61, 45), _f32(r, 61)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_op_kernel_path_matches_the_reference(name, kernels):
    fn, make = CASES[name]
    arrays = make(np.random.default_rng(1))
    reference = run(fn, arrays)
    launched = kernels()
    for got, want in zip(run(fn, arrays), reference, strict=True):
        close(got, want)
    assert launched == {"matmul_backward" if name == "linear" else name}


def test_model_steps_on_the_kernel_path_match_the_reference(kernels):
    """Loss, every gradient and the weights after two SGD steps of a whole model (hd 64, GQA 2:1,
    q/k/v biases, tied head): every kernel in one graph."""
    cfg = ModelConfig(family="qwen2", hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=257,
                      max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    ids = np.random.default_rng(2).integers(0, 257, (2, 10))

    def two_steps():
        model = Model.from_scratch(cfg, seed=3)
        opt = SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(2):
            for p in model.parameters():
                p.zero_grad()
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.backward()
            grads = {n: t.grad.copy() for n, t in model.params.items()}
            opt.step()
            losses.append(float(loss.data))
        return losses, grads, {n: t.data for n, t in model.params.items()}

    ref_losses, ref_grads, ref_weights = two_steps()
    launched = kernels()
    losses, grads, weights = two_steps()
    assert launched == {"swiglu", "rmsnorm", "rope", "attention", "cross_entropy", "matmul_backward"}
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for name in ref_grads:
        close(grads[name], ref_grads[name])
        close(weights[name], ref_weights[name])


def test_adamw_on_the_kernel_path_is_bit_identical(kernels):
    rng = np.random.default_rng(4)
    shapes = [(33, 17), (17,), (5, 3, 7)]
    grads = [[_f32(rng, *s) for s in shapes] for _ in range(3)]

    def three_steps():
        params = [Tensor(np.random.default_rng(5).standard_normal(s).astype(np.float32), requires_grad=True)
                  for s in shapes]
        opt = AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
        return [p.data for p in params] + opt.m + opt.v

    reference = three_steps()
    launched = kernels()
    for got, want in zip(three_steps(), reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert launched == {"adamw"}
