"""Elementwise, reduction and reshape ops: the glue between the fused ops.

Broadcasting rule used by Add and Mul: if the forward broadcast an input of shape s to the
output shape, each input element fed several outputs, so its gradient is the SUM of the
output gradients over the broadcast axes (`unbroadcast`).
"""

from minitrain import backend
from minitrain.autograd import Function, Tensor


def unbroadcast(g, shape):
    """Sum g over the axes along which an array of `shape` was broadcast to g.shape."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _shape(a):
    return getattr(a, "shape", ())


class Add(Function):
    """y = a + b (with broadcasting).   dy/da = dy/db = 1, so  da = dy,  db = dy  (unbroadcast).
    bf16 operands (their uint16 bits) are widened, added in fp32 and rounded once."""

    def forward(self, a, b):
        self.save(_shape(a), _shape(b))
        half = [getattr(x, "dtype", None) == backend.BF16 for x in (a, b)]
        if any(half):
            if not all(half):
                raise TypeError("add: a bf16 operand needs a bf16 partner (cast the other first)")
            return backend.add_bf16(a, b)
        return a + b

    def backward(self, g):
        sa, sb = self.saved
        return unbroadcast(g, sa), unbroadcast(g, sb)


class Mul(Function):
    """y = a * b (with broadcasting; b may be a plain number).   da = dy * b,  db = dy * a."""

    def forward(self, a, b):
        # (shape of a, shape of b, what da needs, what db needs)
        self.save(_shape(a), _shape(b), b if self.needs_grad[0] else None, a if self.needs_grad[1] else None)
        return a * b

    def backward(self, g):
        sa, sb, b, a = self.saved
        da = unbroadcast(g * b, sa) if self.needs_grad[0] else None
        db = unbroadcast(g * a, sb) if self.needs_grad[1] else None
        return da, db


class Sum(Function):
    """y = sum of x over `axis`.   Every summed element has dy/dx = 1:  dx = dy broadcast back."""

    def forward(self, x, axis=None, keepdims=False):
        self.save(x.shape, axis, keepdims)
        return x.sum(axis=axis, keepdims=keepdims)

    def backward(self, g):
        shape, axis, keepdims = self.saved
        return (_expand(g, shape, axis, keepdims),)


class Mean(Function):
    """y = mean of x over `axis` (n elements each).   dx = dy / n broadcast back."""

    def forward(self, x, axis=None, keepdims=False):
        self.save(x.shape, axis, keepdims)
        return x.mean(axis=axis, keepdims=keepdims)

    def backward(self, g):
        shape, axis, keepdims = self.saved
        n = 1
        for ax in range(len(shape)) if axis is None else _axes(axis, len(shape)):
            n *= shape[ax]
        return (_expand(g / n, shape, axis, keepdims),)


def _axes(axis, ndim):
    return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _expand(g, shape, axis, keepdims):
    """Broadcast a reduced gradient back to the input's shape (a read-only view)."""
    if not keepdims and axis is not None:
        for ax in sorted(_axes(axis, len(shape))):
            g = backend.xp.expand_dims(g, ax)
    return backend.xp.broadcast_to(g, shape)


class Reshape(Function):
    """y = x viewed with a new shape (same elements, same order).   dx = dy reshaped back."""

    def forward(self, x, shape):
        self.save(x.shape)
        return x.reshape(shape)

    def backward(self, g):
        (shape,) = self.saved
        return (g.reshape(shape),)


class Transpose(Function):
    """y = x with its axes permuted: y[idx] = x[idx permuted back].
    dx = dy permuted by the inverse permutation."""

    def forward(self, x, axes):
        axes = tuple(axes) if axes else tuple(reversed(range(x.ndim)))
        self.save(axes)
        return x.transpose(axes)

    def backward(self, g):
        (axes,) = self.saved
        inverse = [0] * len(axes)
        for i, a in enumerate(axes):
            inverse[a] = i
        return (g.transpose(inverse),)


def add(a, b):
    return Add.apply(a, b)


def mul(a, b):
    return Mul.apply(a, b)


def sum(x, axis=None, keepdims=False):  # noqa: A001  (mirrors numpy's name)
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def reshape(x, shape):
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, axes=()):
    return Transpose.apply(x, axes=tuple(axes))


def _reshape_method(x, *shape):
    return reshape(x, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)


# Tensor's operator sugar, for the few ops the models write inline: x + y, x * y, x.reshape(B, T, H).
Tensor.__add__ = Tensor.__radd__ = add
Tensor.__mul__ = Tensor.__rmul__ = mul
Tensor.reshape = _reshape_method
Tensor.transpose = lambda x, *axes: transpose(x, axes)
Tensor.sum = sum
Tensor.mean = mean
