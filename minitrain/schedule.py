"""The learning-rate schedule, applied to the optimizer at every step (and logged).

Step s = 0, 1, ... counts optimizer updates. With W warmup steps, S total steps, peak lr and
floor min_lr:

    warmup   s < W:   lr(s) = lr * (s + 1) / W                  (never 0: step 0 already learns)
    cosine   s >= W:  lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
                      p = (s - W) / max(1, S - 1 - W)            (p = 1 at the last step: lr = min_lr)
    constant s >= W:  lr(s) = lr
"""

import math


def learning_rate(step, *, lr, min_lr, warmup_steps, total_steps, schedule):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: expected cosine or constant")
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
