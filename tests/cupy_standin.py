"""A stand-in for CuPy on the CPU that counts device-to-host transfers and device launches.

`module()` is an array module like CuPy: its arrays (DeviceArray, a NumPy subclass) play device
arrays, and every way CuPy moves data to the host -- get(), float(), int(), bool(), item(),
tolist() -- is counted in `TRANSFERS` (with where it happened, for the failure message). As in
CuPy, reductions give 0-d device arrays, not host scalars, so a loss summed on the "device" stays
there until something reads it. Paired with the kernels' CPU emulation as backend.launch, a
training step takes the GPU path (backend.xp is not NumPy, the kernels run) and the test counts
what it would wait for.

It also counts what CuPy would launch on the device (`LAUNCHES`: kind, name, bytes, where): each
ufunc call on a device array (an elementwise kernel or a reduction), each copy, fill, gather and
scatter, each upload; `counting(launch)` adds the kernels' own launches and `gemm_ex` the cuBLAS
calls of minitrain.gpu.gemm. Bytes are every array operand's size once (what the launch must read
or write at least). With `COUNT_ONLY` set, nothing is computed by a kernel or a GEMM (their outputs
keep what they were allocated with, zeros here): tools/count_launches.py counts a full-size step
that way.
"""

import traceback
import types

import numpy

TRANSFERS = []  # one entry per device-to-host transfer: the innermost minitrain frame that made it
LAUNCHES = []  # one (kind, name, bytes, where) per device launch
COUNT_ONLY = False  # True: kernels and GEMMs are counted, not run


def _where():
    """The innermost minitrain frame of the caller, launch code (gpu/, backend.py) skipped: the op
    that asked, 'ops/linear.py:41'."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/minitrain/" in f.filename
              and "/minitrain/gpu/" not in f.filename and not f.filename.endswith("/minitrain/backend.py")]
    return f"{frames[-1].filename.split('/minitrain/')[-1]}:{frames[-1].lineno}" if frames else "?"


def _count():
    TRANSFERS.append(_where())


def _launch(kind, name, *arrays):
    LAUNCHES.append((kind, name, sum(a.nbytes for a in arrays if isinstance(a, numpy.ndarray)), _where()))


def _host(x):
    return x.view(numpy.ndarray) if isinstance(x, DeviceArray) else x


def _device(x):
    """NumPy results -> device arrays (0-d arrays for scalars, as CuPy returns them). A new array
    becomes a device array that owns its memory (`.base is None`, as a CuPy result's is: the
    autograd decides what it may add into by that); a view stays a view."""
    if isinstance(x, (numpy.generic, float, int, bool)) and not isinstance(x, (str, bytes)):
        x = numpy.asarray(x)
    if isinstance(x, DeviceArray):
        return x
    if isinstance(x, numpy.ndarray):
        if x.base is not None:
            return x.view(DeviceArray)
        owned = DeviceArray(x.shape, x.dtype)
        numpy.copyto(owned.view(numpy.ndarray), x)
        return owned
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


class DeviceArray(numpy.ndarray):
    def __array_wrap__(self, array, context=None, return_scalar=False):
        return array.view(DeviceArray)  # reductions stay 0-d device arrays

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """One launch per ufunc call (elementwise, reduction, matmul); results are device arrays."""
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        gemm = ufunc is numpy.matmul
        if gemm and COUNT_ONLY and out is None:
            result = numpy.zeros(numpy.broadcast_shapes(inputs[0].shape[:-2], inputs[1].shape[:-2])
                                 + (inputs[0].shape[-2], inputs[1].shape[-1]), numpy.result_type(*inputs))
        else:
            result = getattr(ufunc, method)(*(_host(x) for x in inputs), **kwargs)
        _launch("gemm" if gemm else "cupy", f"{ufunc.__name__}" + ("" if method == "__call__" else f".{method}"),
                *inputs, *(out or ()), *(r for r in (result if isinstance(result, tuple) else (result,))
                                         if out is None))
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __getitem__(self, key):
        item = super().__getitem__(key)
        if isinstance(item, numpy.ndarray) and not numpy.may_share_memory(item, self):
            _launch("cupy", "gather", item)  # advanced indexing: a new array
        return _device(item)

    def __setitem__(self, key, value):
        _launch("cupy", "scatter" if _advanced(key) else "copy", numpy.asarray(value))
        super().__setitem__(key, _host(value))

    def astype(self, dtype, *args, copy=True, **kwargs):
        result = super().astype(dtype, *args, copy=copy, **kwargs)
        if result is not self:
            _launch("cupy", "copy", self, result)
        return result

    def copy(self, *args, **kwargs):
        _launch("cupy", "copy", self, self)
        return super().copy(*args, **kwargs)

    def get(self):
        _count()
        return numpy.array(self.view(numpy.ndarray))

    def __float__(self):
        _count()
        return float(self.view(numpy.ndarray))

    def __int__(self):
        _count()
        return int(self.view(numpy.ndarray))

    def __bool__(self):
        _count()
        return bool(self.view(numpy.ndarray))

    def item(self, *args):
        _count()
        return self.view(numpy.ndarray).item(*args)

    def tolist(self):
        _count()
        return self.view(numpy.ndarray).tolist()

    def __index__(self):
        _count()
        return self.view(numpy.ndarray).__index__()


def _advanced(key):
    """Whether an index is advanced (integer or boolean arrays): a gather or scatter kernel."""
    return any(isinstance(k, (numpy.ndarray, list)) for k in (key if isinstance(key, tuple) else (key,)))


FILLS = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like"}
COPIES = {"ascontiguousarray", "asarray", "array", "concatenate", "stack", "broadcast_to", "take", "where"}


def _wrap(fn, name):
    def call(*args, **kwargs):
        if COUNT_ONLY and name in ("empty", "empty_like"):  # never garbage where nothing computes
            return _device(getattr(numpy, name.replace("empty", "zeros"))(*args, **kwargs))
        result = fn(*args, **kwargs)
        if name in FILLS:
            _launch("cupy", "fill", result)
        elif name in COPIES and isinstance(result, numpy.ndarray):
            sources = [a for a in args if isinstance(a, numpy.ndarray)]
            if not any(numpy.may_share_memory(result, a) for a in sources):
                device = sources and all(isinstance(a, DeviceArray) for a in sources)
                _launch("cupy" if device else "upload", name if device else "upload", result)
        return _device(result)
    return call


# The multi-tensor kernels reach their arrays through a table of addresses: their bytes from its rows
TABLE_BYTES = {"adamw_multi": lambda row: int(row[5]) * (16 + (2 if row[4] else 0)),  # p, g, m, v (and the copy) once
               "sum_squares_multi": lambda row: int(row[1]) * 4}


def counting(launch):
    """The kernels' `launch(source, kernel, grid, block, args)`, counting each launch (and, with
    COUNT_ONLY, not running it)."""
    def run(source, kernel, grid, block, args):
        _launch("kernel", f"{source}.{kernel}", *args)
        if kernel in TABLE_BYTES:
            kind, name, nbytes, where = LAUNCHES[-1]
            LAUNCHES[-1] = (kind, name, nbytes + sum(map(TABLE_BYTES[kernel], _host(args[0]))), where)
        if not COUNT_ONLY:
            launch(source, kernel, grid, block, [_host(a) for a in args])
    return run


def gemm_ex(a, b, c, beta):
    """minitrain.gpu.gemm's cuBLAS call (c = a b + beta c) on the stand-in: one launch, the product
    as gemm.matmul's NumPy branch computes it (bf16 widened exactly, fp32 sums, one rounding)."""
    _launch("gemm", f"gemm {a.shape[0]}x{a.shape[1]}x{b.shape[1]}", a, b, c, *((c,) if beta else ()))
    if COUNT_ONLY:
        return c
    widen = lambda x: (_host(x).astype(numpy.uint32) << 16).view(numpy.float32)  # noqa: E731
    product = widen(a) @ widen(b)
    if beta:  # only ever into float32 (gemm.matmul_add)
        product += _host(c)
    if c.dtype == numpy.uint16:
        u = product.view(numpy.uint32)
        product = ((u + numpy.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(numpy.uint16)
    numpy.copyto(_host(c), product)
    return c


def module():
    """An array module with NumPy's functions returning DeviceArrays; asarray of a host array is
    an upload."""
    xp = types.ModuleType("cupy_standin")
    for name in dir(numpy):
        value = getattr(numpy, name)
        if isinstance(value, numpy.ufunc):
            setattr(xp, name, value)  # ufuncs keep the subclass through __array_wrap__
        elif callable(value) and not isinstance(value, type):
            setattr(xp, name, _wrap(value, name))
        else:
            setattr(xp, name, value)
    xp.ndarray = DeviceArray
    return xp
