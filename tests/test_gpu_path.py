"""The ops' kernel path (what --device cuda runs) checked on the CPU: backend.launch is pointed at
the emulation of kernels/*.cu, so every op that has a kernel calls it through the same launch
functions and buffers as on the GPU; the results must match the reference ops."""

import numpy as np
import pytest
from kernel_emu import launcher

from minitrain import backend, ops
from minitrain.autograd import Tensor
from minitrain.config import ModelConfig, RopeScaling
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
    "rmsnorm per head": (lambda x, w: ops.rmsnorm(x, w, 1e-6),  # Qwen3's q/k norms: (B, T, heads, hd) over hd
                         lambda r: [_f32(r, 2, 7, 3, 64), 1 + _f32(r, 64, scale=0.3)]),
    "rope": (lambda x: ops.rope(x, 1e6), lambda r: [_f32(r, 2, 7, 3, 64)]),
    "rope llama3": (lambda x: ops.rope(x, 5e5, scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
                    lambda r: [_f32(r, 2, 7, 3, 64)]),
    "attention": (ops.attention, lambda r: [_f32(r, 2, 9, 4, 64), _f32(r, 2, 9, 1, 64), _f32(r, 2, 9, 1, 64)]),
    "cross_entropy": (ops.cross_entropy, lambda r: [_f32(r, 2, 5, 301, scale=3), r.integers(0, 301, (2, 5))]),
    "linear": (ops.linear, lambda r: [_f32(r, 2, 7, 45), _f32(r, 61, 45), _f32(r, 61)]),
    "embedding": (ops.embedding, lambda r: [_f32(r, 50, 40), r.integers(0, 12, (3, 9))]),  # ids repeat
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_op_kernel_path_matches_the_reference(name, kernels):
    fn, make = CASES[name]
    arrays = make(np.random.default_rng(1))
    reference = run(fn, arrays)
    launched = kernels()
    for got, want in zip(run(fn, arrays), reference, strict=True):
        close(got, want)
    assert launched == {"matmul_backward" if name == "linear" else name.split()[0]}


def test_embedding_gradient_has_the_cpus_bits_on_the_kernel_path(kernels):
    """kernels/embedding.cu adds each row's gradients in position order, as NumPy's add.at does:
    the same bits, with no atomics to vary them from run to run."""
    rng = np.random.default_rng(2)
    W, ids = _f32(rng, 50, 40), rng.integers(0, 12, (4, 33))
    reference = run(ops.embedding, [W, ids])[1]
    kernels()
    first, second = (run(ops.embedding, [W, ids])[1] for _ in range(2))
    assert first.tobytes() == reference.tobytes() == second.tobytes()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_model_steps_on_the_kernel_path_match_the_reference(kernels, family):
    """Loss, every gradient and the weights after two SGD steps of a whole model (hd 64, GQA 2:1,
    q/k/v biases or Qwen3's q/k norms, tied head): every kernel in one graph."""
    cfg = ModelConfig(family=family, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
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
    assert launched == {"swiglu", "rmsnorm", "rope", "attention", "cross_entropy", "matmul_backward",
                        "embedding"}
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for name in ref_grads:
        close(grads[name], ref_grads[name])
        close(weights[name], ref_weights[name])


@pytest.mark.numerics
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


# ---- mixed precision: bf16 activations, fp32 parameters, on the same kernel path ----

def test_bf16_rounding_is_torchs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-40, 39, 10_000),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45, 1.00390625, 1.01171875],
                                 dtype=np.float32)]).astype(np.float32)  # ties to even: 1 + 2^-8, 1 + 3 * 2^-8
    got = backend.to_bf16(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(backend.from_bf16(got[~finite])).all()
    np.testing.assert_array_equal(backend.from_bf16(got)[finite], torch.from_numpy(want.view(np.int16)).view(
        torch.bfloat16).float().numpy()[finite])  # widening is exact


def bf16_values(a):
    """a rounded to bf16 but kept in fp32: the same numbers the bf16 path starts from."""
    return backend.from_bf16(backend.to_bf16(a))


def rel(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_fp32_on_the_same_values(kernels, bias, monkeypatch):
    rng = np.random.default_rng(7)
    x, W, b, gy = bf16_values(_f32(rng, 2, 7, 45)), _f32(rng, 61, 45), _f32(rng, 61), bf16_values(_f32(rng, 2, 7, 61))
    ref = [Tensor(a.copy(), requires_grad=True) for a in (x, W, b)]
    y_ref = ops.linear(*ref[:2], ref[2] if bias else None)
    y_ref.backward(gy)
    kernels()
    for route in ("cublas", "kernels"):
        monkeypatch.setattr(backend, "matmul_backward", route)
        t = [Tensor(backend.to_bf16(x), requires_grad=True), Tensor(W.copy(), requires_grad=True),
             Tensor(b.copy(), requires_grad=True)]
        y = ops.linear(t[0], t[1], t[2] if bias else None)
        y.backward(backend.to_bf16(gy))
        assert y.data.dtype == backend.BF16 and t[0].grad.dtype == backend.BF16
        assert t[1].grad.dtype == np.float32 and (not bias or t[2].grad.dtype == np.float32)
        assert rel(backend.from_bf16(y.data), y_ref.data) < 1e-2  # W rounded to bf16, y rounded once
        assert rel(backend.from_bf16(t[0].grad), ref[0].grad) < 1e-2
        assert rel(t[1].grad, ref[1].grad) < 1e-6  # dW = G^T X on exact bf16 values, accumulated in fp32
        if bias:
            assert rel(t[2].grad, ref[2].grad) < 1e-6


@pytest.mark.parametrize("ignored", [False, True])
def test_bf16_head_over_chunks_matches_fp32_on_the_same_values(kernels, monkeypatch, ignored):
    """The bf16 head in chunks of 3 rows (the softmax kernel writes dz in bf16, dx's rows are
    written by their GEMM, dW is summed over the chunks by the GEMM itself): the loss, dx and dW of
    the fp32 head on the same values, within the rounding of dz to bf16. With targets ignored
    (-100), their rows never reach the head: its GEMMs see only the others, and their dx is 0."""
    from minitrain.gpu import gemm

    rng = np.random.default_rng(5)
    x, W, t = bf16_values(_f32(rng, 2, 7, 40)), _f32(rng, 97, 40), rng.integers(0, 97, (2, 7))
    if ignored:
        t[0, :4] = t[1, 5:] = -100
    ref = [Tensor(x.copy(), requires_grad=True), Tensor(bf16_values(W), requires_grad=True)]
    loss_ref = ops.linear_cross_entropy(*ref, t, chunk_rows=3)
    loss_ref.backward()
    kernels()
    rows, matmul = [], gemm.matmul
    monkeypatch.setattr(gemm, "matmul", lambda a, b, *args, **kw: rows.append(a.shape) or matmul(a, b, *args, **kw))
    with backend.precision("bf16"):
        got = [Tensor(backend.to_bf16(x), requires_grad=True), Tensor(W.copy(), requires_grad=True)]
        loss = ops.linear_cross_entropy(*got, t, chunk_rows=3)
        loss.backward()
    assert abs(float(loss.data) - float(loss_ref.data)) < 1e-6 * float(loss_ref.data)
    assert rel(backend.from_bf16(got[0].grad), ref[0].grad) < 1e-2
    assert rel(got[1].grad, ref[1].grad) < 1e-2
    assert sum(m for m, k in rows if k == 40) == (t != -100).sum()  # the logits' GEMMs: the target rows only
    assert not backend.from_bf16(got[0].grad)[t == -100].any()


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_model_in_bf16_tracks_fp32(kernels, family):
    """A whole model with bf16 activations on the kernels: fp32 master weights and gradients, the
    loss and every gradient within bf16 rounding of the fp32 reference run, and AdamW steps later
    the loss still tracks it."""
    cfg = ModelConfig(family=family, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=257,
                      max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=family != "llama")
    ids = np.random.default_rng(8).integers(0, 257, (2, 9))

    def train(precision):
        with backend.precision(precision):
            model = Model.from_scratch(cfg, seed=9)
            opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
            losses, first_grads = [], None
            for _ in range(3):
                for p in model.parameters():
                    p.zero_grad()
                loss = model.loss(ids[:, :-1], ids[:, 1:])
                loss.backward()
                first_grads = first_grads or {n: t.grad.copy() for n, t in model.params.items()}
                opt.step()
                losses.append(float(loss.data))
            logits = model.forward(ids).data
            return losses, first_grads, model, logits

    ref_losses, ref_grads, _, ref_logits = train("fp32")  # the NumPy reference ops
    launched = kernels()
    losses, grads, model, logits = train("bf16")
    assert {"swiglu", "rmsnorm", "rope", "attention", "cross_entropy"} <= launched
    assert all(t.data.dtype == np.float32 and grads[n].dtype == np.float32 for n, t in model.params.items())
    # Qwen3's q/k norms give q and k unit RMS from the first step (without them a from-scratch
    # model's scores are near 0 and its attention near uniform): the scores are then O(1) and carry
    # bf16's rounding of q and k (2^-8 relative, times |q||k|/sqrt(hd) ~ sqrt(hd)) into the softmax
    assert logits.dtype == np.float32 and rel(logits, ref_logits) < (3e-2 if cfg.qk_norm else 2e-2)
    # every weight's bf16 copy is the weight rounded, as AdamW wrote it (none for the biases, added in
    # fp32, nor for an untied embedding, whose rows are gathered in fp32)
    assert {n for n, t in model.params.items() if t.bf16 is None} == {n for n in model.params if n.endswith(".bias")} \
        | ({"model.embed_tokens.weight"} if family == "llama" else set())
    for name, t in model.params.items():
        assert t.bf16 is None or t.bf16.tobytes() == backend.to_bf16(t.data).tobytes(), name
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-3)
    assert losses[-1] < losses[0] - 0.1  # it learns
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 5e-2, name


def test_cast_backward_is_the_cast_back():
    """Rounding is differentiated straight through (no finite-difference check applies to a
    rounding): to bf16, dx = fp32(dy); to fp32, dx = bf16(dy)."""
    x = Tensor(_f32(np.random.default_rng(10), 3, 5), requires_grad=True)
    y = ops.cast(ops.cast(x, "bf16"), "fp32")
    np.testing.assert_array_equal(y.data, bf16_values(x.data))
    gy = _f32(np.random.default_rng(11), 3, 5)
    y.backward(gy)
    np.testing.assert_array_equal(x.grad, bf16_values(gy))
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        ops.cast(x, "fp8")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_packed_window_on_the_kernels_computes_each_conversation_as_if_alone(kernels, precision):
    """The attention kernels with per-query first keys (attention.cu in fp32, the tensor cores in
    bf16): a packed window's logits are each conversation's alone, within the precision's rounding
    (float64 on the NumPy path: tests/test_chat.py)."""
    cfg = ModelConfig(family="qwen2", hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=96, vocab_size=257,
                      max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    rng = np.random.default_rng(3)
    convs = [rng.integers(0, 257, n) for n in (70, 9, 51)]  # one past a 64-row tile, then two more
    ids = np.concatenate(convs)[None]
    positions = np.concatenate([np.arange(len(c)) for c in convs])[None]
    launched = kernels()
    with backend.precision(precision):
        model = Model.from_scratch(cfg, seed=4)
        packed = model.forward(ids, positions=positions).data[0]
        alone = np.concatenate([model.forward(c[None]).data[0] for c in convs])
    assert "attention_mma" in launched if precision == "bf16" else "attention" in launched
    assert rel(packed, alone) < (1e-5 if precision == "fp32" else 2e-2)
    assert rel(packed[70:], alone[70:]) < (1e-5 if precision == "fp32" else 2e-2)  # the later conversations too
