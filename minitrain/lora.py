"""LoRA adapters (Hu et al. 2021) on a frozen model: what `pretrain --lora-rank R` trains.

For each targeted linear W (out, in) of every layer, the model computes

    y = x Wᵀ + b + s · (x_d Aᵀ) Bᵀ        A (R, in), B (out, R), s = alpha / R

(ops/lora.py: one Function, its backward derived there), with x_d = x under LoRA dropout during
training only. A is drawn as peft draws it, kaiming-uniform with a = sqrt(5) over fan_in = in,
which is U(-1/sqrt(in), 1/sqrt(in)) (gain sqrt(2 / (1 + a²)) = sqrt(1/3), bound = gain · sqrt(3 /
in)); B is zero, so before the first update the model is the base model bit for bit. Every base
tensor is frozen (requires_grad False): the backward forms no gradient for any of them, and the
optimizer holds state for A and B only.

Adapter tensors are named after their linear, `model.layers.{i}.self_attn.q_proj.lora_A.weight`:
peft's names without its `base_model.model.` prefix (formats/peft.py adds it). Merged,
W' = W + s · B A is the fine-tuned linear (final.apr holds the merged model).
"""

import math
from dataclasses import dataclass

import numpy

from minitrain import backend, ops
from minitrain.autograd import Tensor, grad_enabled
from minitrain.config import tensor_table as base_table
from minitrain.errors import InputError
from minitrain.model import check_table

# --lora-targets short name -> the linear within a layer (peft's target_modules are the last parts)
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# generator keys [seed, stream, ...], far from the data order's [seed, epoch]: "LoRA", "Drop"
INIT_STREAM, DROPOUT_STREAM = 0x4C6F5241, 0x44726F70


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = tuple(TARGETS)

    def __post_init__(self):
        if self.rank < 1:
            raise InputError(f"LoRA rank {self.rank}: must be at least 1 (--lora-rank)")
        if not self.alpha > 0:
            raise InputError(f"LoRA alpha {self.alpha}: must be positive (--lora-alpha)")
        if not 0 <= self.dropout < 1:
            raise InputError(f"LoRA dropout {self.dropout}: expected 0 <= P < 1 (--lora-dropout)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise InputError(f"LoRA targets {','.join(self.targets)}: expected distinct names among "
                             f"{','.join(TARGETS)} (--lora-targets)" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))

    @property
    def scale(self):
        return self.alpha / self.rank


def parse_targets(text):
    """"q,v" -> ("q", "v"), in the canonical order of TARGETS (checked by LoRASpec)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return tuple(sorted(names, key=lambda t: list(TARGETS).index(t) if t in TARGETS else len(TARGETS)))


def tensor_table(config, spec):
    """Every adapter tensor of `config` under `spec`, layer by layer: name -> shape."""
    base = base_table(config)
    table = {}
    for i in range(config.num_hidden_layers):
        for t in spec.targets:
            module = f"model.layers.{i}.{TARGETS[t]}"
            out, inp = base[module + ".weight"]
            table[module + ".lora_A.weight"] = (spec.rank, inp)
            table[module + ".lora_B.weight"] = (out, spec.rank)
    return table


class Adapters:
    """The A and B of every targeted linear, as trainable Tensors; `linear` is the model's hook."""

    def __init__(self, spec, config, arrays, source="LoRA adapters"):
        """arrays: name -> array, exactly tensor_table(config, spec) (checked; `source` names
        them in the error), copied into trainable parameters in backend.dtype."""
        table = tensor_table(config, spec)
        check_table(table, {n: tuple(a.shape) for n, a in arrays.items()}, source,
                    f"rank {spec.rank} on {','.join(spec.targets)} of a {config.num_hidden_layers}-layer model")
        self.spec = spec
        self.params = {n: Tensor(backend.xp.array(arrays[n], dtype=backend.dtype), requires_grad=True, name=n)
                       for n in table}
        self.rng = None  # dropout masks: set by reseed() before each training forward

    @classmethod
    def fresh(cls, spec, config, seed):
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) as peft's kaiming_uniform_(a=sqrt(5)), B = 0; drawn in
        table order from one generator seeded by (seed, "lora"): the same seed, the same adapters."""
        rng = numpy.random.default_rng([seed, INIT_STREAM])
        arrays = {}
        for name, shape in tensor_table(config, spec).items():
            if name.endswith("lora_A.weight"):
                bound = 1.0 / math.sqrt(shape[1])
                arrays[name] = rng.uniform(-bound, bound, shape)
            else:
                arrays[name] = numpy.zeros(shape)
        return cls(spec, config, arrays)

    def attach(self, model):
        """Freeze every base tensor of `model` and route its linears through these adapters."""
        for p in model.parameters():
            p.requires_grad = False
        model.adapters = self
        return model

    def parameters(self):
        return list(self.params.values())

    def arrays(self):
        return {n: backend.to_numpy(t.data) for n, t in self.params.items()}

    def reseed(self, seed, micro):
        """Dropout masks of the next forward from their own generator, keyed by the run's seed and
        the global index of the micro-batch: the same masks in a resumed or data-parallel run."""
        self.rng = numpy.random.default_rng([seed, DROPOUT_STREAM, micro]) if self.spec.dropout else None

    def linear(self, x, module, W, b):
        """The model's linear `module` (a tensor-name prefix): through its adapter if it has one."""
        A = self.params.get(module + ".lora_A.weight")
        if A is None:
            return ops.linear(x, W, b)
        keep = None
        if self.rng is not None and grad_enabled():  # dropout while training only, as nn.Dropout
            keep = backend.xp.asarray(self.rng.random(x.shape) >= self.spec.dropout)
        return ops.lora_linear(x, W, b, A, self.params[module + ".lora_B.weight"], self.spec.scale,
                               keep, self.spec.dropout)

    def merged(self, params):
        """name -> array of the model with every adapter folded in, W + s · B A (in float64, then
        to W's dtype); the other tensors as they are."""
        out = {n: backend.to_numpy(t.data) for n, t in params.items()}
        for name, A in self.params.items():
            if name.endswith(".lora_A.weight"):
                module = name[: -len(".lora_A.weight")]
                B = backend.to_numpy(self.params[module + ".lora_B.weight"].data).astype(numpy.float64)
                W = out[module + ".weight"]
                delta = self.spec.scale * (B @ backend.to_numpy(A.data).astype(numpy.float64))  # (out, in)
                out[module + ".weight"] = (W.astype(numpy.float64) + delta).astype(W.dtype)
        return out
