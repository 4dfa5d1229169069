"""Preflight: the memory a training run will need on each rank, and the disk its outputs take,
worked out before the first step (the CPU path; bytes throughout).

What lives all run long (`resident`):
    parameters        the model's (+ a teacher's), in the training dtype
    optimizer state   AdamW's m and v of every trained tensor (a 1/N shard of them under ZeRO-1)
    runtime           the interpreter, NumPy, BLAS, tokenizers and data: measured, the process's
                      RSS once the model is loaded, less the parameters

and on top of it, the largest of three moments of a step:
    forward's end     the activations (every array the graph keeps for the backward), the
                      lm_head's dW (the fused loss computes it in the forward), and the loss's chunk
                      of logits (and a second (V, H) when the rows take more than one chunk)
    backward's start  the activations, dW, the gradient flowing back (a few (B, T, H) arrays),
                      and the larger of: the last layer's attention scores and their gradient,
                      (B, nH, T, T) each (recomputed from the saved log-sum-exp); dW scaled by the
                      micro-batch's weight, a copy of it where that is not 1
    the update        the gradients (twice: the micro-batch's and the running sum, with grad-accum
                      or more than one rank)
With grad-accum or more than one rank the previous micro-batches' gradient sum is held through
every micro-batch after the first, so the two forward moments hold it too.

The activations are counted array by array, as model.hidden makes them (`layer_elements`, with
what --recompute leaves out and holds again for one block); the test holds the count to the
bytes the real graph keeps. The rest is arithmetic on the shapes.
"""

import ctypes
import math
import os
import shutil
import socket
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from minitrain.config import parameter_count
from minitrain.errors import InputError
from minitrain.lora import LoRASpec
from minitrain.lora import tensor_table as lora_table
from minitrain.ops.cross_entropy import LinearCrossEntropy

GB = 1e9


def size(n):
    """Bytes in the unit that shows them: 1.7 MB, not 0.00 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def attention_elements(c, T):
    """Per token, the elements layer's attention block keeps from its forward to its backward,
    besides its output (the CPU path, fp32 or fp64), in model._attention's order. A transpose
    to heads-first is a copy unless it is already contiguous (one head, or one position)."""
    nH, nKV = c.num_attention_heads, c.num_key_value_heads
    Q, K = nH * c.head_dim, nKV * c.head_dim

    def heads_first(size, heads):  # attention's contiguous (B, heads, T, hd) copy of q, k or v
        return size if heads > 1 and T > 1 else 0

    return (2 * c.hidden_size + 1  # input_layernorm: its output and x̂ (H each), 1/rms (1)
            + Q + 2 * K  # q, k, v projections
            + (2 * (Q + K) + nH + nKV if c.qk_norm else 0)  # Qwen3's q/k norms: outputs, x̂, 1/rms per head
            + Q + K  # rope(q), rope(k)
            + heads_first(Q, nH) + heads_first(K, nKV) + heads_first(K, nKV)  # attention's q, k, v heads first
            + Q + nH  # attention's output heads first, and its log-sum-exp per head
            + Q)  # that output back in (B, T, nH*hd), o_proj's input


def mlp_elements(c):
    """Per token, what the MLP block keeps besides its output: post_attention_layernorm's output,
    x̂ and 1/rms; gate, up and their SwiGLU."""
    return 2 * c.hidden_size + 1 + 3 * c.intermediate_size


def layer_elements(c, T, recompute="none"):
    """Per token, what one layer keeps for the backward, and what its recomputed block holds again
    while its backward runs (--recompute, ops/recompute.py): (kept, recomputed)."""
    H, attention, mlp = c.hidden_size, attention_elements(c, T), mlp_elements(c)
    blocks = 4 * H  # the blocks' outputs (o_proj's, down_proj's) and the two residual sums
    return {"none": (attention + mlp + blocks, 0),
            "attention": (mlp + blocks, attention),
            "mlp": (attention + blocks, mlp),
            "layer": (H, attention + mlp + blocks)}[recompute]  # the layer's output only


def model_elements(c):
    """Per token, outside the layers: the embedding's output, the final norm's output, x̂ and 1/rms,
    and the fused loss's dx (the hidden state's gradient, made in the forward)."""
    return 4 * c.hidden_size + 1


ID_BYTES = 8  # the token ids the embedding keeps (int64), per token


def lora_elements(c, spec, blocks=("attention", "mlp")):
    """Per token, what LoRA adds to the graph of `blocks` in every layer: each adapted linear
    keeps its rank-R intermediate, and under dropout its dropped input and the mask
    (in_features each, the width of its A)."""
    module = {"attention": ".self_attn.", "mlp": ".mlp."}
    return sum(spec.rank + (2 * shape[1] if spec.dropout else 0) for name, shape in lora_table(c, spec).items()
               if name.endswith(".lora_A.weight") and any(module[b] in name for b in blocks))


def activation_bytes(c, B, T, itemsize, lora=None, recompute="none"):
    """Bytes of the activations a micro-batch of B windows of T tokens keeps for its backward (and
    RoPE's cos and sin tables, (T, hd/2) each, which every layer's kept rope shares), with the
    blocks --recompute names recomputed."""
    elements = c.num_hidden_layers * layer_elements(c, T, recompute)[0] + model_elements(c)
    if lora:  # a recomputed block's adapters keep theirs only while it runs
        elements += lora_elements(c, lora, [b for b in ("attention", "mlp") if recompute not in (b, "layer")])
    tables = T * c.head_dim * itemsize if recompute in ("none", "mlp") else 0  # held by a kept rope(q)
    return B * T * (elements * itemsize + ID_BYTES) + tables


def logits_chunk_bytes(rows, V, itemsize, arrays=1):
    """The fused loss's (r, V) logits of one chunk of rows (`arrays` of them: two with a teacher)."""
    per_row = V * itemsize * arrays
    return min(rows, max(1, LinearCrossEntropy.BUDGET // per_row)) * per_row


@dataclass
class Estimate:
    """Bytes per rank; `peak` is what a step reaches at most."""

    parameters: int
    teacher: int
    optimizer: int
    runtime: int
    activations: int
    gradients: int
    forward_end: int  # the moments, without what is resident
    backward_start: int
    update: int

    @property
    def resident(self):
        return self.parameters + self.teacher + self.optimizer + self.runtime

    @property
    def peak(self):
        return self.resident + max(self.forward_end, self.backward_start, self.update)


def estimate(c, cfg, ranks=1, runtime=0, teacher=None, lora=None):
    """The Estimate of a run (options.TrainConfig `cfg`, resolved) of model config `c` on `ranks`
    ranks; `teacher`: the teacher's ModelConfig; `lora`: the LoRASpec (the base then frozen)."""
    itemsize = 8 if cfg.dtype == "fp64" else 4
    B = cfg.batch_size * cfg.sequences  # rows of a micro-batch: a pair is two
    T, V, H = cfg.seq_len, c.vocab_size, c.hidden_size
    params = parameter_count(c) * itemsize
    trained = _lora_parameters(c, lora) * itemsize if lora else params
    moments = 0 if cfg.optimizer == "sgd" else 2 * trained
    if cfg.zero:
        moments = math.ceil(moments / ranks)
    accumulating = cfg.grad_accum > 1 or ranks > 1
    carried = trained if accumulating else 0  # the running sum of earlier micro-batches' gradients
    head_grad = 0 if lora else V * H * itemsize  # dW of the (tied or not) lm_head, from the fused loss
    acts = activation_bytes(c, B, T, itemsize, lora, cfg.recompute)
    again = B * T * layer_elements(c, T, cfg.recompute)[1] * itemsize  # one block, recomputed for its backward
    chunk = logits_chunk_bytes(B * T, V, itemsize, 2 if teacher else 1)
    second_dw = head_grad if B * T * V * itemsize * (2 if teacher else 1) > LinearCrossEntropy.BUDGET else 0
    scores = 2 * B * c.num_attention_heads * T * T * itemsize
    flowing = 4 * B * T * H * itemsize  # the gradient going back, and its op's (B, T, H) temporaries
    teacher_bytes = parameter_count(teacher) * itemsize if teacher else 0
    hidden = B * T * teacher.hidden_size * itemsize if teacher else 0  # the teacher's last hidden state
    return Estimate(parameters=params, teacher=teacher_bytes, optimizer=moments, runtime=runtime, activations=acts,
                    gradients=trained,
                    forward_end=acts + head_grad + second_dw + chunk + hidden + carried,
                    backward_start=acts + again + head_grad + carried + flowing
                    + max(scores, head_grad if accumulating else 0),
                    update=(2 if accumulating else 1) * trained)


def _lora_parameters(c, spec):
    return sum(math.prod(shape) for shape in lora_table(c, spec).values())


def release_freed():
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere):
    loading and converting a model frees many arrays too small for their own mappings, whose
    pages would otherwise stay in the process's RSS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss():
    """This process's resident memory now, in bytes (Linux; 0 where /proc is not there)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available_memory():
    """Bytes this process may still take: MemAvailable, or less where its cgroup (v2) has a
    limit; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        group = Path("/proc/self/cgroup").read_text().split("\n")[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


def free_disk(path):
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    place = next((p for p in [Path(path).absolute(), *Path(path).absolute().parents] if p.exists()), Path("/"))
    return shutil.disk_usage(place).free


def checkpoint_bytes(c, cfg, lora=None):
    """(one checkpoint, final.apr) in bytes: the parameters in the training dtype, and AdamW's two
    moments of the trained ones (and LoRA's A and B); final.apr holds fp32, a tied head twice."""
    itemsize = 8 if cfg.dtype == "fp64" else 4
    trained = _lora_parameters(c, lora) if lora else 0
    moments = 0 if cfg.optimizer == "sgd" else 2 * (trained or parameter_count(c))
    tied = c.vocab_size * c.hidden_size if c.tie_word_embeddings else 0
    return (parameter_count(c) + trained + moments) * itemsize, (parameter_count(c) + tied) * 4


def preflight(c, cfg, group, held, say, teacher=None, lora=None):
    """Print what the run will hold in memory (per rank) and write to disk; InputError (on every
    rank) where the ranks of some machine need more memory than it has, with the changes that
    would fit, or where the disk cannot take the run's first save. `held`: bytes of the arrays
    the process holds now (the parameters, a teacher's)."""
    release_freed()
    runtime = max(0, current_rss() - held)
    est = estimate(c, cfg, group.size, runtime, teacher, lora)
    available = available_memory()
    host = zlib.crc32(socket.gethostname().encode())
    more = max(0, est.peak - current_rss())  # what the process has yet to take
    rows = group.gather([(float(host), float(more), float(-1 if available is None else available))], 1, 3)
    mine = [r for r in rows if r[0] == host]
    needed, free = sum(r[1] for r in mine), min(r[2] for r in mine)
    tokens = f"{cfg.batch_size} x {cfg.seq_len} tokens"
    if cfg.sequences > 1:
        tokens = f"{cfg.batch_size} pairs: {cfg.sequences * cfg.batch_size} x {cfg.seq_len} tokens"
    say(f"memory per rank (estimated): {est.peak / GB:.2f} GB at most = parameters {est.parameters / GB:.2f}"
        + (f" + teacher {est.teacher / GB:.2f}" if teacher else "")
        + f" + optimizer state {est.optimizer / GB:.2f} + runtime {est.runtime / GB:.2f} + the step's "
        f"{max(est.forward_end, est.backward_start, est.update) / GB:.2f} (activations {est.activations / GB:.2f} at "
        f"{tokens}, gradients {est.gradients / GB:.2f})"
        + (f"; {available / GB:.2f} GB available" if available is not None else ""))
    ckpt, final = checkpoint_bytes(c, cfg, lora)
    disk = free_disk(cfg.out)
    say(f"disk: a checkpoint {size(ckpt)}, final.apr {size(final)}; {size(disk)} free for {cfg.out}")
    first = ckpt if cfg.save_every and cfg.save_every <= cfg.steps else final
    if first > disk:
        raise InputError(f"--out {cfg.out}: the run's first save needs {size(first)} "
                         f"({'a checkpoint' if first == ckpt else 'final.apr'}) and {size(disk)} is free there; "
                         "free some space or give --out on a larger disk")
    if free >= 0 and needed > free:
        ranks = f"{len(mine)} ranks on this machine" if len(mine) > 1 else "this run"
        raise InputError(f"{ranks} would need {needed / GB:.2f} GB more memory (peak {est.peak / GB:.2f} GB per rank: "
                         f"activations {est.activations / GB:.2f} GB at {tokens}), and {free / GB:.2f} GB is "
                         f"available; {_what_fits(c, cfg, group.size, runtime, teacher, lora, free / len(mine) + est.peak - more)}")
    return est


def _what_fits(c, cfg, ranks, runtime, teacher, lora, budget):
    """The changes that would bring the peak within `budget` bytes (per rank), as options."""
    fits, windows = [], cfg.batch_size * cfg.grad_accum  # per step and rank: what must stay the same
    if cfg.recompute == "none":  # the same run, the same bits, one more forward
        mode = next((m for m in ("mlp", "layer")
                     if estimate(c, replace(cfg, recompute=m), ranks, runtime, teacher, lora).peak <= budget), None)
        if mode:
            fits.append(f"--recompute {mode} (the same bits)")
    for b in (b for b in range(cfg.batch_size - 1, 0, -1) if windows % b == 0):
        if estimate(c, replace(cfg, batch_size=b, grad_accum=windows // b), ranks, runtime, teacher, lora).peak <= budget:
            fits.append(f"--batch-size {b} --grad-accum {windows // b} (the same windows per step)")
            break
    if cfg.init and not lora:
        if estimate(c, cfg, ranks, runtime, teacher, LoRASpec(16, 16.0)).peak <= budget:
            fits.append("LoRA (--lora-rank 16)")
    if cfg.optimizer == "adamw" and not cfg.zero:
        n = next((n for n in range(2, 9) if estimate(c, replace(cfg, zero=1), n, runtime, teacher, lora).peak <= budget),
                 None)
        if n:
            fits.append(f"--zero 1 under mpiexec -n {n}, one rank per machine")
    return ("it would fit with " + ", or ".join(fits)) if fits else ("neither recomputation, a smaller batch, LoRA nor "
                                                                     "ZeRO-1 brings it within")
