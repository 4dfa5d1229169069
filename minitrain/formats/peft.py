"""LoRA adapters in peft's directory format: what `PeftModel.from_pretrained(base, DIR)` loads.

    adapter_config.json         {"peft_type": "LORA", "r": R, "lora_alpha": alpha,
                                 "lora_dropout": p, "target_modules": ["q_proj", ...], ...}
    adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight
                                (R, in) and ...lora_B.weight (out, R), F32

peft computes y = base(x) + (alpha / r) · lora_B(lora_A(dropout(x))), the same as lora.py. Read
strictly: every option that would change that formula (rsLoRA's alpha / sqrt(r), DoRA, trained
biases, fan_in_fan_out's transposed weights, per-layer rank or alpha patterns, extra trained
modules, a regex of targets) is refused by name rather than silently dropped.
"""

import json
from pathlib import Path

import numpy

from minitrain.errors import InputError
from minitrain.formats import safetensors_io
from minitrain.formats.json_file import load_json
from minitrain.lora import TARGETS, LoRASpec

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
MODULE = {path.split(".")[-1]: short for short, path in TARGETS.items()}  # "q_proj" -> "q"
# options whose non-default value peft honours and minitrain does not: key -> its harmless values
UNSUPPORTED = {"use_rslora": (False, None), "use_dora": (False, None), "bias": ("none", None),
               "fan_in_fan_out": (False, None), "modules_to_save": (None, []), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "layers_to_transform": (None,), "lora_bias": (False, None),
               "trainable_token_indices": (None,), "target_parameters": (None, [])}


def write_adapter(directory, spec, arrays, base_model=None):
    """adapter_config.json + adapter_model.safetensors for lora.Adapters' arrays (our names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
              "target_modules": [TARGETS[t].split(".")[-1] for t in spec.targets], "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "modules_to_save": None, "inference_mode": True}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors_io.save(directory / WEIGHTS, {PREFIX + n: numpy.asarray(a, numpy.float32) for n, a in arrays.items()})


def read_adapter(directory):
    """(LoRASpec, name -> float32 array by our names) from a peft LoRA directory; the caller
    checks the arrays against its model (lora.Adapters)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (expected a peft adapter directory with {CONFIG})")
    path = directory / CONFIG
    config = load_json(path)
    if config.get("peft_type") != "LORA":
        raise InputError(f"{path}: peft_type {config.get('peft_type')!r}; minitrain reads LORA adapters")
    for key, fine in UNSUPPORTED.items():
        if config.get(key) not in fine:
            raise InputError(f"{path}: {key} = {config[key]!r} changes what the adapter computes, and minitrain "
                             f"implements plain LoRA only (expected {fine[0]!r})")
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not all(m in MODULE for m in modules):
        raise InputError(f"{path}: target_modules {modules!r}; expected a list of {', '.join(MODULE)}")
    for key in ("r", "lora_alpha", "lora_dropout"):
        value = config.get(key)
        if key == "lora_dropout" and value is None:  # absent, or null as peft writes it: none
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise InputError(f"{path}: {key} {value!r} is not a number")
    if config["r"] != int(config["r"]):
        raise InputError(f"{path}: r {config['r']!r} is not an integer")
    try:
        spec = LoRASpec(int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout") or 0.0),
                        tuple(sorted({MODULE[m] for m in modules}, key=list(TARGETS).index)))
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    arrays = safetensors_io.load(directory / WEIGHTS)
    foreign = [n for n in arrays if not n.startswith(PREFIX)]
    if foreign:
        raise InputError(f"{directory / WEIGHTS}: tensor {foreign[0]} lacks peft's {PREFIX!r} prefix")
    return spec, {n[len(PREFIX):]: a for n, a in arrays.items()}
