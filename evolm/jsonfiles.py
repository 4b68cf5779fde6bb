"""JSON files of a run: atomic writes and append-only JSON-lines logs.

Every file is written to a temporary name, fsynced, then renamed, so a crash leaves either the
old or the new file, never half of one. JSON only: a results directory is safe to open.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def jsonable(obj: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN/inf); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The records (JSON objects) of a JSON-lines log. A line that is not one is skipped: a torn last
    line (a crash mid-write), or a damaged one (bad bytes, not UTF-8, nested too deep to parse)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:  # a folder in its place, no permission: unreadable, like a missing log
        log.warning("%s: unreadable (%s); ignored", path, exc.strerror or type(exc).__name__)
        return []
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
