"""ZeRO-1's layout and sharded update (minitrain/zero.py), in one process: N shards of AdamW, each
updating its own pieces of the same parameters, must give the bits of one AdamW over everything;
the norm from the shards' slice sums must be the global one; the whole state loads into any
sharding. (tests/test_dist.py runs the real thing under mpiexec.)"""

import math

import numpy as np
import pytest

from minitrain.autograd import Tensor
from minitrain.config import preset
from minitrain.model import Model
from minitrain.optim import CHUNK, AdamW, global_grad_norm, sums_of_squares
from minitrain.zero import layout

pytestmark = pytest.mark.numerics

SIZES = [3 * CHUNK + 17, 5, CHUNK - 1, 2 * CHUNK, 7 * CHUNK + 3, 1]


def tiny_llama_sizes():
    return [p.data.size for p in Model.from_scratch(preset("tiny-llama"), seed=0).parameters()]


@pytest.mark.parametrize("sizes", [SIZES, "tiny-llama"], ids=["mixed", "tiny-llama"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
def test_the_layout_covers_every_element_once_in_balanced_chunk_aligned_runs(sizes, ranks):
    sizes = tiny_llama_sizes() if sizes == "tiny-llama" else sizes
    owned = layout(sizes, ranks)
    assert len(owned) == ranks
    flat = [piece for pieces in owned for piece in pieces]  # rank by rank, in order
    for i, a, b in flat:
        assert a % CHUNK == 0 and a < b <= sizes[i]  # the norm's slices start where one process's do
    position = [sum(sizes[:i]) + a for i, a, _ in flat]
    assert position == sorted(position)  # rank q's run follows rank q-1's
    covered = {}
    for i, a, b in flat:
        covered[i] = covered.get(i, 0) + (b - a)
    assert covered == dict(enumerate(sizes))  # with the order above: every element exactly once
    for pieces in owned:
        assert abs(sum(b - a for _, a, b in pieces) - sum(sizes) / ranks) < CHUNK


def _params(rng):
    return [rng.standard_normal(n).astype(np.float32) for n in SIZES[:-1]] + [rng.standard_normal((3, 1)).astype(np.float32)]


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_shards_of_adamw_give_the_bits_of_one_adamw_and_the_same_norm(ranks):
    rng = np.random.default_rng(0)
    start = _params(rng)
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in start] for _ in range(3)]
    options = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    whole = [Tensor(a.copy(), name=f"p{i}") for i, a in enumerate(start)]
    one = AdamW(whole, **options)
    copies = [[Tensor(a.copy(), name=f"p{i}") for i, a in enumerate(start)] for _ in range(ranks)]  # replicas
    owned = layout([a.size for a in start], ranks)
    shards = [AdamW(params, **options, pieces=pieces) for params, pieces in zip(copies, owned)]
    for step, g in enumerate(grads):
        for params in [whole] + copies:
            for p, x in zip(params, g):
                p.grad = x.copy()
        sums = [s for params, pieces in zip(copies, owned)
                for s in sums_of_squares([params[i].grad.reshape(-1)[a:b] for i, a, b in pieces])]
        assert math.sqrt(math.fsum(sums)) == global_grad_norm(whole)
        if step == 2:  # a resume on this sharding from the whole state of two steps
            scalars, arrays = one.state()
            shards = [AdamW(params, **options, pieces=pieces) for params, pieces in zip(copies, owned)]
            for s in shards:
                s.load_state(scalars, arrays)
        one.step()
        for s in shards:
            s.step()
        for q, pieces in enumerate(owned):  # the all-gather: each rank's pieces to every replica
            for i, a, b in pieces:
                for params in copies:
                    params[i].data.reshape(-1)[a:b] = copies[q][i].data.reshape(-1)[a:b]
        for params in copies:
            for p, want in zip(params, whole):
                assert p.data.tobytes() == want.data.tobytes()
    assert sum(s.state_bytes() for s in shards) == one.state_bytes() == 8 * sum(a.size for a in start)
