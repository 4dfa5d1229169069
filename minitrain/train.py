"""`minitrain pretrain`: the step and the loop (semantics: ../shared/docs/reference.md section 3).

One step = `grad_accum` micro-batches of `batch_size` windows (on each of N ranks under
`mpiexec -n N`: dist.py). Each micro-batch loss (a mean over its B*T targets) is back-propagated
on its own with weight 1/(N*grad_accum), and the micro-batch gradients are summed in micro-batch
order, so the step's gradient is the gradient of the mean over all N*grad_accum*B*T targets: the
same as one big batch, and bit for bit the same for any split into ranks (preference pairs: a
micro-batch of B pairs, its loss a mean over them, the step's the mean over all its pairs). Then: the
global gradient norm (reported before clipping), clipping, the scheduled learning rate set on the
optimizer, the update. Before the first update the validation loss is measured (`init_loss`).

What the loss is comes from the run's objective (objectives.py); the model, data, optimizer and
files are made from the options by setup_run.build, which hands them over as `Parts`; what the
run writes goes through outputs.RunFiles. A non-finite loss or gradient norm, or a validation
loss more than twice the previous one, raises TrainingAborted (exit 3) before the bad value is
logged; a signal stops the run after its step, with a checkpoint (preempt.py).
"""

import math
import resource
import signal
import time
from dataclasses import asdict, dataclass

from minitrain import backend, dist
from minitrain.autograd import no_grad
from minitrain.config import arch_name
from minitrain.data import target_count
from minitrain.errors import TrainingAborted
from minitrain.optim import clip_grads, global_grad_norm
from minitrain.preempt import Preempted, StopRequests
from minitrain.progress import duration
from minitrain.schedule import learning_rate


@dataclass
class Parts:
    """What a run trains with and writes to, made from its options (setup_run.build)."""

    group: object  # dist.Single, MPIGroup or NCCLGroup: this process's rank among the run's
    model: object  # model.Model
    adapters: object  # lora.Adapters attached to the model, or None
    trained: list  # the Tensors the optimizer updates: the adapters', else every parameter
    objective: object  # objectives.NextToken or Distillation
    data: object  # setup_run.Data: the training stream and the validation windows
    optimizer: object  # optim.AdamW or SGD
    shards: object  # zero.Shards under --zero 1, else None
    files: object  # outputs.RunFiles
    state: dict  # step, init_loss, last_val_loss: zeros, or a resumed checkpoint's
    start_time: float  # time.perf_counter() when the run began to be set up


class Run:
    """One training run: the loop, its steps and evaluations, and the report."""

    def __init__(self, cfg, parts, say):
        self.cfg, self.say = cfg, say  # say: prints a line (on rank 0)
        self.group, self.model, self.adapters, self.trained = parts.group, parts.model, parts.adapters, parts.trained
        self.objective, self.data, self.optimizer, self.shards = parts.objective, parts.data, parts.optimizer, parts.shards
        self.files, self.state, self.start_time = parts.files, parts.state, parts.start_time
        self.micro_per_step = self.group.size * cfg.grad_accum  # micro-batches of a step, all ranks
        self.tokens_per_step = self.micro_per_step * cfg.batch_size * cfg.sequences * cfg.seq_len
        self.step_targets = None  # the last step's targets with loss masks (metrics.jsonl target_tokens)

    # --- the loop ---------------------------------------------------------------------------

    def run(self):
        cfg = self.cfg
        if self.state["init_loss"] is None:
            init = self._eval_and_gate(0)
            if init is None:  # no validation data: the first training batch's loss, before any update
                with no_grad():
                    init = float(self.objective.validation(self.data.stream.examples(0, cfg.batch_size))[0].data)
            self.state["init_loss"] = init
            self.say(f"init_loss {init:.4f} (step 0, before any update; {self.objective.chance()})")
        train_time, last_loss, last_print, last_terms = 0.0, None, 0.0, {}
        first_step = self.state["step"]
        if cfg.resume:
            self.say(f"resumed from {cfg.resume}: step {first_step} of {cfg.steps} done")
        with StopRequests(self.say) as stops:
            for step in range(first_step, cfg.steps):
                train_time, last_loss, last_print, last_terms = self._step(step, first_step, train_time, last_print)
                if (signum := self._stop_agreed(stops)) is not None:
                    self._stop(signum)
        return self.finish(train_time, last_loss, cfg.steps - first_step, last_terms)

    def _step(self, step, first_step, train_time, last_print):
        """One step of run(), its metrics, evaluation, progress line and checkpoint.
        -> (train_time, loss, last_print, the objective's terms)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        loss, norm, lr, terms = self.train_step(step)
        dt = time.perf_counter() - t0
        train_time += dt
        self.state["step"] = done = step + 1
        targets = {} if self.step_targets is None else {"target_tokens": self.step_targets}
        self.files.write({"type": "step", "step": done, "loss": loss, **terms, **targets, "grad_norm": norm,
                          "lr": lr, "tokens_per_sec": self.tokens_per_step / dt,
                          "wall_s": time.perf_counter() - self.start_time})
        val = self._eval_and_gate(done) if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps else None
        now = time.perf_counter()
        if now - last_print > 10.0 or val is not None or done == cfg.steps or done == first_step + 1:
            last_print = now
            rate = self.tokens_per_step * (done - first_step) / train_time
            eta = (cfg.steps - done) * train_time / (done - first_step)
            parts = ", ".join(f"{short} {terms[key]:.4f}" for key, short in self.objective.terms.items())
            self.say(f"step {done}/{cfg.steps} | loss {loss:.4f}" + (f" ({parts})" if parts else "") + f" | lr {lr:.2e} | "
                     f"grad_norm {norm:.3f} | {rate:,.0f} tok/s | ETA {duration(eta)}"
                     + (f" | val_loss {val:.4f}" if val is not None else ""))
        if self._saves_at(done):
            self.save_checkpoint()
        return train_time, loss, last_print, terms

    def train_step(self, step):
        """One update; returns (mean loss, pre-clip grad norm, lr, the objective's terms by key).

        The loss is the mean over the step's targets, all micro-batches and ranks together: each
        micro-batch's loss (the mean over its own n_m targets) is weighted n_m / N, N the step's
        targets. Without masks every micro-batch has B*T targets and the weight is 1 / (micro-batches
        per step), as it always was; with masks (`self.step_targets`: N) the counts come from the
        data, on the host, the same on every rank. The terms are weighted alike."""
        cfg, params, group, B = self.cfg, self.trained, self.group, self.cfg.batch_size
        counts = self._target_counts(step)  # per micro-batch of the step (all ranks), or None: B*T each
        self.step_targets = None if counts is None else sum(counts)
        weight = backend.xp.asarray(1.0 / self.micro_per_step, dtype=backend.dtype)
        grads, values = [], []  # this rank's micro-batch gradients (rank 0: already summed); loss and terms
        for a in range(cfg.grad_accum):
            micro = step * self.micro_per_step + group.rank * cfg.grad_accum + a  # global micro-batch index
            batch = self.data.stream.examples(micro * B, B)
            if counts is not None:
                n = counts[micro - step * self.micro_per_step]
                weight = backend.xp.asarray(n / self.step_targets if self.step_targets else 0.0, dtype=backend.dtype)
            for p in params:
                p.zero_grad()
            if self.adapters:
                self.adapters.reseed(cfg.seed, micro)
            loss, terms = self.objective.loss(batch)
            loss.backward(weight)
            values += [loss.data, *terms]  # read after the loop
            g = [p.grad for p in params]
            if grads and group.rank == 0:  # the first in the chain sums as it goes: one buffer
                grads = [dist.sum_in_order([grads[0], g])]
            else:
                grads.append(g)
        for p, g in zip(params, group.ordered_sum(grads, self.shards and self.shards.layout)):
            p.grad = g  # under ZeRO-1: right in this rank's shard only
        xp, width = backend.xp, 1 + len(self.objective.terms)  # every value read at once: one transfer
        host = backend.to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in values]))
        rows = group.gather([tuple(row) for row in host.reshape(-1, width).tolist()], cfg.grad_accum, width)
        if counts is None:  # every micro-batch's, in micro-batch order
            means = [sum(column) / self.micro_per_step for column in zip(*rows)]
        else:  # the means of the micro-batches weighted by their targets
            means = [sum(v * n for v, n in zip(column, counts)) / max(1, self.step_targets) for column in zip(*rows)]
        loss = means[0]
        if not math.isfinite(loss):
            raise TrainingAborted(f"step {step + 1}: the training loss is {loss}; stopping (lower --lr?)")
        norm = self.shards.grad_norm() if self.shards else global_grad_norm(params)
        if not math.isfinite(norm):
            raise TrainingAborted(f"step {step + 1}: the gradient norm is {norm}; stopping (lower --lr?)")
        clip_grads(self.shards.grads() if self.shards else [p.grad for p in params], norm, cfg.grad_clip)
        lr = learning_rate(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                           total_steps=cfg.steps, schedule=cfg.schedule)
        self.optimizer.lr = lr
        self.optimizer.step()
        if self.shards:
            self.shards.share()
        return loss, norm, lr, dict(zip(self.objective.terms, means[1:]))

    def _target_counts(self, step):
        """The targets of each micro-batch of `step` (every rank's, in micro-batch order) when the
        data has masks; None without (every one then has B*T) and for pairs (B pairs each)."""
        if not self.data.masked:
            return None
        B, first = self.cfg.batch_size, step * self.micro_per_step
        return [target_count(self.data.stream.batch(m * B, B)[1]) for m in range(first, first + self.micro_per_step)]

    # --- evaluation -------------------------------------------------------------------------

    def evaluate(self):
        """[the mean loss over the validation windows' targets (or pairs), then the means of the
        objective's val_terms] in batches of batch_size, or None without any. Rank r evaluates batches
        r, r+N, ...; the sums run over all batches in batch order."""
        source, val_ids = self.data.val_source, self.data.val_ids
        if source is None:
            return None
        B, mine, width = self.cfg.batch_size, [], len(self.objective.val_terms)
        starts = range(0, len(val_ids), B)
        with no_grad():
            for k in range(self.group.rank, len(starts), self.group.size):
                loss, terms, n = self.objective.validation(source.examples(val_ids[starts[k]: starts[k] + B]))
                mine.append((k, n, *(float(backend.to_numpy(v)) * n for v in (loss.data, *terms))))
        sums, count = [0.0] * (1 + width), 0
        for _, n, *weighted in sorted(self.group.gather(mine, -(-len(starts) // self.group.size), 3 + width)):
            sums = [a + b for a, b in zip(sums, weighted)]
            count += n
        return [v / max(1, count) for v in sums]

    def _eval_and_gate(self, step):
        means = self.evaluate()
        if means is None:
            return None
        val, terms = means[0], dict(zip(self.objective.val_terms, means[1:]))
        if not math.isfinite(val):
            raise TrainingAborted(f"step {step}: the validation loss is {val}; stopping")
        previous = self.state["last_val_loss"]
        if previous is not None and val > 2 * previous:
            raise TrainingAborted(f"step {step}: validation loss {val:.4f} is more than twice the previous "
                                  f"{previous:.4f}: diverging; stopping (lower --lr?)")
        self.state["last_val_loss"] = val
        perplexity = {"ppl": math.exp(min(val, 700.0))} if self.objective.per_token else {}
        self.files.write({"type": "eval", "step": step, "val_loss": val, **perplexity,
                          **{f"val_{key}": value for key, value in terms.items()}})
        return val

    # --- checkpoints, signals, the end --------------------------------------------------------

    def _saves_at(self, step):
        """Whether --save-every checkpoints `step`."""
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    def save_checkpoint(self):
        optimizer_state = self.optimizer.state(self.shards and self.shards.assemble)  # ZeRO-1: from every rank
        step = self.state["step"]
        self.files.save_checkpoint(step, self.model, optimizer_state, self.adapters,
                                   {**self.state, "next_sample": step * self.micro_per_step * self.cfg.batch_size,
                                    "ranks": self.group.size,
                                    "data_order": {"order": self.cfg.data_order, "seed": self.cfg.seed,
                                                   "rng": "numpy.random.default_rng([seed, epoch]).permutation per epoch"},
                                    "config": asdict(self.cfg), "model_config": self.model.config.as_dict()})

    def _stop_agreed(self, stops):
        """The signal that stops the run after this step: any rank's (preempt.py), else None."""
        rows = self.group.gather([(float(stops.signum),)] if stops.signum is not None else [], 1, 1)
        return int(max(r[0] for r in rows)) if rows else None

    def _stop(self, signum):
        """Checkpoint the step just done (unless --save-every just did) and raise Preempted."""
        done = self.state["step"]
        if not self._saves_at(done):
            self.save_checkpoint()
        path = self.files.checkpoint_dir(done)
        raise Preempted(f"stopped by {signal.Signals(signum).name} after step {done} of {self.cfg.steps}: checkpoint "
                        f"{path}; continue with `minitrain pretrain --resume {path}` (or the same command with "
                        f"--resume auto)", signum)

    def _memory(self):
        """Measured on every rank: the optimizer state it holds and its peak RSS (bytes)."""
        rows = self.group.gather([(self.optimizer.state_bytes(), _peak_rss())], 1, 2)
        memory = [{"rank": r, "optimizer_state_bytes": int(o), "peak_rss_bytes": int(m)} for r, (o, m) in enumerate(rows)]
        if self.group.size > 1 or self.shards:
            state, rss = (", ".join(f"{m[key] / 1e6:.1f}" for m in memory) for key in ("optimizer_state_bytes", "peak_rss_bytes"))
            self.say(f"memory per rank{' (ZeRO-1)' if self.shards else ''}: optimizer state {state} MB | peak RSS {rss} MB")
        return memory

    def finish(self, train_time, last_loss, steps_run, last_terms):
        """final.apr (and the adapter), then the report: the command's --json object."""
        written = self.files.finish(self.model, self.adapters)
        mc = self.model.config
        report = {"status": "ok", "arch": arch_name(mc), "params": self.model.num_parameters(), "steps": self.cfg.steps,
                  "tokens": self.cfg.steps * self.tokens_per_step, "init_loss": self.state["init_loss"],
                  "final_train_loss": last_loss, "final_val_loss": self.state["last_val_loss"],
                  "tokens_per_sec": steps_run * self.tokens_per_step / train_time if train_time else None,
                  "wall_s": time.perf_counter() - self.start_time, "out": str(self.files.out),
                  "memory_per_rank": self._memory()}
        if self.adapters:
            report["lora"] = {"rank": self.adapters.spec.rank, "alpha": self.adapters.spec.alpha,
                              "targets": self.cfg.lora_targets, "trained_params": sum(p.data.size for p in self.trained),
                              **written}
        report.update(self.objective.report(last_terms))
        self.say(f"done: {report['steps']} steps, init_loss {report['init_loss']:.4f} -> final train loss "
                 f"{_fmt(last_loss)}, val loss {_fmt(report['final_val_loss'])}; wrote {self.files.out / 'final.apr'}")
        return report


def _peak_rss():
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"
