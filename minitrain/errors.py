"""Errors users read: each message is one line naming the file, field or value at fault."""

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad usage or bad input, found before any training step: exit 2."""


class TrainingAborted(Exception):
    """Training stopped on a non-finite loss or gradient, or a diverging validation loss: exit 3."""


class WriteFailed(Exception):
    """An output (checkpoint, final.apr, metrics, an export) could not be written; what was half
    written is gone, earlier outputs are untouched: exit 3."""


def write_failed(path, error, needed=None):
    """WriteFailed for an OSError writing `path`: the path and the cause, and for a full disk how
    much the output needed (`needed` bytes, where known) and how much is free there."""
    cause = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        place = next((p for p in Path(path).absolute().parents if p.exists()), Path("/"))
        free = shutil.disk_usage(place).free
        cause += f" ({f'{needed / 1e6:,.1f} MB needed, ' if needed else ''}{free / 1e6:,.1f} MB free on {place})"
    return WriteFailed(f"cannot write {path}: {cause}")


@contextmanager
def writing(path, needed=None):
    """Turn an OSError raised while writing `path` into write_failed's WriteFailed (the writer
    inside removes what it half wrote)."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e, needed) from None
