"""Every differentiable op, each a Function with forward and backward side by side."""

from minitrain.ops.activations import silu, swiglu, swiglu_packed
from minitrain.ops.attention import attention
from minitrain.ops.basic import add, mean, mul, reshape, sum, transpose
from minitrain.ops.cast import cast
from minitrain.ops.cross_entropy import cross_entropy, linear_cross_entropy
from minitrain.ops.distill import linear_distillation
from minitrain.ops.dpo import dpo_loss
from minitrain.ops.embedding import embedding
from minitrain.ops.linear import linear
from minitrain.ops.lora import lora_linear
from minitrain.ops.packed import Packed, linear_split
from minitrain.ops.recompute import recompute
from minitrain.ops.rmsnorm import rmsnorm
from minitrain.ops.rope import rope
from minitrain.ops.sequence_logprob import linear_sequence_logprob

__all__ = ["add", "attention", "cast", "cross_entropy", "dpo_loss", "embedding", "linear", "linear_cross_entropy", "linear_distillation",
           "linear_sequence_logprob", "linear_split", "lora_linear", "mean", "mul", "Packed", "recompute", "reshape", "rmsnorm",
           "rope", "silu", "sum", "swiglu", "swiglu_packed", "transpose"]
