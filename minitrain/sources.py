"""Model sources for `--init` and `eval --init`: a Hugging Face checkpoint directory."""

from pathlib import Path

from minitrain import hf
from minitrain.errors import InputError
from minitrain.model import Model


def load_model(path, dtype=None):
    """A Model with the weights of `path`, strictly checked (see minitrain/hf.py)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise InputError(f"{p}: not a Hugging Face checkpoint directory (config.json + model.safetensors)")
    cfg, arrays = hf.load_dir(p)
    return Model.from_arrays(cfg, arrays, dtype)
