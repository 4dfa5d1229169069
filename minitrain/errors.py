"""Errors users read. An InputError is bad usage or bad input: the CLI prints its one-line
message and exits 2, before any training step."""


class InputError(Exception):
    pass
