"""What a training step minimizes: one small, named piece the loop calls for each micro-batch.

An objective turns a micro-batch (data.Batch: token ids, targets, a packed batch's positions,
preference pairs' reference log-probabilities) into the loss to back-propagate, a scalar Tensor
(the mean over the micro-batch's targets, or its pairs), and the values of its named terms. The
loop weighs the terms over the step exactly as it weighs the loss, and logs each beside it: under
its key in metrics.jsonl and, by its short name, in the progress line; `validation` is what an
evaluation measures, `report` what the run's final report says of it.

    NextToken      next-token cross-entropy. With loss masks (conversations: SFT) the positions
                   without a target are IGNORE and left out: the same objective, the data says
                   which tokens count.
    Distillation   (1 - w) CE + w T^2 KL(teacher || student): the teacher's forward only, its
                   head fused with the student's and the loss (ops/distill.py).
    DPO            -log sigmoid(beta [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]) per
                   preference pair (ops/dpo.py), the reference's log-probabilities computed
                   before the first step (reference.py).

A new objective is a class with `terms` (metrics key -> short name), `val_terms` (those an
evaluation reports too), `per_token` (its loss is a
mean over target tokens: the evaluation reports a perplexity, the data's masks weigh the
micro-batches), `loss`, `validation` and `report`, chosen in setup_run.py.
"""

import math

from minitrain import backend, ops
from minitrain.autograd import no_grad
from minitrain.data import target_count
from minitrain.ops.dpo import margins


class NextToken:
    """The mean cross-entropy of each target token given the tokens before it (model.loss)."""

    terms = val_terms = {}
    per_token = True

    def __init__(self, model):
        self.model = model

    def loss(self, batch):
        """-> (the loss, the terms' values: none)."""
        return self.model.loss(batch.inputs, batch.targets, batch.positions), ()

    def validation(self, batch):
        """-> (the held-out loss, its terms' values, its weight: the targets it averages)."""
        return self.model.loss(batch.inputs, batch.targets, batch.positions), (), target_count(batch.targets)

    def chance(self):
        """What the loss is before any learning, for the line that reports init_loss."""
        return f"ln V = {math.log(self.model.config.vocab_size):.4f}"

    def report(self, last):
        return {}


class Distillation(NextToken):
    """(1 - weight) CE + weight T^2 KL(teacher || student) at temperature T, the teacher frozen;
    evaluated on the CE alone."""

    terms = {"ce_loss": "ce", "kd_loss": "kd"}

    def __init__(self, model, teacher, weight, temperature, source):
        self.model, self.teacher, self.source = model, teacher, source
        self.weight, self.temperature = weight, temperature

    def loss(self, batch):
        """-> (the loss, (mean CE, mean T^2 KL))."""
        inputs, positions = batch.inputs, batch.positions
        with no_grad():
            teacher_hidden = self.teacher.hidden(inputs, positions=positions).data  # (B, T, Ht): no graph kept
        parts = {}
        loss = ops.linear_distillation(self.model.hidden(inputs, positions=positions), self.model.head, teacher_hidden,
                                       self.teacher.head.data, batch.targets, self.weight, self.temperature, parts=parts)
        return loss, (parts["ce_loss"], parts["kd_loss"])

    def report(self, last):
        """`last`: the last step's terms (empty if the run took no step)."""
        return {"distill": {"teacher": self.source, "weight": self.weight, "temperature": self.temperature,
                            "final_ce_loss": last.get("ce_loss"), "final_kd_loss": last.get("kd_loss")}}


class DPO:
    """Direct Preference Optimization on a micro-batch of B pairs (data.PairWindows: 2B sequences,
    the chosen first): each sequence's summed log-probability of its completion's tokens under the
    policy (ops/sequence_logprob.py), against the reference's (the batch's, computed once:
    reference.py), in ops/dpo.py's loss, a mean over the pairs. Its terms are TRL's: the mean
    implicit rewards beta (log pi - log ref) of the chosen and the rejected completions, their
    margin, the share of pairs whose chosen reward is the higher, and the mean log-probabilities
    log pi of the chosen and the rejected completions."""

    terms = {"rewards_chosen": "chosen", "rewards_rejected": "rejected", "reward_margin": "margin",
             "reward_accuracy": "acc", "logps_chosen": "logp_c", "logps_rejected": "logp_r"}  # TRL's rewards/...
    # chosen, rejected, margins, accuracies and logps/chosen, logps/rejected
    val_terms = terms
    per_token = False

    def __init__(self, model, beta, source):
        self.model, self.beta, self.source = model, beta, source

    def loss(self, batch):
        """-> (the loss, the six terms' values)."""
        logps = self.model.sequence_logprobs(batch.inputs, batch.targets, batch.positions)  # (2B,)
        return ops.dpo_loss(logps, batch.reference, self.beta), self._rewards(logps.data, batch.reference)

    def validation(self, batch):
        """-> (the held-out loss, the rewards' means, its weight: the pairs)."""
        loss, terms = self.loss(batch)
        return loss, terms, batch.inputs.shape[0] // 2

    def _rewards(self, logps, reference):
        xp = backend.xp
        logps = logps.astype(xp.float64)
        chosen, rejected = margins(logps, xp.asarray(reference, dtype=xp.float64), self.beta)
        B = chosen.shape[0]
        return (chosen.mean(), rejected.mean(), (chosen - rejected).mean(), (chosen > rejected).mean(),
                logps[:B].mean(), logps[B:].mean())

    def chance(self):
        return "ln 2 = 0.6931 where the policy is the reference"

    def report(self, last):
        """`last`: the last step's terms (empty if the run took no step)."""
        return {"dpo": {"beta": self.beta, "reference": self.source, "final": {key: last.get(key) for key in self.terms}}}
