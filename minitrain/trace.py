"""`minitrain trace`: one training step on the first batch, every named tensor of it written down.

In execution order: the batch (input_ids, targets, positions of a packed batch); the forward's
intermediates as the model makes them (model.py hands each to the Tracer: `model.tracer`); the
logits and the loss; in the backward, the gradient of each of those and of each parameter at
the moment the pass completes it (autograd's `watch`); then the optimizer's step on every
parameter (AdamW: m, v, the update, the parameter after; SGD: the update, the parameter after).
docs/auditing.md names and defines each tensor. The step is pretrain's, with the learning rate
given as it is (no schedule) and no clipping: the update shows the optimizer alone.

The logits are made whole (B, T, V) and the loss is ops.cross_entropy on them, where pretrain
fuses the head with the loss in chunks: the same values to rounding, and the logits and their
gradient are there to compare. `--layers` keeps the tensors of some layers only (the embedding,
the final norm, the head, the logits and the loss always).
"""

import re

import numpy

from minitrain import __version__, backend, ops
from minitrain.autograd import RowSparse
from minitrain.config import arch_name
from minitrain.data import TokenWindows, target_count
from minitrain.errors import InputError
from minitrain.formats.sources import load_model
from minitrain.formats.trace_file import TraceWriter, base_name
from minitrain.optim import SGD, AdamW, global_grad_norm
from minitrain.options import BY_NAME, MODE_DEFAULTS
from minitrain.setup_run import check_dtype, check_fit, use_device

DEFAULT_LR = MODE_DEFAULTS["finetune"]["lr"]
ADAMW = {name: BY_NAME[name].default for name in ("beta1", "beta2", "eps", "weight_decay", "decay_1d")}
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def parse_layers(text, count):
    """'0,2,5-7' -> the sorted layer indices; None (every layer) for None."""
    if text is None:
        return None
    chosen = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise InputError(f"--layers {text!r}: expected indices and ranges like 0,2,5-7")
        first, last = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if first > last or last >= count:
            raise InputError(f"--layers {text!r}: {part.strip()} is not within the model's layers 0-{count - 1}")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def layer_of(name):
    """The layer a trace name or parameter name belongs to, or None (embedding, norm, head...)."""
    m = _LAYER.match(base_name(name))
    return None if m is None else int(m[1])


def wanted(name, layers):
    """Whether a trace with `--layers` (a set of indices, or None: all) keeps tensor `name`."""
    return layers is None or layer_of(name) in (None, *layers)


class Tracer:
    """What the model and the backward hand over, written to the trace as it comes."""

    def __init__(self, writer, layers, params):
        self.writer, self.layers = writer, None if layers is None else set(layers)
        self.params = {id(t): name for name, t in params.items()}

    def wanted(self, name):
        return wanted(name, self.layers)

    def record(self, name, array):
        if self.wanted(name):
            self.writer.add(name, host(array))

    def forward(self, name, x):
        """x (a Tensor) as it is, named and written when its layer is traced."""
        if self.wanted(name):
            x.name = name
            self.writer.add(name, host(x.data))
        return x

    def backward(self, t, g):
        """autograd's watch: the gradient of a named intermediate or of a parameter."""
        name = self.params.get(id(t), t.name)
        if name != "loss" and self.wanted(name):
            self.writer.add("grad." + name, host(g))


def host(a):
    """A trace's array: on the host; bf16 widened to float32 (exactly); an embedding's sparse
    gradient made whole."""
    if isinstance(a, RowSparse):
        a = a.dense()
    if a.dtype == backend.BF16:
        a = backend.from_bf16(a)
    return backend.to_numpy(a)


def trace(init, data, seq_len, batch_size, out, dtype="fp64", device="cpu", optimizer="adamw", lr=None,
          layers=None, arch=None, rope_layout=None, say=print):
    """Write the trace of one step to `out`; -> the command's report (tensors, bytes, loss, ...)."""
    device = use_device(device)
    check_dtype(dtype, device)
    with backend.precision(dtype):
        model = load_model(init, arch, rope_layout)
        check_fit(model, seq_len)
        chosen = parse_layers(layers, model.config.num_hidden_layers)
        windows = TokenWindows(data, seq_len, model.config.vocab_size)
        if len(windows) < batch_size:
            raise InputError(f"{data}: {len(windows)} windows of {seq_len + 1} tokens; --batch-size {batch_size} "
                             f"needs {batch_size}")
        ids = range(batch_size)
        (inputs, targets), positions = windows.batch(ids), windows.positions(ids)
        lr = DEFAULT_LR if lr is None else lr
        writer = TraceWriter(out)
        try:
            loss, norm = _step(model, Tracer(writer, chosen, model.params), inputs, targets, positions, optimizer, lr)
            settings = {"name": optimizer, "lr": lr, **(ADAMW if optimizer == "adamw" else {})}
            writer.close({"source": f"minitrain {__version__}", "dtype": dtype, "device": device,
                          "arch": arch_name(model.config), "model": model.config.as_dict(), "init": str(init),
                          "data": str(data), "batch_size": batch_size, "seq_len": seq_len,
                          "packed": positions is not None, "targets": target_count(targets), "layers": chosen,
                          "optimizer": settings, "loss": loss, "grad_norm": norm})
        except BaseException:
            writer.discard()
            raise
    size = writer.path.stat().st_size
    say(f"trace: {len(writer.entries)} tensors ({size / 1e6:,.1f} MB) in {out}; loss {loss:.6f}, "
        f"gradient norm {norm:.6f}")
    return {"tensors": len(writer.entries), "bytes": size, "loss": loss, "grad_norm": norm, "out": str(out)}


def _step(model, tracer, inputs, targets, positions, optimizer, lr):
    """The traced step: batch, forward, backward, update; -> (loss, the gradient's global norm)."""
    tracer.record("input_ids", numpy.asarray(inputs, dtype=numpy.int64))
    tracer.record("targets", numpy.asarray(targets, dtype=numpy.int64))
    if positions is not None:
        tracer.record("positions", numpy.asarray(positions, dtype=numpy.int64))
    model.tracer = tracer
    try:
        logits = tracer.forward("logits", model.forward(inputs, positions=positions))  # (B, T, V)
        loss = tracer.forward("loss", ops.cross_entropy(logits, targets))  # ()
        loss.backward(watch=tracer.backward)
    finally:
        model.tracer = None
    params = model.params
    norm = global_grad_norm(params.values())
    before = {name: backend.to_numpy(t.data).copy() for name, t in params.items() if tracer.wanted(name)}
    if optimizer == "adamw":
        opt = AdamW(params.values(), lr, (ADAMW["beta1"], ADAMW["beta2"]), ADAMW["eps"], ADAMW["weight_decay"],
                    ADAMW["decay_1d"])
    else:
        opt = SGD(params.values(), lr)
    opt.step()
    for k, (name, t) in enumerate(params.items()):
        if name not in before:
            continue
        if optimizer == "adamw":
            tracer.record("step.m." + name, opt.m[k].reshape(t.shape))
            tracer.record("step.v." + name, opt.v[k].reshape(t.shape))
        after = backend.to_numpy(t.data)
        tracer.record("step.update." + name, after - before.pop(name))
        tracer.record("step.param." + name, after)
    return float(loss.data), norm
