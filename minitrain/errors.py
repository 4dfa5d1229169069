"""Errors users read: each message is one line naming the file, field or value at fault."""


class InputError(Exception):
    """Bad usage or bad input, found before any training step: exit 2."""


class TrainingAborted(Exception):
    """Training stopped on a non-finite loss or gradient, or a diverging validation loss: exit 3."""
