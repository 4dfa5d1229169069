"""Float64 central-difference checks of every op's backward (the Chainer `check_backward` standard).

For a case y = f(x_1, ..., x_k) pick a random output gradient gy and let L(x) = sum(y * gy).
Backward gives the analytic grad_i = dL/dx_i. Two numerical checks compare it with L itself:

1. Random direction: for a random d (unit norm over all inputs together),
       (L(x + eps d) - L(x - eps d)) / (2 eps)   ~=   sum_i <grad_i, d_i>
2. Element by element (small shapes): every element's own central difference ~= grad_i[element].

Both pass when |analytic - numeric| <= ATOL + RTOL * |numeric| everywhere. The reported relative
error is max|analytic - numeric| / max(max|numeric|, ATOL): relative to the gradient's scale, and
not blown up where a gradient is exactly zero (e.g. dq of attention at T = 1). Inputs are fed as
non-contiguous views (every stride doubled) to catch code that assumes a memory layout, and the
check fails if a backward modifies its inputs.
"""

from dataclasses import dataclass
from typing import Callable

import numpy

from minitrain import backend, ops
from minitrain.autograd import Tensor, no_grad
from minitrain.config import ModelConfig, RopeScaling, tensor_table
from minitrain.model import Model, _pack
from minitrain.ops.activations import SiLU, SwiGLU, SwiGLUPacked
from minitrain.ops.attention import Attention
from minitrain.ops.basic import Add, Mean, Mul, Reshape, Sum, Transpose
from minitrain.ops.cross_entropy import CrossEntropy, LinearCrossEntropy
from minitrain.ops.distill import LinearDistillation
from minitrain.ops.dpo import DPOLoss
from minitrain.ops.embedding import Embedding
from minitrain.ops.linear import Linear
from minitrain.ops.lora import LoRALinear
from minitrain.ops.packed import Columns, Concat
from minitrain.ops.recompute import Recompute
from minitrain.ops.rmsnorm import RMSNorm
from minitrain.ops.rope import RoPE
from minitrain.ops.sequence_logprob import LinearSequenceLogprob

EPS, ATOL, RTOL = 1e-3, 1e-5, 1e-4
FROZEN_W = numpy.random.default_rng(7).standard_normal((5, 6))  # a constant, not an input: no dW
TEACHER = numpy.random.default_rng(8)
TEACHER_X, TEACHER_W = TEACHER.standard_normal((1, 5, 4)), 2 * TEACHER.standard_normal((9, 4))  # constants: no gradient
# Llama 3 scaling at hd 16, theta 1e4: wavelengths 6.3 and 20 kept (< 256/8), 63 and 199
# interpolated, 628 and longer stretched 4x (> 256/1)
LLAMA3 = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=8.0, original_max_position_embeddings=256)
# Qwen3: q/k norms, 4 heads of 4 on a hidden size of 8 (GQA 2:1), tied
QWEN3 = ModelConfig(family="qwen3", hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=4, intermediate_size=6, vocab_size=11, max_position_embeddings=16,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
REFERENCE = numpy.random.default_rng(9).standard_normal(6) - 8  # a DPO reference's log-probabilities: 3 pairs
PACKED_STARTS = numpy.array([[0, 0, 0, 3, 3, 3, 3], [0, 0, 2, 2, 4, 4, 4]])  # each query's first key
ELEMENTWISE_MAX = 3000  # differentiable elements up to which the element-by-element check runs


@dataclass
class Case:
    op: str
    fn: Callable  # fn(*inputs) -> Tensor; float inputs arrive as Tensors, integer arrays as they are
    make_inputs: Callable  # rng -> dict name -> array; float arrays are differentiated
    functions: tuple  # the Function classes the case exercises
    note: str = ""

    def inputs(self, seed):
        with backend.precision("fp64"):
            return self.make_inputs(numpy.random.default_rng(seed))


@dataclass
class Result:
    case: Case
    shapes: str
    max_abs: float
    max_rel: float
    passed: bool
    failure: str = ""


def noncontiguous(a):
    """The same values as a view with every stride doubled (never C-contiguous for ndim >= 1)."""
    if a.ndim == 0:
        return a
    buf = backend.xp.zeros(a.shape + (2,), dtype=a.dtype)
    buf[..., 0] = a
    return buf[..., 0]


def check(case, seed=0, elementwise=True):
    """Run both checks of one case; returns a Result with the worst errors seen."""
    xp = backend.xp
    rng = numpy.random.default_rng(seed + 1000)
    named = case.inputs(seed)
    names = list(named)
    arrays = [xp.asarray(a) for a in named.values()]
    diff = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"]
    shapes = " ".join(f"{n}{tuple(a.shape)}" for i, (n, a) in enumerate(zip(names, arrays))
                      if len(diff) <= 4 or i not in diff)
    if len(diff) > 4:  # a whole model: summarize its parameters
        shapes = f"{len(diff)} tensors ({sum(arrays[i].size for i in diff)} values) {shapes}"

    def run(arrs, grad):
        args = [Tensor(noncontiguous(a), requires_grad=grad) if i in diff else noncontiguous(a)
                for i, a in enumerate(arrs)]
        return args, case.fn(*args)

    args, y = run(arrays, grad=True)
    gy = xp.asarray(rng.standard_normal(y.shape))
    raw = [a.data if isinstance(a, Tensor) else a for a in args]
    before = [a.copy() for a in raw]
    y.backward(gy)
    analytic = [args[i].grad if args[i].grad is not None else xp.zeros(arrays[i].shape) for i in diff]
    for n, b, a in zip(names, before, raw):
        if not bool(xp.array_equal(b, a)):
            return Result(case, shapes, float("inf"), float("inf"), False, f"backward modified input {n}")

    def loss(arrs):
        with no_grad():
            return float((run(arrs, grad=False)[1].data * gy).sum())

    # 1. random direction, scaled to unit norm over all inputs together (as Chainer does)
    dirs = [xp.asarray(rng.standard_normal(arrays[i].shape)) for i in diff]
    norm = sum(float((d * d).sum()) for d in dirs) ** 0.5
    dirs = [d / norm for d in dirs]

    def shifted(sign):
        out = list(arrays)
        for i, d in zip(diff, dirs):
            out[i] = arrays[i] + sign * EPS * d
        return out

    numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * EPS)
    exact = float(sum(float((a * d).sum()) for a, d in zip(analytic, dirs)))
    max_abs = abs(exact - numeric)
    max_rel = max_abs / max(abs(numeric), ATOL)
    if max_abs > ATOL + RTOL * abs(numeric):
        return Result(case, shapes, max_abs, max_rel, False,
                      f"random direction: analytic {exact:.9g} vs numeric {numeric:.9g}")

    # 2. element by element
    if elementwise and sum(arrays[i].size for i in diff) <= ELEMENTWISE_MAX:
        for i, a in zip(diff, analytic):
            x = arrays[i] = arrays[i].copy()
            num = xp.zeros(x.shape)
            for idx in numpy.ndindex(*x.shape):
                orig = float(x[idx])
                x[idx] = orig + EPS
                up = loss(arrays)
                x[idx] = orig - EPS
                down = loss(arrays)
                x[idx] = orig
                num[idx] = (up - down) / (2 * EPS)
            err = xp.abs(a - num)
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float(err.max()) / max(float(xp.abs(num).max()), ATOL))
            bad = err > ATOL + RTOL * xp.abs(num)
            if bool(bad.any()):
                where = tuple(int(j) for j in numpy.argwhere(backend.to_numpy(bad))[0])
                return Result(case, shapes, max_abs, max_rel, False,
                              f"d/d{names[i]}{list(where)}: analytic {float(a[where]):.9g} vs numeric {float(num[where]):.9g}")
    return Result(case, shapes, max_abs, max_rel, True)


# ---------------------------------------------------------------------------------------------
# The cases: every op, with the edge cases that break real implementations.


def _normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def _ints(rng, high, *shape):
    return rng.integers(0, high, size=shape)


def cases():
    """Every op's gradient-check cases (used by the tests and by `minitrain gradcheck`)."""
    C = Case
    return [
        # glue ops, with broadcasting both ways
        C("add", ops.add, lambda r: {"a": _normal(r, 2, 3, 4), "b": _normal(r, 4)}, (Add,)),
        C("add", ops.add, lambda r: {"a": _normal(r, 2, 1, 4), "b": _normal(r, 3, 1)}, (Add,)),
        C("mul", ops.mul, lambda r: {"a": _normal(r, 2, 3, 4), "b": _normal(r, 3, 1)}, (Mul,)),
        C("mul", lambda a: ops.mul(a, 0.37), lambda r: {"a": _normal(r, 3, 5)}, (Mul,), "times a constant"),
        C("sum", lambda x: ops.sum(x, axis=1), lambda r: {"x": _normal(r, 2, 3, 4)}, (Sum,), "axis=1"),
        C("sum", lambda x: ops.sum(x, axis=(0, 2), keepdims=True), lambda r: {"x": _normal(r, 2, 3, 4)}, (Sum,),
          "axis=(0,2) keepdims"),
        C("sum", ops.sum, lambda r: {"x": _normal(r, 3, 4)}, (Sum,), "all"),
        C("mean", lambda x: ops.mean(x, axis=-1), lambda r: {"x": _normal(r, 2, 3, 4)}, (Mean,), "axis=-1"),
        C("mean", ops.mean, lambda r: {"x": _normal(r, 2, 5)}, (Mean,), "all"),
        C("reshape", lambda x: ops.reshape(x, (6, 4)), lambda r: {"x": _normal(r, 2, 3, 4)}, (Reshape,)),
        C("transpose", lambda x: ops.transpose(x, (0, 2, 1, 3)), lambda r: {"x": _normal(r, 2, 3, 4, 2)},
          (Transpose,), "(0,2,1,3)"),
        C("transpose", ops.transpose, lambda r: {"x": _normal(r, 3, 5)}, (Transpose,), "reverse"),
        # linear: any leading dims, with and without bias, a single token
        C("linear", ops.linear, lambda r: {"x": _normal(r, 2, 3, 5), "W": _normal(r, 4, 5), "b": _normal(r, 4)},
          (Linear,)),
        C("linear", ops.linear, lambda r: {"x": _normal(r, 7, 5), "W": _normal(r, 3, 5)}, (Linear,), "no bias"),
        C("linear", ops.linear, lambda r: {"x": _normal(r, 1, 1, 4), "W": _normal(r, 6, 4), "b": _normal(r, 6)},
          (Linear,), "T=1"),
        # LoRA: W + s B A with W and b differentiated too, a frozen W (no dW), dropout's mask
        C("lora_linear", lambda x, W, b, A, B: ops.lora_linear(x, W, b, A, B, scale=2.0),
          lambda r: {"x": _normal(r, 2, 3, 5), "W": _normal(r, 4, 5), "b": _normal(r, 4), "A": _normal(r, 2, 5),
                     "B": _normal(r, 4, 2)}, (LoRALinear,), "rank 2, alpha/R = 2"),
        C("lora_linear", lambda x, A, B, keep: ops.lora_linear(x, backend.xp.asarray(FROZEN_W), None, A, B, scale=0.5,
                                                               keep=keep, p=0.25),
          lambda r: {"x": _normal(r, 7, 6), "A": _normal(r, 3, 6), "B": _normal(r, 5, 3),
                     "keep": (r.random((7, 6)) > 0.25).astype(numpy.int8)}, (LoRALinear,), "frozen W, dropout 0.25"),
        # embedding: repeated ids must accumulate
        C("embedding", ops.embedding,
          lambda r: {"W": _normal(r, 10, 4), "ids": numpy.array([[1, 3, 3, 0, 9], [3, 1, 1, 1, 7]])},
          (Embedding,), "repeated ids"),
        C("embedding", ops.embedding, lambda r: {"W": _normal(r, 6, 3), "ids": numpy.array([[5]])}, (Embedding,), "T=1"),
        # RMSNorm: weights away from 1 so a dropped term shows
        C("rmsnorm", lambda x, w: ops.rmsnorm(x, w, 1e-6),
          lambda r: {"x": _normal(r, 2, 3, 8), "w": 1 + _normal(r, 8, scale=0.5)}, (RMSNorm,), "eps=1e-6"),
        C("rmsnorm", lambda x, w: ops.rmsnorm(x, w, 1e-5),
          lambda r: {"x": _normal(r, 1, 1, 5), "w": _normal(r, 5)}, (RMSNorm,), "T=1, eps=1e-5"),
        C("rmsnorm", lambda x, w: ops.rmsnorm(x, w, 1e-6),
          lambda r: {"x": _normal(r, 2, 3, 4, 6), "w": 1 + _normal(r, 6, scale=0.5)}, (RMSNorm,),
          "per head (Qwen3's q/k norm)"),
        # RoPE: rotate_half layout, both thetas, explicit positions
        C("rope", lambda x: ops.rope(x, 10000.0), lambda r: {"x": _normal(r, 2, 5, 3, 8)}, (RoPE,), "theta=1e4"),
        C("rope", lambda x: ops.rope(x, 1e6), lambda r: {"x": _normal(r, 1, 1, 2, 4)}, (RoPE,), "theta=1e6, T=1"),
        C("rope", lambda x: ops.rope(x, 10000.0, positions=numpy.array([3, 7, 8, 100])),
          lambda r: {"x": _normal(r, 1, 4, 2, 6)}, (RoPE,), "positions 3,7,8,100"),
        C("rope", lambda x: ops.rope(x, 10000.0, positions=numpy.array([0, 5, 90, 400]), scaling=LLAMA3),
          lambda r: {"x": _normal(r, 1, 4, 2, 16)}, (RoPE,), "llama3 scaling, every band"),
        # causal GQA attention: ratios 1:1, 4:1, 7:1, batch > 1, T = 1 (only the masked corner)
        C("attention", ops.attention, lambda r: _qkv(r, B=2, T=5, nH=2, nKV=2, hd=4), (Attention,), "GQA 1:1"),
        C("attention", ops.attention, lambda r: _qkv(r, B=2, T=5, nH=8, nKV=2, hd=4), (Attention,), "GQA 4:1"),
        C("attention", ops.attention, lambda r: _qkv(r, B=2, T=4, nH=7, nKV=1, hd=4), (Attention,), "GQA 7:1"),
        C("attention", ops.attention, lambda r: _qkv(r, B=1, T=1, nH=4, nKV=1, hd=4), (Attention,), "T=1"),
        C("attention", ops.attention, lambda r: _qkv(r, B=1, T=33, nH=14, nKV=2, hd=8), (Attention,),
          "GQA 7:1 T=33 (direction only)"),
        C("attention", lambda q, k, v: ops.attention(q, k, v, starts=PACKED_STARTS),
          lambda r: _qkv(r, B=2, T=7, nH=4, nKV=2, hd=4), (Attention,), "packed: conversations 3+4 and 2+2+3"),
        # activations
        C("silu", ops.silu, lambda r: {"x": _normal(r, 3, 7, scale=4.0)}, (SiLU,)),
        C("swiglu", ops.swiglu, lambda r: {"a": _normal(r, 2, 3, 6, scale=3.0), "u": _normal(r, 2, 3, 6)},
          (SwiGLU,)),
        C("swiglu_packed", ops.swiglu_packed, lambda r: {"gu": _normal(r, 2, 3, 12, scale=3.0)}, (SwiGLUPacked,),
          "[gate | up] rows"),
        # the fused projections' ops (ops/packed.py): weights concatenated, an output split in blocks
        C("concat", lambda a, b, c: Concat.apply(a, b, c),
          lambda r: {"a": _normal(r, 3, 5), "b": _normal(r, 1, 5), "c": _normal(r, 2, 5)}, (Concat,)),
        C("linear_split", lambda x, W, b: _blocks_loss(ops.linear_split(x, W, b, (4, 2, 2))),
          lambda r: {"x": _normal(r, 2, 3, 5), "W": _normal(r, 8, 5), "b": _normal(r, 8)}, (Linear, Columns),
          "blocks 4, 2, 2"),
        # cross-entropy: mean over tokens, repeated targets, T=1, huge logits (stability)
        C("cross_entropy", ops.cross_entropy,
          lambda r: {"logits": _normal(r, 2, 3, 11, scale=2.0), "targets": numpy.array([[1, 1, 10], [0, 1, 5]])},
          (CrossEntropy,)),
        C("cross_entropy", ops.cross_entropy,
          lambda r: {"logits": _normal(r, 1, 1, 5), "targets": numpy.array([[4]])}, (CrossEntropy,), "T=1"),
        C("cross_entropy", ops.cross_entropy,
          lambda r: {"logits": 1000 + _normal(r, 4, 9), "targets": _ints(r, 9, 4)}, (CrossEntropy,),
          "logits near 1000"),
        C("cross_entropy", ops.cross_entropy,
          lambda r: {"logits": _normal(r, 2, 3, 7), "targets": numpy.array([[1, -100, 6], [-100, 0, 0]])},
          (CrossEntropy,), "ignored targets (-100)"),
        # the lm_head and the loss fused, over chunks of 2 rows (the (N, V) logits never whole)
        C("linear_cross_entropy", lambda x, W, t: ops.linear_cross_entropy(x, W, t, chunk_rows=2),
          lambda r: {"x": _normal(r, 1, 5, 6), "W": _normal(r, 9, 6), "targets": numpy.array([[0, 8, 8, 3, 0]])},
          (LinearCrossEntropy,), "chunks of 2 rows"),
        C("linear_cross_entropy", lambda x, W, t: ops.linear_cross_entropy(x, W, t, chunk_rows=2),
          lambda r: {"x": _normal(r, 1, 5, 6), "W": _normal(r, 9, 6), "targets": numpy.array([[-100, 8, -100, 3, 0]])},
          (LinearCrossEntropy,), "ignored targets, chunks of 2 rows"),
        # distillation: the head, CE and T^2 KL toward a fixed teacher (its own hidden size), fused
        C("linear_distillation", lambda x, W, t: ops.linear_distillation(
            x, W, backend.xp.asarray(TEACHER_X), backend.xp.asarray(TEACHER_W), t, 0.7, 2.0, chunk_rows=2),
          lambda r: {"x": _normal(r, 1, 5, 6), "W": _normal(r, 9, 6), "targets": numpy.array([[0, 8, 8, 3, 0]])},
          (LinearDistillation,), "w 0.7, T 2, chunks of 2 rows"),
        C("linear_distillation", lambda x, W, t: ops.linear_distillation(
            x, W, backend.xp.asarray(TEACHER_X), backend.xp.asarray(TEACHER_W), t, 0.4, 1.5, chunk_rows=2),
          lambda r: {"x": _normal(r, 1, 5, 6), "W": _normal(r, 9, 6), "targets": numpy.array([[0, -100, 8, -100, -100]])},
          (LinearDistillation,), "ignored targets, w 0.4, T 1.5"),
        C("linear_distillation", lambda x, W, t: ops.linear_distillation(
            x, W, backend.xp.asarray(TEACHER_X[:, :3]), backend.xp.asarray(TEACHER_W), t, 1.0, 0.5),
          lambda r: {"x": _normal(r, 3, 6), "W": _normal(r, 9, 6), "targets": numpy.array([4, 4, 1])},
          (LinearDistillation,), "w 1 (KL only), T 0.5"),
        # DPO: each sequence's summed target log-probabilities, the head fused; the loss on them
        C("linear_sequence_logprob", lambda x, W, t: ops.linear_sequence_logprob(x, W, t, chunk_rows=3),
          lambda r: {"x": _normal(r, 3, 4, 6), "W": _normal(r, 9, 6),
                     "targets": numpy.array([[-100, 8, 8, 3], [-100, -100, 0, -100], [-100, -100, -100, -100]])},
          (LinearSequenceLogprob,), "prompt/padding masked, 3-row chunks"),
        C("linear_sequence_logprob", ops.linear_sequence_logprob,
          lambda r: {"x": _normal(r, 2, 3, 5), "W": _normal(r, 7, 5), "targets": _ints(r, 7, 2, 3)},
          (LinearSequenceLogprob,), "every position a target"),
        C("dpo_loss", lambda p: ops.dpo_loss(p, backend.xp.asarray(REFERENCE), 0.1),
          lambda r: {"logps": REFERENCE + _normal(r, 6, scale=3.0)}, (DPOLoss,), "3 pairs, beta 0.1"),
        C("dpo_loss", lambda p: ops.dpo_loss(p, backend.xp.asarray(REFERENCE), 2.5),
          lambda r: {"logps": REFERENCE + _normal(r, 6, scale=40.0)}, (DPOLoss,), "beta 2.5, margins far out"),
        # whole tiny models of each family: every parameter, embedding to loss
        _model_case(ModelConfig(family="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=4, intermediate_size=12, vocab_size=13,
                                max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=False), "llama GQA 4:1 untied"),
        _model_case(ModelConfig(family="qwen2", hidden_size=14, num_hidden_layers=1, num_attention_heads=7,
                                num_key_value_heads=1, head_dim=2, intermediate_size=10, vocab_size=11,
                                max_position_embeddings=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True), "qwen2 GQA 7:1 bias tied"),
        _model_case(ModelConfig(family="qwen2", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=4, intermediate_size=6, vocab_size=11,
                                max_position_embeddings=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True), "qwen2, projections packed", packed=True),
        _model_case(QWEN3, "qwen3 q/k norms, head_dim apart, tied"),
        _model_case(ModelConfig(family="llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, intermediate_size=6, vocab_size=11,
                                max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=False, rope_scaling=LLAMA3), "llama3 scaling, untied"),
        # the same models with blocks recomputed in the backward
        *(_model_case(ModelConfig(family="llama", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=4, intermediate_size=12, vocab_size=13,
                                  max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False), f"llama, --recompute {part}", recompute=part)
          for part in ("attention", "mlp", "layer")),
        _model_case(ModelConfig(family="qwen2", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=4, intermediate_size=6, vocab_size=11,
                                max_position_embeddings=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True), "qwen2 packed, --recompute layer", packed=True,
                    recompute="layer"),
        _model_case(QWEN3, "qwen3 packed, --recompute attention", packed=True, recompute="attention"),
    ]


def _blocks_loss(blocks):
    """A scalar that weighs each block differently (a block's columns mixed up would show)."""
    q, k, v = blocks
    return ops.add(ops.sum(ops.mul(q, q)), ops.add(ops.mul(ops.sum(k), 3.0), ops.sum(ops.mul(v, v))))


def _model_case(cfg, note, packed=False, recompute="none"):
    """The loss of a whole model as a function of every parameter. Non-trivial weights: std 0.3
    matrices, biases and norm weights away from 0 and 1. `packed`: with the projections packed,
    as the kernel path runs them (q, k, v one linear split in three; gate, up one linear);
    `recompute`: the blocks whose activations the backward recomputes (ops/recompute.py)."""
    table = tensor_table(cfg)

    def make(rng):
        arrays = {name: (1 + 0.3 * _normal(rng, *shape) if name.endswith("norm.weight")
                         else _normal(rng, *shape, scale=0.3))
                  for name, shape in table.items()}
        arrays["ids"] = _ints(rng, cfg.vocab_size, 2, 5)
        arrays["targets"] = _ints(rng, cfg.vocab_size, 2, 5)
        return arrays

    def loss(*args):
        *params, ids, targets = args
        model = Model(cfg, dict(zip(table, params)))
        if packed:
            model.packed = _pack(cfg, model.params)
        model.recompute = recompute
        return model.loss(ids, targets)

    return Case("model", loss, make, (Embedding, RMSNorm, Linear, Reshape, RoPE, Attention, Add,
                                      *((SwiGLUPacked, Concat, Columns) if packed else (SwiGLU,)), LinearCrossEntropy,
                                      *((Recompute,) if recompute != "none" else ())),
                note)


def _qkv(rng, B, T, nH, nKV, hd):
    return {"q": _normal(rng, B, T, nH, hd), "k": _normal(rng, B, T, nKV, hd), "v": _normal(rng, B, T, nKV, hd)}


def op_names():
    return sorted({c.op for c in cases()})


def run_all(selected=None):
    """Check every case of the selected ops (all when None); returns the list of Results."""
    return [check(c) for c in cases() if not selected or c.op in selected]


def format_table(results):
    rows = [("op", "case", "inputs", "max abs err", "max rel err", "result")]
    for r in results:
        rows.append((r.case.op, r.case.note or "-", r.shapes, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                     "PASS" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        if not r.passed:
            lines.append(f"FAIL {r.case.op} ({r.case.note or r.shapes}): {r.failure}")
    return "\n".join(lines)
