"""Launching the fused kernels: RMSNorm (kernels/rmsnorm.cu), RoPE (rope.cu), softmax
cross-entropy (cross_entropy.cu), the AdamW step (adamw.cu) and the gradient norm's sums of
squares (grad_norm.cu); the last two over every parameter at once, from a table of addresses.

Each function takes the `launch(source, kernel, grid, block, args)` callable (see __init__.py)
and C-contiguous arrays (float32, or bf16 as uint16 bits), writes its outputs in place and
returns nothing. Shapes are read from the arrays; sizes go to the kernels as C longs.
"""

import numpy

from minitrain.gpu import BLOCK, address, elementwise_grid, suffix, warps

RMS_COLS = 8  # kernels/rmsnorm.cu COLS: columns each thread keeps in registers
RMS_PARTS = 512  # most row blocks in the RMSNorm backward (rows of its dw scratch)
REDUCE_ROWS = 8  # kernels/rmsnorm.cu REDUCE_ROWS
CE_BLOCK = 512  # most threads per row in the cross-entropy forward
CE_COLUMNS = 16  # columns per thread the cross-entropy kernels aim for
NORM_THREADS = 256  # kernels/grad_norm.cu THREADS


def _rms_block(H):
    if H > RMS_COLS * 1024:
        raise ValueError(f"rmsnorm kernel: hidden size {H} is over {RMS_COLS * 1024}, the most a block keeps "
                         f"in registers ({RMS_COLS} columns per thread, 1024 threads)")
    return (warps(-(-H // 4), 1024),)  # about 4 columns per thread


def rmsnorm_forward(launch, x, w, y, r, eps):
    """y = x * r * w over the last axis of x (..., H); r (rows,) float32 = 1/sqrt(mean(x^2) + eps)."""
    H = x.shape[-1]
    launch("rmsnorm", f"rmsnorm_forward_{suffix(x)}", (x.size // H,), _rms_block(H), (x, w, y, r, H, float(eps)))


def rmsnorm_parts(rows):
    """The row count of the RMSNorm backward's scratch: allocate it as float32 (parts, H), not
    necessarily zeroed (the kernel writes every entry)."""
    return max(1, min(rows, RMS_PARTS))


def rmsnorm_backward(launch, dy, x, w, r, dx, dw, partial):
    """dx (like x) = r (dxhat - xhat mean(dxhat xhat)), dxhat = dy w; dw (H,) float32 += sum over rows
    of dy xhat. `partial`: float32 scratch (parts, H), parts = rmsnorm_parts(rows) (any parts >= 1
    works: each of the parts blocks takes every parts-th row)."""
    H = x.shape[-1]
    parts = partial.shape[0]
    if partial.shape != (parts, H) or partial.dtype.name != "float32":
        raise ValueError(f"rmsnorm backward: scratch must be float32 (parts, {H}); "
                         f"found {partial.dtype.name} {tuple(partial.shape)}")
    launch("rmsnorm", f"rmsnorm_backward_{suffix(x)}", (parts,), _rms_block(H),
           (dy, x, w, r, dx, partial, x.size // H, H))
    launch("rmsnorm", "rmsnorm_dw_reduce", (-(-H // 32),), (32, REDUCE_ROWS), (partial, dw, parts, H))


def _rope(launch, direction, x, cos, sin, y):
    """The kernel reads table row (b*T + t) % rows: rows = T shares one table over the batch,
    rows = B*T gives every row its own positions."""
    B, T, nH, hd = x.shape
    rows = cos.shape[0]
    if hd % 2 or rows not in (T, B * T) or cos.shape != (rows, hd // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope kernel: x (B, T, nH, hd) = {tuple(x.shape)} needs an even hd and cos, sin of "
                         f"({T} or {B * T}, {hd // 2}); found cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    launch("rope", f"rope_{direction}_{suffix(x)}", elementwise_grid(x.size // 2), (BLOCK,),
           (x, cos, sin, y, x.size, rows, nH, hd))


def rope_forward(launch, x, cos, sin, y):
    """y = x rotated by position, x (B, T, nH, hd), cos and sin float32 (T or B*T, hd/2); y may be x."""
    _rope(launch, "forward", x, cos, sin, y)


def rope_backward(launch, dy, cos, sin, dx):
    """dx = dy rotated back (the inverse rotation); dx may be dy."""
    _rope(launch, "backward", dy, cos, sin, dx)


def _ce_rows(logits, targets):
    V = logits.shape[-1]
    N = logits.size // V
    if targets.dtype.name != "int64" or targets.size != N:
        raise ValueError(f"cross-entropy kernel: targets must be int64 ({N},) for logits {tuple(logits.shape)}; "
                         f"found {targets.dtype.name} {tuple(targets.shape)}")
    return N, V


def cross_entropy_forward(launch, logits, targets, loss, lse):
    """loss (N,) float32 = lse - logits[target], lse (N,) float32 = log sum exp over each row of the
    logits (N, V); targets (N,) int64, each in [0, V) (the caller checks). The mean is the caller's."""
    N, V = _ce_rows(logits, targets)
    block = (warps(-(-V // CE_COLUMNS), CE_BLOCK),)
    launch("cross_entropy", f"cross_entropy_forward_{suffix(logits)}", (N,), block, (logits, targets, loss, lse, V))


def cross_entropy_backward(launch, logits, targets, lse, dlogits, scale):
    """dlogits (logits' shape) = (softmax - onehot(target)) * scale, softmax = exp(logits - lse);
    scale = upstream gradient / N. dlogits is in the logits' dtype (and may be logits), or bf16 for
    float32 logits."""
    N, V = _ce_rows(logits, targets)
    kind = suffix(logits) if dlogits.dtype == logits.dtype else f"{suffix(logits)}_{suffix(dlogits)}"
    if kind not in ("f32", "bf16", "f32_bf16") or dlogits.shape != logits.shape:
        raise ValueError(f"cross-entropy kernel: dlogits must be {tuple(logits.shape)}, in the logits' "
                         f"{logits.dtype.name} or bf16; found {dlogits.dtype.name} {tuple(dlogits.shape)}")
    chunks = min(65535, -(-V // (BLOCK * CE_COLUMNS)))
    launch("cross_entropy", f"cross_entropy_backward_{kind}", (N, chunks), (BLOCK,),
           (logits, targets, lse, dlogits, V, float(scale)))


def adamw_table(pieces, chunk):
    """The table of adamw_multi (a host int64 array, one row per parameter): `pieces` are
    (p, g, m, v, p_bf16, decays) per parameter: flat C-contiguous float32 arrays of one size, and
    None or a uint16 array of that size for the bf16 copy to write."""
    rows, first = [], 0
    for p, g, m, v, p16, decays in pieces:
        if any(a.dtype.name != "float32" or a.size != p.size or not a.flags.c_contiguous for a in (g, m, v)) \
                or (p16 is not None and (p16.dtype.name != "uint16" or p16.size != p.size)):
            raise ValueError(f"adamw kernel: p, g, m, v must be C-contiguous float32 of one size, the copy uint16; "
                             f"found {[(a.dtype.name, a.size) for a in (p, g, m, v, p16) if a is not None]}")
        rows.append((*map(address, (p, g, m, v)), 0 if p16 is None else address(p16), p.size, int(bool(decays)), first))
        first += -(-p.size // chunk)
    return numpy.array(rows, dtype=numpy.int64).reshape(-1, 8), first


def adamw_multi(launch, table, blocks, chunk, *, lr, b1, b2, eps, wd, step_size, bc2_sqrt):
    """One AdamW step in place on every parameter of adamw_table's `table` (on the device; `blocks`
    = its second value), exactly as minitrain.optim.AdamW computes it: rows that decay use
    1 - lr * wd, the others 1. step_size = lr / (1 - b1^t), bc2_sqrt = sqrt(1 - b2^t). Each block
    takes `chunk` elements of one parameter. Every derived scalar is computed here in float64, then
    rounded to float32 by the launch, which is what NumPy does with a Python float beside a float32
    array."""
    scalars = (1 - lr * wd, b1, 1 - b1, b2, 1 - b2, eps, step_size, bc2_sqrt)
    if blocks:
        launch("adamw", "adamw_multi", (blocks,), (BLOCK,), (table, table.shape[0], chunk, *map(float, scalars)))


def sum_squares_table(arrays, chunk):
    """The table of sum_squares (a host int64 array, one row per 1-D float32 array) and the number
    of `chunk`-element slices in all."""
    rows, first = [], 0
    for g in arrays:
        if g.ndim != 1 or g.dtype.name != "float32" or not g.flags.c_contiguous:
            raise ValueError(f"sum_squares kernel: gradients must be 1-D C-contiguous float32; found "
                             f"{g.dtype.name} {tuple(g.shape)}")
        rows.append((address(g), g.size, first))
        first += -(-g.size // chunk)
    return numpy.array(rows, dtype=numpy.int64).reshape(-1, 3), first


def sum_squares(launch, table, chunk, sums):
    """sums (slices,) float64 = sum of g^2 over each `chunk`-element slice of each array of
    sum_squares_table's `table` (on the device), in the arrays' order, each in float64 by a fixed
    order (see kernels/grad_norm.cu)."""
    if sums.dtype.name != "float64" or sums.ndim != 1:
        raise ValueError(f"sum_squares kernel: sums must be 1-D float64; found {sums.dtype.name} {tuple(sums.shape)}")
    if sums.size:
        launch("grad_norm", "sum_squares_multi", (sums.size,), (NORM_THREADS,), (table, table.shape[0], chunk, sums))
