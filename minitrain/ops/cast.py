"""Casts between float32 and bfloat16 activations: where mixed precision enters and leaves the model."""

from minitrain import backend
from minitrain.autograd import Function, Tensor


class Cast(Function):
    """y = x in another precision: 'bf16' (rounded to nearest even, stored as uint16 bits) or
    'fp32' (exact widening).

    Rounding is treated as the identity for the derivative (its true derivative is 0 almost
    everywhere, which would stop all learning); so the backward is the cast back:
      to bf16:  dx = fp32(dy)          to fp32:  dx = bf16(dy)
    """

    def forward(self, x, to):
        if to not in ("bf16", "fp32"):
            raise ValueError(f"cast: unknown precision {to!r}: expected 'bf16' or 'fp32'")
        self.save(to)
        return backend.to_bf16(x) if to == "bf16" else backend.from_bf16(x)

    def backward(self, g):
        (to,) = self.saved
        return (backend.from_bf16(g) if to == "bf16" else backend.to_bf16(g),)


def cast(x, to):
    return Cast.apply(x, to=to)


def bf16_weight(x, w):
    """The bf16 copy a parameter Tensor keeps (Tensor.bf16_copy) when the activation x is bf16,
    else None: what a bf16 op reads in place of rounding the fp32 master weight again."""
    return w.bf16_copy() if x.dtype == backend.BF16 and isinstance(w, Tensor) else None
