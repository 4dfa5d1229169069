"""A stand-in for CuPy on the CPU that counts device-to-host transfers.

`module()` is an array module like CuPy: its arrays (DeviceArray, a NumPy subclass) play device
arrays, and every way CuPy moves data to the host -- get(), float(), int(), bool(), item(),
tolist() -- is counted in `TRANSFERS` (with where it happened, for the failure message). As in
CuPy, reductions give 0-d device arrays, not host scalars, so a loss summed on the "device" stays
there until something reads it. Paired with the kernels' CPU emulation as backend.launch, a
training step takes the GPU path (backend.xp is not NumPy, the kernels run) and the test counts
what it would wait for.
"""

import traceback
import types

import numpy

TRANSFERS = []  # one entry per device-to-host transfer: the innermost minitrain frame that made it


def _count():
    frames = [f for f in traceback.extract_stack()[:-2] if "/minitrain/" in f.filename]
    TRANSFERS.append(f"{frames[-1].filename.split('/minitrain/')[-1]}:{frames[-1].lineno}" if frames else "?")


def _device(x):
    """NumPy results -> device arrays (0-d arrays for scalars, as CuPy returns them)."""
    if isinstance(x, numpy.ndarray):
        return x.view(DeviceArray)
    if isinstance(x, (numpy.generic, float, int, bool)) and not isinstance(x, (str, bytes)):
        return numpy.asarray(x).view(DeviceArray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


class DeviceArray(numpy.ndarray):
    def __array_wrap__(self, array, context=None, return_scalar=False):
        return array.view(DeviceArray)  # reductions stay 0-d device arrays

    def __getitem__(self, key):
        return _device(super().__getitem__(key))

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


def _wrap(fn):
    def call(*args, **kwargs):
        return _device(fn(*args, **kwargs))
    return call


def module():
    """An array module with NumPy's functions returning DeviceArrays; asarray of a host array is
    an upload."""
    xp = types.ModuleType("cupy_standin")
    for name in dir(numpy):
        value = getattr(numpy, name)
        if isinstance(value, numpy.ufunc):
            setattr(xp, name, value)  # ufuncs keep the subclass through __array_wrap__
        elif callable(value) and not isinstance(value, type):
            setattr(xp, name, _wrap(value))
        else:
            setattr(xp, name, value)
    xp.ndarray = DeviceArray
    return xp
