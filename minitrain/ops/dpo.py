"""Direct Preference Optimization's loss (Rafailov et al. 2023, eq. 7), on summed sequence
log-probabilities (ops/sequence_logprob.py).

A batch of B pairs arrives as 2B log-probabilities, the chosen completions' first and the rejected
ones' after (TRL's order): p = (pi(c_1..c_B), pi(r_1..r_B)), and the reference model's, fixed,
q = (ref(c_1..c_B), ref(r_1..r_B)). Per pair i, with the implicit rewards
    rc_i = beta (pi(c_i) - ref(c_i)),   rr_i = beta (pi(r_i) - ref(r_i)),
    u_i = rc_i - rr_i = beta [(pi(c_i) - ref(c_i)) - (pi(r_i) - ref(r_i))],
    loss = (1/B) sum_i -log sigmoid(u_i) = (1/B) sum_i softplus(-u_i),
softplus(a) = log(1 + e^a) = max(a, 0) + log1p(e^-|a|) (no overflow either way).
Since d softplus(-u)/du = -sigmoid(-u) = sigmoid(u) - 1,
    d loss / d pi(c_i) = beta (sigmoid(u_i) - 1) / B,   d loss / d pi(r_i) = -beta (sigmoid(u_i) - 1) / B,
and nothing flows to the reference. At the start, when the policy is the reference, u = 0: the
loss is ln 2 and each chosen log-probability is pushed up, each rejected one down, by beta / (2B).
"""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.ops.activations import sigmoid


def margins(logps, reference, beta):
    """(rc, rr): the implicit rewards (B,) each, from logps and reference (2B,) arrays."""
    B = logps.shape[0] // 2
    ratio = logps - reference  # (2B,)
    return beta * ratio[:B], beta * ratio[B:]


class DPOLoss(Function):
    def forward(self, logps, reference, beta):
        xp = backend.xp
        if logps.shape != reference.shape or logps.ndim != 1 or logps.shape[0] % 2:
            raise ValueError(f"dpo_loss: expected 2B policy and reference log-probabilities, got shapes "
                             f"{logps.shape} and {reference.shape}")
        chosen, rejected = margins(logps, xp.asarray(reference, dtype=logps.dtype), beta)
        u = chosen - rejected  # (B,)
        self.save(u, beta)
        return (xp.maximum(-u, 0) + xp.log1p(xp.exp(-xp.abs(u)))).mean()  # () mean softplus(-u)

    def backward(self, g):
        u, beta = self.saved
        du = (sigmoid(u) - 1.0) * (g / u.shape[0])  # (B,): d loss / d u_i
        return backend.xp.concatenate([beta * du, -beta * du]), None  # (2B,): chosen, then rejected


def dpo_loss(logps, reference, beta):
    """logps (2B,) Tensor, reference (2B,) array (chosen first, then rejected), beta > 0 -> a scalar."""
    return DPOLoss.apply(logps, reference, beta=beta)
