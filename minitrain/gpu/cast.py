"""Launching kernels/cast.cu: the bf16 casts, the bf16 sum and the bf16 bias add, one pass each
(backend.to_bf16, from_bf16, add_bf16 and add_bias_bf16 call these on the GPU). Each takes C-contiguous arrays of one size and
writes `out` in place."""

from minitrain.gpu import BLOCK, elementwise_grid


def _check(name, out, *arrays, dtypes):
    found = [a.dtype.name for a in (*arrays, out)]
    if found != list(dtypes) or any(a.size != out.size for a in arrays):
        raise ValueError(f"{name} kernel: needs {', '.join(dtypes)} arrays of one size; found "
                         f"{', '.join(f'{d} {tuple(a.shape)}' for d, a in zip(found, (*arrays, out)))}")


def to_bf16(launch, x, out):
    """out (uint16 bf16 bits) = x (float32) rounded to nearest even."""
    _check("cast_f32_to_bf16", out, x, dtypes=("float32", "uint16"))
    launch("cast", "cast_f32_to_bf16", elementwise_grid(x.size), (BLOCK,), (x, out, x.size))


def from_bf16(launch, x, out):
    """out (float32) = x (bf16 bits) widened exactly."""
    _check("cast_bf16_to_f32", out, x, dtypes=("uint16", "float32"))
    launch("cast", "cast_bf16_to_f32", elementwise_grid(x.size), (BLOCK,), (x, out, x.size))


def add_bf16(launch, a, b, out):
    """out = a + b for bf16 bits, added in fp32 and rounded once; out may be a or b."""
    _check("add_bf16", out, a, b, dtypes=("uint16", "uint16", "uint16"))
    launch("cast", "add_bf16", elementwise_grid(out.size), (BLOCK,), (a, b, out, out.size))


def add_bias(launch, acc, b, out):
    """out (rows, cols) bf16 = acc (rows, cols) float32 + b (cols,) float32 by column, rounded once."""
    _check("add_bias_bf16", out, acc, dtypes=("float32", "uint16"))
    if b.dtype.name != "float32" or b.shape != acc.shape[-1:]:
        raise ValueError(f"add_bias_bf16 kernel: the bias must be float32 {acc.shape[-1:]}; found "
                         f"{b.dtype.name} {tuple(b.shape)}")
    launch("cast", "add_bias_bf16", elementwise_grid(out.size), (BLOCK,), (acc, b, out, out.size, b.size))
