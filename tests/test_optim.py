"""SGD and AdamW against torch.optim on the same parameters and gradients, in float64."""

import numpy as np
import pytest
import torch

from minitrain.autograd import Tensor
from minitrain.optim import SGD, AdamW


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
