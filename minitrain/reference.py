"""DPO's reference log-probabilities: computed once, before the first step, and kept beside the run.

For every pair of the training data and of the validation data, the reference model's summed
log-probability of the chosen and of the rejected completion (ops/sequence_logprob.py, in the
run's dtype, batches of --batch-size pairs), so that the reference model is not held, nor run,
while training. They go to OUT/reference/ on the lead rank:

    train.npy, val.npy   (pairs, 2) float64 [chosen, rejected] for --data's and --val-data's pairs
                         (val.npy only with --val-data: held-out pairs of --data are in train.npy)
    reference.json       what they were computed from: the reference, the data and its manifest's
                         sha256, --seq-len, the dtype, the pairs

A fresh run computes them (any old ones in --out are replaced); a resumed run reads them, after
checking reference.json against its own options, and computes them again only if they are gone.
Either happens before the run's first file (run.json) is written.

The reference is --ref, else --init. Where it is --init and the run is fresh without --lora-from,
the policy itself at step 0 is the reference (LoRA's B is zero), so no second model is loaded;
otherwise the reference is loaded, used and dropped before training starts. Under mpiexec rank r
computes batches r, r+N, ... and every rank receives all of them.
"""

import hashlib
import json
import time
from pathlib import Path

import numpy

from minitrain import backend
from minitrain.autograd import no_grad
from minitrain.config import arch_name
from minitrain.data import manifest_path
from minitrain.errors import InputError, writing
from minitrain.formats import sources
from minitrain.progress import duration

FILES = {"train": "train.npy", "val": "val.npy"}


class Reference:
    """The reference log-probabilities of one run's pairs, in two steps: made before the preflight
    (kept files checked against the run, or the reference model loaded: a bad --ref fails before
    anything is computed or written), then `attach`ed."""

    def __init__(self, cfg, model, data, say):
        self.cfg, self.say, self.folder = cfg, say, Path(cfg.out) / "reference"
        self.sets = {"train": data.stream.windows}  # name -> data.PairWindows
        if data.val_source is not None and data.val_source is not data.stream.windows:
            self.sets["val"] = data.val_source
        self.record = _record(cfg, self.sets)
        self.kept = bool(cfg.resume) and (self.folder / "reference.json").is_file()
        if self.kept:
            _check(self.folder / "reference.json", self.record)
            self.model, self.name = None, None
        else:
            self.model, self.name = _reference_model(cfg, model, say)
        self.held = sum(p.data.nbytes for p in self.model.parameters()) if self.model not in (None, model) else 0

    def attach(self, group):
        """Give each pair source its log-probabilities: the kept files read, or computed (and written
        on the lead rank); the reference model is dropped after."""
        if self.kept:
            for name, pairs in self.sets.items():
                pairs.reference = _read(self.folder / FILES[name], len(pairs))
            self.say(f"reference log-probabilities: read {self.folder} ("
                     f"{', '.join(f'{len(p):,} {n}' for n, p in self.sets.items())} pairs)")
            return
        start, done = time.perf_counter(), 0
        total = sum(len(p) for p in self.sets.values())
        for name, pairs in self.sets.items():
            pairs.reference, done = _compute(self.model, pairs, self.cfg.batch_size, group, self.say, done, total, start)
        self.model = None
        self.say(f"reference log-probabilities of {total:,} pairs ({self.name}) in "
                 f"{duration(time.perf_counter() - start)}: {self.folder}")
        if group.rank == 0:
            with writing(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
                for name, pairs in self.sets.items():
                    numpy.save(self.folder / FILES[name], pairs.reference)
                (self.folder / "reference.json").write_text(json.dumps(self.record, indent=1) + "\n")


def _record(cfg, sets):
    """What the log-probabilities depend on, as reference.json records it."""
    data = {"train": cfg.data, "val": cfg.val_data}
    return {"reference": cfg.ref or cfg.init, "seq_len": cfg.seq_len, "dtype": cfg.dtype,
            **{name: {"data": data[name], "pairs": len(pairs), "manifest_sha256": _manifest_digest(data[name])}
               for name, pairs in sets.items()}}


def _manifest_digest(path):
    return hashlib.sha256(manifest_path(path).read_bytes()).hexdigest()


def _check(path, record):
    """InputError naming the first field of reference.json that differs from this run's."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not JSON ({e}); remove {path.parent} to compute the reference again") from None
    fields = [(key, want) for key, want in record.items() if not isinstance(want, dict)]
    fields += [(f"{key}.{inner}", v) for key, want in record.items() if isinstance(want, dict) for inner, v in want.items()]
    for name, want in fields:
        found = saved
        for part in name.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found != want:
            raise InputError(f"{path}: {name} {found!r}, this run's {want!r}: the log-probabilities were computed for "
                             f"other data or another reference; remove {path.parent} to compute them again")


def _read(path, pairs):
    try:
        array = numpy.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); remove {path.parent} to compute the reference again") from None
    if array.shape != (pairs, 2) or array.dtype != numpy.float64 or not numpy.isfinite(array).all():
        raise InputError(f"{path}: expected ({pairs}, 2) finite float64 log-probabilities, found {array.shape} "
                         f"{array.dtype}; remove {path.parent} to compute the reference again")
    return array


def _reference_model(cfg, model, say):
    """(the reference Model, its name): the policy itself where it is --init as loaded (see the
    module's docstring), else --ref or --init loaded now (the policy's vocabulary)."""
    path = cfg.ref or cfg.init
    if not cfg.ref and not cfg.lora_from and not cfg.resume:
        return model, f"--init {path}, the policy before its first step"
    reference = sources.load_model(path)
    if reference.config.vocab_size != model.config.vocab_size:
        raise InputError(f"--ref {path}: its vocabulary has {reference.config.vocab_size} tokens, the policy's "
                         f"{model.config.vocab_size}; DPO compares their log-probabilities of the same token ids")
    say(f"reference {path}: {arch_name(reference.config)}, {reference.num_parameters():,} parameters (frozen, "
        f"dropped after this)")
    return reference, f"{'--ref' if cfg.ref else '--init'} {path}"


def _compute(model, pairs, B, group, say, done, total, start):
    """(pairs, 2) float64: the summed log-probabilities of each pair's chosen and rejected
    completion under `model`. -> (the array, pairs done so far of `total`)."""
    batches = range(0, len(pairs), B)
    mine, last = [], time.perf_counter()
    with no_grad():
        for k in range(group.rank, len(batches), group.size):
            ids = list(range(batches[k], min(batches[k] + B, len(pairs))))
            batch = pairs.examples(ids)
            logps = backend.to_numpy(model.sequence_logprobs(batch.inputs, batch.targets).data).astype(numpy.float64)
            mine += [(i, c, r) for i, c, r in zip(ids, logps[:len(ids)], logps[len(ids):])]
            if time.perf_counter() - last > 10.0:
                last, now = time.perf_counter(), done + len(mine) * group.size
                say(f"reference log-probabilities: {now:,}/{total:,} pairs | ETA "
                    f"{duration((total - now) * (last - start) / max(1, now))}")
    out = numpy.zeros((len(pairs), 2))
    for i, c, r in group.gather(mine, -(-len(batches) // group.size) * B, 3):
        out[int(i)] = c, r
    return out, done + len(pairs)
