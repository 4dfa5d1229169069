"""Training checkpoints: `OUT/step-N/` holds everything a run needs to continue exactly.

    model.safetensors      every parameter, by Hugging Face name, in the training dtype
    optimizer.safetensors  AdamW's two moments per trained tensor ("m.NAME", "v.NAME"); absent for SGD
    adapter.safetensors    LoRA's A and B of every targeted linear (lora.py); only with LoRA, whose
                           model.safetensors holds the frozen base (the run's own, self-contained)
    state.json             step, next data sample, optimizer step count, init_loss, the last
                           val_loss (the divergence gate's reference), the model config and the
                           resolved run configuration

A save is atomic: everything is written into a hidden temporary directory next to the target,
flushed to disk, then renamed to `step-N` in one step. A run killed mid-save leaves only the
temporary directory, which `load` never accepts (it needs state.json, written last).

A run directory's complete checkpoints (`completed`) are what `--resume auto` picks the newest of
and what `--keep-last N` prunes: after a save, the oldest complete ones beyond N are deleted, never
the one just written and never one that is not complete.
"""

import json
import os
import re
import shutil
from pathlib import Path

from minitrain import backend
from minitrain.errors import InputError, write_failed
from minitrain.formats import safetensors_io
from minitrain.formats.json_file import load_json

FORMAT = "minitrain-checkpoint-v1"
# what a resumed run reads of state.json: field -> (the types it may have, what they are called, its least value)
STATE_FIELDS = {"step": ((int,), "a count", 0), "ranks": ((int,), "a count", 1),
                "init_loss": ((int, float, type(None)), "a number or null", None),
                "last_val_loss": ((int, float, type(None)), "a number or null", None),
                **{key: ((dict,), "an object", None) for key in ("optimizer", "config", "model_config")}}
ADAPTER = "adapter.safetensors"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, params, optimizer_state, state, adapters=None):
    """params, adapters: name -> Tensor (the model's; LoRA's or None); optimizer_state: (scalars,
    arrays) of the whole optimizer (Optimizer.state())."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    scalars, arrays = optimizer_state
    files = {"model.safetensors": {n: backend.to_numpy(t.data) for n, t in params.items()},
             ADAPTER: adapters and {n: backend.to_numpy(t.data) for n, t in adapters.items()},
             "optimizer.safetensors": arrays and {n: backend.to_numpy(a) for n, a in arrays.items()}}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, tensors in files.items():
            if tensors:
                safetensors_io.save(tmp / name, tensors)
        (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state, "optimizer": scalars}, indent=1) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if directory.exists():  # the same step saved again (a resumed run writing into its old directory)
            shutil.rmtree(directory)
        os.rename(tmp, directory)
        _fsync(directory.parent)
    except OSError as e:  # a full disk, most often: nothing half-written stays, earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(directory, e, sum(a.nbytes for t in files.values() if t for a in t.values())) from None


def completed(out):
    """[(step, path)] of the complete checkpoints OUT/step-N (state.json of this format), by step."""
    found = []
    for path in Path(out).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        try:
            complete = match and load_json(path / "state.json").get("format") == FORMAT
        except (OSError, InputError):
            complete = False
        if complete:
            found.append((int(match[1]), path))
    return sorted(found)


def newest(out):
    """The newest complete checkpoint in OUT, or None."""
    found = completed(out)
    return found[-1][1] if found else None


def prune(out, keep, current):
    """Delete the oldest complete checkpoints of OUT beyond the newest `keep`, never `current`;
    -> the paths deleted."""
    old = [path for _, path in completed(out)[:-keep] if path != Path(current)]
    for path in old:
        shutil.rmtree(path)
    return old


def load(directory):
    """(state, model arrays, optimizer arrays, adapter arrays or None) of a complete checkpoint;
    InputError otherwise."""
    directory = Path(directory)
    state_file = directory / "state.json"
    if not state_file.exists():
        raise InputError(f"{directory}: not a complete checkpoint (no state.json)")
    state = load_json(state_file)
    if state.get("format") != FORMAT:
        raise InputError(f"{state_file}: format {state.get('format')!r}, expected {FORMAT!r}")
    for key, (kinds, expected, least) in STATE_FIELDS.items():
        if key not in state:
            raise InputError(f"{state_file}: no {key}")
        value = state[key]
        if not isinstance(value, kinds) or isinstance(value, bool) or (least is not None and value < least):
            raise InputError(f"{state_file}: {key} is {value!r}"[:200] + f", expected {expected}")
    model = safetensors_io.load(directory / "model.safetensors")
    opt_file, adapter_file = directory / "optimizer.safetensors", directory / ADAPTER
    return (state, model, safetensors_io.load(opt_file) if opt_file.exists() else {},
            safetensors_io.load(adapter_file) if adapter_file.exists() else None)
