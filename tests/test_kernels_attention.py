"""kernels/attention.cu (and, for bf16, attention_mma.cu: the tensor cores' mma emulated from its
fragment layout) run on the CPU through kernels/cuda_emu.h, launched by minitrain.gpu.attention
(the GPU path's own grids and blocks), against minitrain's attention op in float64: forward o and
lse, backward D, dq, dk, dv, on sizes that are not multiples of the tiles, with every kind of
head grouping, in both thread schedules. Then planted bugs, each of which the check must catch."""

import numpy as np
import pytest

from kernel_emu import launcher

from minitrain import ops
from minitrain.autograd import Tensor
from minitrain.backend import from_bf16, to_bf16
from minitrain.gpu import attention

# Tiles: forward 64 (hd 64) or 32 (hd 128) query rows x 32 keys; backward 32 x 32 or 16 x 16.
CASES = [  # B, T, nH, nKV, hd, dtype
    (2, 67, 8, 2, 64, "f32"),  # 4:1, T past two tiles in every kernel
    (1, 70, 7, 1, 128, "f32"),  # 7:1
    (2, 5, 7, 1, 64, "bf16"),  # 7:1, T inside one tile
    (2, 37, 4, 4, 128, "bf16"),  # 1:1
    (2, 1, 4, 2, 64, "f32"),  # T = 1: a single row and key
    (1, 1, 2, 1, 128, "bf16"),
    (2, 33, 1, 1, 128, "f32"),  # one head; T = 33 = one past a key tile
    (1, 67, 4, 1, 64, "bf16"),  # the tensor-core backward (hd 64): 4:1, T past one 64-row tile
    (1, 130, 2, 1, 64, "bf16"),  # 2:1, T past two tiles
    (1, 70, 2, 1, 128, "bf16"),  # the tensor-core backward at hd 128: 2:1, T past one 64-row tile
]
TOL = {"f32": 1e-5, "bf16": 1e-2}  # bf16: outputs rounded to bf16 (and D from the rounded o)
GUARD = 64  # elements after each output that no kernel may touch


def inputs(B, T, nH, nKV, hd, dtype, seed=0):
    """q, k, v, do as float32; for bf16, values exactly representable in bf16."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((B, T, n, hd)).astype(np.float32) for n in (nH, nKV, nKV, nH)]
    return [from_bf16(to_bf16(a)) for a in arrays] if dtype == "bf16" else arrays


def reference(q, k, v, do, starts=None):
    """o, lse, D, dq, dk, dv in float64: minitrain's attention op, and lse and D from its output.
    `starts` (B, T): a packed window's first visible key of each query."""
    q, k, v, do = (a.astype(np.float64) for a in (q, k, v, do))
    B, T, nH, hd = q.shape
    tensors = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    o = ops.attention(*tensors, starts=starts)
    o.backward(do)
    kh = np.repeat(k, nH // k.shape[2], axis=2)  # kv head of query head h: h // g
    s = np.einsum("bihd,bjhd->bhij", q, kh) / np.sqrt(hd)
    visible = np.tri(T, dtype=bool)[None, None]  # causal: key j <= query i
    if starts is not None:  # and j >= the start of i's conversation
        visible = visible & (np.arange(T)[None, None, None, :] >= starts[:, None, :, None])
    s = np.where(visible, s, -np.inf)
    mx = s.max(-1)
    lse = mx + np.log(np.exp(s - mx[..., None]).sum(-1))
    D = (do * o.data).sum(-1).transpose(0, 2, 1)
    return dict(o=o.data, lse=lse, D=D, dq=tensors[0].grad, dk=tensors[1].grad, dv=tensors[2].grad)


def run_kernels(run, q, k, v, do, dtype, backward=True, starts=None):
    """The kernels' results as float32 (decoded from bf16 where stored as bf16), and whether any
    kernel wrote past the end of an output. Every output starts as NaN (so each element must be
    written) and is followed in memory by GUARD elements that must stay NaN."""
    enc, dec = (to_bf16, from_bf16) if dtype == "bf16" else ((lambda a: a), (lambda a: a))
    q, k, v, do = (enc(a) for a in (q, k, v, do))
    B, T, nH, _ = q.shape
    guards = []

    def output(shape, kind=q.dtype):
        n = int(np.prod(shape))
        buf = np.full(n + GUARD, np.nan, np.float32)
        buf = to_bf16(buf) if kind == np.uint16 else buf
        guards.append((buf, n, buf[n:].copy()))
        return buf[:n].reshape(shape)

    o, lse = output(q.shape), output((B, nH, T), np.float32)
    attention.forward(run, q, k, v, o, lse, starts)
    got = dict(o=o, lse=lse)
    if backward:
        dq, dk, dv, D = output(q.shape), output(k.shape), output(v.shape), output((B, nH, T), np.float32)
        attention.backward(run, q, k, v, o, do, lse, dq, dk, dv, D, starts)
        got.update(D=D, dq=dq, dk=dk, dv=dv)
    overrun = any(buf[n:].tobytes() != guard.tobytes() for buf, n, guard in guards)
    return {name: a if a.dtype == np.float32 else dec(a) for name, a in got.items()}, overrun


def error(got, want):
    """Largest error relative to the reference's scale (at least 1)."""
    return np.abs(got - want).max() / max(np.abs(want).max(), 1.0)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,T,nH,nKV,hd,dtype", CASES)
def test_attention_kernels_match_reference(B, T, nH, nKV, hd, dtype, reverse):
    q, k, v, do = inputs(B, T, nH, nKV, hd, dtype)
    want = reference(q, k, v, do)
    got, overrun = run_kernels(launcher(reverse), q, k, v, do, dtype)
    assert not overrun, "a kernel wrote past the end of an output"
    for name, value in got.items():
        tol = 1e-5 if name == "lse" else TOL[dtype]  # lse is float32 whatever the inputs
        scale = max(np.abs(want[name]).max(), 1.0)
        np.testing.assert_allclose(value, want[name], rtol=tol, atol=tol * scale, err_msg=name)


def packed_starts(lengths):
    """(B, T) first visible key of each query for rows of conversations of these lengths."""
    return np.array([np.concatenate([np.full(n, sum(row[:i])) for i, n in enumerate(row)]) for row in lengths],
                    dtype=np.int64)


PACKED = [  # B, T, nH, nKV, hd, dtype, conversation lengths per row
    (2, 67, 4, 2, 64, "f32", [[20, 47], [3, 33, 31]]),
    (1, 40, 2, 1, 128, "f32", [[7, 17, 16]]),
    (2, 130, 2, 1, 64, "bf16", [[70, 60], [64, 1, 65]]),  # the tensor cores; a conversation starting past a tile
    (1, 70, 2, 1, 128, "bf16", [[66, 4]]),
]


@pytest.mark.parametrize("B,T,nH,nKV,hd,dtype,lengths", PACKED)
def test_packed_windows_match_reference(B, T, nH, nKV, hd, dtype, lengths):
    """Several conversations in a window: each query sees its own conversation's keys only (its
    first key from `starts`), forward and backward, against the float64 reference."""
    starts = packed_starts(lengths)
    q, k, v, do = inputs(B, T, nH, nKV, hd, dtype, seed=2)
    want = reference(q, k, v, do, starts)
    got, overrun = run_kernels(launcher(), q, k, v, do, dtype, starts=starts)
    assert not overrun, "a kernel wrote past the end of an output"
    for name, value in got.items():
        tol = 1e-5 if name == "lse" else TOL[dtype]
        scale = max(np.abs(want[name]).max(), 1.0)
        np.testing.assert_allclose(value, want[name], rtol=tol, atol=tol * scale, err_msg=name)


PACKED_PLANTS = {  # name: (source, old, new, case index, the result it must spoil)
    "forward: a conversation sees the one before": (
        "attention", "kj <= qi && kj >= first", "kj <= qi", 0, "o"),
    "dkdv stops before the queries that see its keys": (
        "attention", "if (first_key(starts, b, T, q0) >= k0 + BK) break;", "if (first_key(starts, b, T, q0) >= k0) break;",
        0, "dk"),
    "tensor cores: dq sees the conversation before": (
        "attention_mma", "i < T && j <= i && j >= first[r / 2]", "i < T && j <= i", 2, "dq"),
    "tensor cores: the forward's key tiles start at the wrong conversation": (
        "attention_mma", "s[n][r] = j <= row[r / 2] && j >= first[r / 2] ?", "s[n][r] = j <= row[r / 2] ?", 2, "o"),
    "tensor cores: dkdv's keys seen by the next conversation": (
        "attention_mma", "key[r / 2] <= j && key[r / 2] >= firsts[col]", "key[r / 2] <= j", 2, "dv"),
}


@pytest.mark.parametrize("name", PACKED_PLANTS)
def test_planted_bug_in_packed_attention_is_caught(name):
    source, old, new, case, spoiled = PACKED_PLANTS[name]
    B, T, nH, nKV, hd, dtype, lengths = PACKED[case]
    starts = packed_starts(lengths)
    q, k, v, do = inputs(B, T, nH, nKV, hd, dtype, seed=2)
    want = reference(q, k, v, do, starts)[spoiled]
    with np.errstate(invalid="ignore"):
        got, overrun = run_kernels(launcher(plant=(old, new), planted_in=source), q, k, v, do, dtype, starts=starts)
    assert overrun or not error(got[spoiled], want) <= TOL[dtype], f"planted bug not caught: {name}"


def test_launch_rejects_unsupported_shapes():
    q, k = np.zeros((1, 4, 6, 64), np.float32), np.zeros((1, 4, 4, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of nKV"):
        attention.forward(launcher(), q, k, k, q, np.zeros((1, 6, 4), np.float32))
    q = np.zeros((1, 4, 2, 32), np.float32)
    with pytest.raises(ValueError, match="hd in"):
        attention.forward(launcher(), q, q, q, q, np.zeros((1, 2, 4), np.float32))


PLANTS = {  # name: (old, new, B, T, nH, nKV, hd, the result it must spoil)
    "K tile read before it is loaded": (
        "__syncthreads();  // the K tile is loaded", "// no barrier", 1, 40, 1, 1, 64, "o"),
    "next Q tile loaded over the one in use": (
        "__syncthreads();  // Q, dO, P^T, dS^T consumed", "// no barrier", 1, 20, 2, 1, 128, "dk"),
    "diagonal masked": ("return kj <= qi && kj >= first;", "return kj < qi && kj >= first;", 1, 20, 1, 1, 64, "o"),
    "last key tile skipped": (  # T = 33: the last query row is the first key of a tile
        "k0 < q_end; k0 += BK) {  // visible key tiles", "k0 < q_end - 1; k0 += BK) {  // visible key tiles", 1, 33, 1, 1,
        128, "o"),
    "output not rescaled to the new row max": (
        "acc[i][c] *= alpha[i];", "", 1, 40, 1, 1, 64, "o"),
    "row T stored": ("if (t < T)", "if (t <= T)", 1, 20, 1, 1, 64, "o"),  # one row: within GUARD
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", PLANTS)
def test_planted_bug_is_caught(name, reverse):
    old, new, B, T, nH, nKV, hd, spoiled = PLANTS[name]
    q, k, v, do = inputs(B, T, nH, nKV, hd, "f32", seed=1)
    want = reference(q, k, v, do)[spoiled]
    with np.errstate(invalid="ignore"):
        got, overrun = run_kernels(launcher(reverse, plant=(old, new)), q, k, v, do, "f32", backward=spoiled != "o")
        assert overrun or not error(got[spoiled], want) <= TOL["f32"], f"planted bug not caught: {name}"


MMA_PLANTS = {  # kernels/attention_mma.cu (the bf16 forward): name: (old, new, B, T, nH, nKV, hd)
    "tiles read before they are loaded": ("__syncthreads();  // the K and V tiles are loaded", "", 1, 40, 1, 1, 64),
    "tiles overwritten while in use": ("__syncthreads();  // every warp is done with the tiles: the next ones may "
                                       "overwrite them", "", 1, 140, 1, 1, 64),
    "output not rescaled to the new row max": ("acc[n][r] *= alpha[r / 2];", ";", 1, 100, 1, 1, 128),
    "row maximum over half the quad": (
        "mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));", "", 1, 40, 2, 1, 64),
    "diagonal masked": ("j <= row[r / 2]", "j < row[r / 2]", 1, 20, 1, 1, 64),
    "V's fragment from the wrong key": ("(row + 9) * PITCH", "(row + 8) * PITCH", 1, 30, 1, 1, 64),
    "row T stored": ("if (row[i] < T)", "if (row[i] <= T)", 1, 20, 1, 1, 64),  # one row: within GUARD
}


# The tensor-core kernels' plants run in thread order only: each mma is a warp-wide sync point in the
# emulation, which makes these kernels its slowest (the reference cases above run both orders).
@pytest.mark.parametrize("name", MMA_PLANTS)
def test_planted_bug_in_the_tensor_core_forward_is_caught(name):
    old, new, B, T, nH, nKV, hd = MMA_PLANTS[name]
    q, k, v, do = inputs(B, T, nH, nKV, hd, "bf16", seed=1)
    want = reference(q, k, v, do)
    with np.errstate(invalid="ignore"):
        got, overrun = run_kernels(launcher(plant=(old, new)), q, k, v, do, "bf16", backward=False)
    assert overrun or not max(error(got["o"], want["o"]), error(got["lse"], want["lse"]) / 1e-3) <= TOL["bf16"], \
        f"planted bug not caught: {name}"


MMA_BACKWARD_PLANTS = {  # its backward (hd 64): name: (old, new, B, T, nH, nKV, the result it must spoil)
    "dq reads K and V before they are loaded": (
        "__syncthreads();  // K and V loaded: S, dP and dQ may read them", "", 1, 70, 1, 1, "dq"),
    "dq's K tile overwritten while in use": (
        "__syncthreads();  // every warp's dQ has read the K tile: the next one may overwrite it", "", 1, 130, 1, 1, "dq"),
    "dS without P": ("s[n][r] = p * (dp[n][r] - delta[r / 2]);", "s[n][r] = dp[n][r] - delta[r / 2];", 1, 40, 1, 1, "dq"),
    "dQ not scaled by c": ("acc, c, w0, T, qstride);", "acc, 1.0f, w0, T, qstride);", 1, 40, 1, 1, "dq"),
    "one query head of the group": ("h < (kvh + 1) * group", "h < kvh * group + 1", 1, 40, 2, 1, "dk"),
    "diagonal masked in dkdv": ("key[r / 2] <= j", "key[r / 2] < j", 1, 40, 1, 1, "dv"),
    "dkdv's Q tile overwritten while in use": (
        "__syncthreads();  // every warp is done with the Q and dO tiles", "", 1, 130, 1, 1, "dk"),
    "dV from dS": ("times_tile<HD>(dva, pa, dos);", "times_tile<HD>(dva, dsa, dos);", 1, 40, 1, 1, "dv"),
}


@pytest.mark.parametrize("name,hd", [(name, 64) for name in MMA_BACKWARD_PLANTS]
                         + [("dV from dS", 128), ("one query head of the group", 128)])
def test_planted_bug_in_the_tensor_core_backward_is_caught(name, hd):
    old, new, B, T, nH, nKV, spoiled = MMA_BACKWARD_PLANTS[name]
    q, k, v, do = inputs(B, T, nH, nKV, hd, "bf16", seed=1)
    want = reference(q, k, v, do)[spoiled]
    with np.errstate(invalid="ignore"):
        got, overrun = run_kernels(launcher(plant=(old, new), planted_in="attention_mma"), q, k, v, do, "bf16")
    assert overrun or not error(got[spoiled], want) <= TOL["bf16"], f"planted bug not caught: {name}"
