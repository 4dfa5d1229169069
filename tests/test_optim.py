"""SGD and AdamW against torch.optim on the same parameters and gradients, in float64; the global
gradient norm's independence of the parameters' order; the threaded loops' independence of the
number of threads."""

import numpy as np
import pytest
import torch

from minitrain import optim, parallel
from minitrain.autograd import Tensor
from minitrain.optim import SGD, AdamW, global_grad_norm

pytestmark = pytest.mark.numerics  # tools/avx2_leg.py runs this file again on the AVX2 code paths


def _params(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in [(4, 3), (3,), (5, 2, 2)]]


def _run(make_ours, make_torch, steps=5):
    arrays = _params(0)
    ours = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    opt, opt_t = make_ours(ours), make_torch(theirs)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape)
            p.grad, t.grad = g.copy(), torch.tensor(g)
        opt.step()
        opt_t.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert not np.allclose(ours[0].data, arrays[0]), "the steps did not move the weights"


def test_sgd_matches_torch():
    _run(lambda ps: SGD(ps, lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1))


@pytest.mark.parametrize("decay_1d", [False, True])
def test_adamw_matches_torch(decay_1d):
    def torch_opt(ps):
        decayed = [p for p in ps if p.ndim >= 2 or decay_1d]
        groups = [{"params": decayed, "weight_decay": 0.1},
                  {"params": [p for p in ps if not any(p is q for q in decayed)], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)

    _run(lambda ps: AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay_1d=decay_1d), torch_opt)


def test_adamw_skips_parameters_without_gradient():
    p = Tensor(np.ones(3), requires_grad=True)
    AdamW([p], lr=0.1, weight_decay=0.5, decay_1d=True).step()
    np.testing.assert_array_equal(p.data, np.ones(3))


def test_the_global_norm_does_not_depend_on_the_order_of_the_parameters():
    """Squares summing to 2^53 (one parameter) and 1 (eight more): added left to right, each
    2^53 + 1 rounds back to 2^53; the eight ones first give 2^53 + 8 exactly, and the two square
    roots differ by 2 ulp. The norm adds the per-slice sums exactly (one rounding at the end), so
    every order gives sqrt(2^53 + 8)."""
    grads = [np.array([2.0 ** 26, 2.0 ** 26], dtype=np.float32)] + [np.ones(1, np.float32)] * 8
    norms = set()
    for order in (range(9), [*range(1, 9), 0], [4, 0, 8, 1, 2, 3, 5, 6, 7]):
        params = [Tensor(np.zeros_like(grads[i]), requires_grad=True) for i in order]
        for p, i in zip(params, order):
            p.grad = grads[i].copy()
        norms.add(global_grad_norm(params))
    assert norms == {np.sqrt(2.0 ** 53 + 8.0)}
    assert np.sqrt(2.0 ** 53 + 8.0) != np.sqrt(2.0 ** 53)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_adamw_and_norm_give_the_same_bits_with_any_number_of_threads(workers, monkeypatch):
    """AdamW and the grad norm deal their slices to parallel.WORKERS threads; the slices are the same and the
    results come back in slice order, so 1, 2 or 3 threads (any timing) give the same bits."""
    def run():
        rng = np.random.default_rng(5)
        sizes = [3 * optim.CHUNK + 17, 5, optim.CHUNK - 1, 2 * optim.CHUNK]
        params = [Tensor(rng.standard_normal(n).astype(np.float32), requires_grad=True) for n in sizes]
        opt, norms = AdamW(params, lr=1e-2, weight_decay=0.1, decay_1d=True), []
        for _ in range(3):
            for p in params:
                p.grad = rng.standard_normal(p.data.shape).astype(np.float32)
            norms.append(global_grad_norm(params))
            opt.step()
        return norms, [p.data.tobytes() for p in params + opt.m + opt.v]

    monkeypatch.setattr(parallel, "WORKERS", 4)
    expected = run()
    monkeypatch.setattr(parallel, "WORKERS", workers)
    assert run() == expected
