"""Projections fused into one GEMM: parameters packed side by side in one buffer, and a matmul's
output split back into its blocks of columns.

A layer's q, k and v projections read the same input h, and so do gate and up:

    [q | k | v] = h [Wq; Wk; Wv]^T          one GEMM of N = (nH + 2 nKV) hd instead of three
    dh = [dq | dk | dv] [Wq; Wk; Wv]         one GEMM; the three products' sum is its K-loop
    [dWq; dWk; dWv] = [dq | dk | dv]^T h     one GEMM

`Packed` moves the data of such parameters into one C-contiguous buffer (rows one after
another) and leaves each Tensor's data a view of its rows: the same Tensors, with the same names
and values, so loading, the optimizer, checkpoints and every file written see nothing new.
`Packed.tensor()` is that buffer as one Tensor of the graph, with no copy (the Concat op); its
gradient comes back to each parameter as a view of its rows of the one dW (autograd keeps the
views: they are disjoint, Concat.splits). `linear_split` is the other half: one linear, its output
split into contiguous blocks of columns, whose gradients are written into one gradient of the
output (the Columns op).
"""

from minitrain import backend
from minitrain.autograd import Function
from minitrain.gpu import address
from minitrain.ops.linear import linear


def _rows_of(parts, whole):
    """Whether the arrays are consecutive row blocks of `whole`, from its first row to its last."""
    start = address(whole)
    for p in parts:
        if address(p) != start or p.shape[1:] != whole.shape[1:] or not p.flags.c_contiguous:
            return False
        start += p.nbytes
    return start == address(whole) + whole.nbytes


class Concat(Function):
    """W = [W_1; W_2; ...] along the first axis (shapes (n_i, ...) -> (sum n_i, ...)); the backward
    hands each part its row block of dW: dW_i = dW[start_i : start_i + n_i].

    When the parts already are the row blocks of `whole` (Packed keeps them so) the forward is
    `whole` itself, no copy; otherwise (a part's data was replaced) it concatenates."""

    splits = True  # the backward returns disjoint views of its incoming gradient

    def forward(self, *parts, whole=None):
        self.save([p.shape[0] for p in parts])
        return whole if whole is not None and _rows_of(parts, whole) else backend.xp.concatenate(parts)

    def backward(self, g):
        (sizes,) = self.saved
        grads, start = [], 0
        for n in sizes:
            grads.append(g[start:start + n])  # (n_i, ...)
            start += n
        return tuple(grads)


class Packed:
    """Parameter Tensors made consecutive row blocks of one buffer (their data become views of it)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.whole = backend.xp.concatenate([t.data for t in self.tensors])  # (sum n_i, ...)
        start = 0
        for t in self.tensors:
            t.data, start = self.whole[start:start + t.shape[0]], start + t.shape[0]
            t.bf16 = None
        self.whole16 = None

    def tensor(self):
        """The parameters as one Tensor of the graph (Concat), carrying the bf16 copy of the whole
        in a bf16 run when they are weights (what a bf16 linear reads; biases are added in fp32)."""
        out = Concat.apply(*self.tensors, whole=self.whole)
        if backend.bf16 and out.data is self.whole and self.whole.ndim == 2:
            out.bf16 = self._bf16()
        return out

    def _bf16(self):
        """The parameters' bf16 copies as row blocks of one bf16 buffer: AdamW writes each in place
        with its update (Tensor.bf16_copy), so the whole is current. Rounded here again only when
        a parameter has none (the first use; SGD or ZeRO's all-gather dropped it)."""
        if self.whole16 is None or not all(t.bf16 is not None for t in self.tensors) \
                or not _rows_of([t.bf16 for t in self.tensors], self.whole16):
            self.whole16 = backend.to_bf16(self.whole)
            start = 0
            for t in self.tensors:
                t.bf16, start = self.whole16[start:start + t.shape[0]], start + t.shape[0]
        return self.whole16


class Columns(Function):
    """One block of columns of y, y[..., start:stop], as a contiguous array. The blocks of one
    split share y's gradient (`shared`, a one-item list): the first block's backward makes it,
    zeros of y's shape, writes its columns and returns it; each other block writes its columns
    into the same array (autograd differentiates y only after all of its consumers, and y has no
    other: linear_split never hands it out)."""

    def forward(self, y, shared, start, stop):
        self.save(shared, start, stop, y.shape, y.dtype)
        return backend.xp.ascontiguousarray(y[..., start:stop])

    def backward(self, g):
        shared, start, stop, shape, dtype = self.saved
        first = not shared
        if first:
            shared.append(backend.xp.zeros(shape, dtype=dtype))
        shared[0][..., start:stop] = g
        return (shared[0] if first else None), None, None, None


def linear_split(x, W, b, sizes):
    """x W^T (+ b), its last axis split into contiguous blocks of `sizes` columns: [x W_1^T, ...]
    for W = [W_1; W_2; ...] (a Packed tensor)."""
    y = linear(x, W, b)
    shared, start, blocks = [], 0, []
    for n in sizes:
        blocks.append(Columns.apply(y, shared, start, start + n))
        start += n
    return blocks
