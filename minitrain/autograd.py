"""The autograd engine: a small Tensor, Functions that remember what backward needs, and a
topological backward pass. Read docs/autograd.md for a worked example traced by hand.

A `Tensor` wraps an array (`.data`) and, if it requires grad, receives `.grad` from `backward()`.
A `Function` is one differentiable op. `Fn.apply(*args)` runs `forward` on the raw arrays and,
when any input needs a gradient (and grad mode is on), returns a Tensor whose `.ctx` is the
Function instance: that instance holds the inputs and the arrays it saved, which is the graph.

`loss.backward()` visits the graph in reverse topological order (every consumer of a tensor
before the tensor itself), so when a tensor is reached its gradient is complete: the sum over all
its uses. A weight used twice (tied embeddings: lookup and lm_head) therefore gets the sum of
both contributions. Each Function is released as soon as its backward has run, so activations
are freed during the pass, and a second backward through the same graph is an error.
"""

from contextlib import contextmanager

from minitrain import backend

_grad_enabled = True


@contextmanager
def no_grad():
    """Within this block no graph is recorded (evaluation, optimizer updates, checks)."""
    global _grad_enabled
    saved, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = saved


def grad_enabled():
    """False inside no_grad(): no graph is being recorded (ops that only train, like dropout, skip)."""
    return _grad_enabled


class Tensor:
    """An array and, after backward(), its gradient. `x + y`, `x * y`, `x.reshape(...)`,
    `x.transpose(...)`, `x.sum(...)` and `x.mean(...)` are the ops of minitrain/ops/basic.py,
    which attaches them here (this module knows no op)."""

    __slots__ = ("data", "grad", "requires_grad", "ctx", "name", "bf16")

    def __init__(self, data, requires_grad=False, name=None, ctx=None):
        self.data = data  # an xp array
        self.grad = None  # same shape as data, filled by backward()
        self.requires_grad = requires_grad
        self.ctx = ctx  # the Function that produced this tensor; None for a leaf
        self.name = name
        self.bf16 = None  # data rounded to bf16, kept between steps (bf16_copy)

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def __repr__(self):
        label = f" {self.name}" if self.name else ""
        return f"Tensor{label}(shape={tuple(self.shape)}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def zero_grad(self):
        self.grad = None

    def bf16_copy(self):
        """data rounded to bf16 bits: what the bf16 matmuls and norms of mixed precision read.
        Rounded here on first use and then kept: whoever writes data in place writes the copy too
        (AdamW's kernel, in the same pass) or drops it (`bf16 = None`), so a forward never
        re-rounds the weights."""
        if self.bf16 is None:
            self.bf16 = backend.to_bf16(self.data)
        return self.bf16

    def backward(self, grad=None, watch=None):
        """Accumulate d(self)/d(leaf) * grad into every leaf's `.grad`.

        `grad` defaults to 1 for a scalar. Leaf gradients ADD to what `.grad` already holds
        (this is how gradient accumulation over micro-batches works; call `zero_grad` between
        optimizer steps). `watch(t, g)`, if given, sees every named tensor's gradient in this pass
        (an intermediate named by trace.py, a parameter) at the moment it is complete, in the
        order the pass completes them; g may be a RowSparse (an embedding's) and must not be kept.
        """
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = backend.xp.ones_like(self.data)
        if grad.shape != self.data.shape:
            raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")
        grads = {id(self): grad}
        handed_out = set()  # ids of arrays already stored in some leaf's .grad during this pass
        owned = set()  # ids of gradients in `grads` that nothing else references: safe to add into
        for t in reversed(_topological_order(self)):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            mine = id(g) in owned  # nothing but t's gradient is this array
            owned.discard(id(g))
            if watch is not None and t.name is not None:
                watch(t, g)
            fn = t.ctx
            if fn is None:
                _accumulate_leaf(t, g, handed_out, mine)
                continue
            if fn.inputs is None:
                raise RuntimeError("backward through a graph that was already released "
                                   "(each forward can be differentiated once)")
            input_grads = fn.backward(g)
            returned = [id(ig) for ig in input_grads if ig is not None]
            for inp, ig in zip(fn.inputs, input_grads):
                if ig is None or not (isinstance(inp, Tensor) and inp.requires_grad):
                    continue
                if ig.shape != inp.shape:
                    raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape "
                                       f"{ig.shape} for an input of shape {inp.shape}")
                prev = grads.get(id(inp))
                if prev is None:
                    grads[id(inp)] = ig
                    # a fresh array (not the incoming gradient, not a view, not returned twice) is ours;
                    # so is a block of an owned incoming gradient that a splitting op handed out
                    if not isinstance(ig, RowSparse) and returned.count(id(ig)) == 1 and (
                            (ig is not g and ig.base is None) or (fn.splits and mine)):
                        owned.add(id(ig))
                    continue
                # a tensor used twice: add into an array we own, in place; else into a new one
                if isinstance(prev, RowSparse):
                    prev = prev.dense()
                    _add_into(prev, ig)
                elif id(prev) in owned:
                    _add_into(prev, ig)
                elif isinstance(ig, RowSparse):
                    prev = prev.copy()
                    _add_into(prev, ig)
                else:  # one pass: the sum written to a new array (not a copy, then an add)
                    prev = backend.add_bf16(prev, ig) if prev.dtype == backend.BF16 else prev + ig
                grads[id(inp)] = prev
                owned.add(id(prev))
            fn.inputs = fn.saved = None  # release the graph and its saved activations


def _accumulate_leaf(t, g, handed_out, mine):
    """Add g into t.grad. A stored array must be owned by this leaf alone: an optimizer may
    later scale it in place, which must not touch another leaf's gradient (Add hands the same
    array to both inputs; Reshape hands out views). `mine`: no other gradient overlaps g (a block
    of Concat's dW): it is kept as it is, a view or not."""
    if t.grad is not None:
        _add_into(t.grad, g)
        return
    if isinstance(g, RowSparse):
        g = g.dense()
    elif (g.base is not None and not mine) or id(g) in handed_out:
        g = g.copy()
    handed_out.add(id(g))
    t.grad = g


def _add_into(dense, g):
    if isinstance(g, RowSparse):
        g.add_into(dense)
    elif dense.dtype == backend.BF16:
        backend.add_bf16(dense, g, out=dense)
    else:
        dense += g


class RowSparse:
    """A gradient that is zero except in a few rows: `values[i]` is row `rows[i]` (rows
    distinct). The embedding's backward returns one: a batch touches a few hundred of the
    151 936 rows, and with a tied head those rows are added straight into the head's dense
    gradient instead of materializing (and zeroing) a second vocabulary-sized array."""

    __slots__ = ("rows", "values", "shape")

    def __init__(self, rows, values, shape):
        self.rows, self.values, self.shape = rows, values, tuple(shape)

    def add_into(self, dense):
        dense[self.rows] += self.values  # rows are distinct: a plain indexed add is exact

    def dense(self):
        out = backend.xp.zeros(self.shape, dtype=self.values.dtype)
        out[self.rows] = self.values
        return out


def _topological_order(root):
    """Tensors that need a gradient, each after all tensors it was computed from (iterative
    depth-first post-order: deep graphs do not hit Python's recursion limit)."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        t, children_done = stack.pop()
        if children_done:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        if t.ctx is not None and t.ctx.inputs is not None:
            for inp in t.ctx.inputs:
                if isinstance(inp, Tensor) and inp.requires_grad and id(inp) not in seen:
                    stack.append((inp, False))
    return order


class Function:
    """One differentiable op. Subclasses implement, side by side:

    forward(self, *arrays, **options) -> array       (may call self.save(...))
    backward(self, grad) -> tuple of arrays or None, one per positional input of forward

    `self.needs_grad[i]` is known before forward runs, so forward saves only what the needed
    gradients use. backward must not modify `grad` in place (it can be shared with other
    tensors) and returns None for inputs that are not differentiable (token ids) or not
    needed (`self.needs_grad[i]` is False).
    """

    inputs = None  # the positional arguments of apply(); None once released
    saved = ()
    needs_grad = ()
    splits = False  # True: backward returns disjoint views of its incoming gradient (blocks of it)

    def save(self, *arrays):
        self.saved = arrays

    @classmethod
    def apply(cls, *args, **options):
        fn = cls()
        fn.needs_grad = tuple(_grad_enabled and isinstance(a, Tensor) and a.requires_grad for a in args)
        out = fn.forward(*(a.data if isinstance(a, Tensor) else a for a in args), **options)
        if any(fn.needs_grad):
            fn.inputs = args
            return Tensor(out, requires_grad=True, ctx=fn)
        return Tensor(out)  # no graph: fn and what it saved are dropped here

    def forward(self, *args, **options):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError
