"""What a training step minimizes: one small, named piece the loop calls for each micro-batch.

An objective turns a micro-batch (token ids, targets, a packed batch's positions or None) into
the loss to back-propagate, a scalar Tensor (the mean over the micro-batch's targets), and the
values of its named terms. The loop weighs the terms over the step exactly as it weighs the loss,
and logs each beside it: under its key in metrics.jsonl and, by its short name, in the progress
line; `report` adds what the run's final report says of it.

    NextToken      next-token cross-entropy. With loss masks (conversations: SFT) the positions
                   without a target are IGNORE and left out: the same objective, the data says
                   which tokens count.
    Distillation   (1 - w) CE + w T^2 KL(teacher || student): the teacher's forward only, its
                   head fused with the student's and the loss (ops/distill.py).

A new objective is a class with `terms` (metrics key -> short name), `loss` and `report`, chosen
in setup_run.py.
"""

from minitrain import ops
from minitrain.autograd import no_grad


class NextToken:
    """The mean cross-entropy of each target token given the tokens before it (model.loss)."""

    terms = {}

    def __init__(self, model):
        self.model = model

    def loss(self, inputs, targets, positions):
        """-> (the loss, the terms' values: none)."""
        return self.model.loss(inputs, targets, positions), ()

    def report(self, last):
        return {}


class Distillation:
    """(1 - weight) CE + weight T^2 KL(teacher || student) at temperature T, the teacher frozen."""

    terms = {"ce_loss": "ce", "kd_loss": "kd"}

    def __init__(self, model, teacher, weight, temperature, source):
        self.model, self.teacher, self.source = model, teacher, source
        self.weight, self.temperature = weight, temperature

    def loss(self, inputs, targets, positions):
        """-> (the loss, (mean CE, mean T^2 KL))."""
        with no_grad():
            teacher_hidden = self.teacher.hidden(inputs, positions=positions).data  # (B, T, Ht): no graph kept
        parts = {}
        loss = ops.linear_distillation(self.model.hidden(inputs, positions=positions), self.model.head, teacher_hidden,
                                       self.teacher.head.data, targets, self.weight, self.temperature, parts=parts)
        return loss, (parts["ce_loss"], parts["kd_loss"])

    def report(self, last):
        """`last`: the last step's terms (empty if the run took no step)."""
        return {"distill": {"teacher": self.source, "weight": self.weight, "temperature": self.temperature,
                            "final_ce_loss": last.get("ce_loss"), "final_kd_loss": last.get("kd_loss")}}
