"""JSON files that hold one object (config.json, an index, adapter_config.json, state.json, ...),
read with one error for every way they can be wrong: missing, not UTF-8, not JSON, not an object."""

import json
from pathlib import Path

from minitrain.errors import InputError


def load_json(path):
    """The object a JSON file holds; InputError naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object of fields, found {type(value).__name__}")
    return value
