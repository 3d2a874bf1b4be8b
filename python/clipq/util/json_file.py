"""The JSON files clipq writes and reads back (dataset.json, experiment.json, report.json), read as a user may
have edited them: bounded in size and nesting, an object, each field clipq uses of the type it needs."""

from __future__ import annotations

import json
from pathlib import Path

from clipq.util.errors import ClipqError

MAX_BYTES = 64 << 20

_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
          bool: "true or false", type(None): "null"}


def read_object(path: Path, fields: dict[str, type | tuple[type, ...]], missing: str) -> dict:
    """The JSON object in `path`, whose `fields` (name -> allowed types) are present with those types; a
    one-line error naming the file and field otherwise (`missing`: the message if there is no such file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ClipqError(missing) from None
    except OSError as e:
        raise ClipqError(f"{path}: unreadable ({e.strerror or e})") from None
    if len(raw) > MAX_BYTES:
        raise ClipqError(f"{path}: larger than {MAX_BYTES >> 20} MB; not a file clipq wrote")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ClipqError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else 'nested too deeply'})") \
            from None
    if not isinstance(data, dict):
        raise ClipqError(f"{path}: holds {_NAMES.get(type(data), type(data).__name__)}, not a JSON object")
    for name, types in fields.items():
        allowed = types if isinstance(types, tuple) else (types,)
        if name not in data:
            raise ClipqError(f"{path}: field '{name}' is missing")
        value = data[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ClipqError(f"{path}: field '{name}' is {_NAMES.get(type(value), type(value).__name__)}, expected "
                             f"{' or '.join(_NAMES[t] for t in allowed)}")
    return data
