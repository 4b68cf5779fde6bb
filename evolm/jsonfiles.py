"""JSON files of a run: atomic writes and append-only JSON-lines logs.

Every file is written to a temporary name, fsynced, then renamed, so a crash leaves either the
old or the new file, never half of one; a write that fails (a full disk) removes its temporary file,
and a log line that could not be written whole is taken back. Safetensors files are written here
too, as bytes. JSON only: a results directory is safe to open.
"""
from __future__ import annotations

import contextlib
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


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` holds ``data`` (text as UTF-8), or, if writing fails, what it held before."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data.encode("utf-8") if isinstance(data, str) else data)
            os.fsync(fd)  # a full disk may only say so here
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # half a file must neither replace the good one nor hold the space that is short
        if isinstance(exc, OSError):
            exc.filename = str(path)  # the file the run was writing, not its temporary name
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """One line appended and fsynced; if it cannot be written whole, the log is cut back to its last
    whole line, so a resumed run finds no torn record."""
    data = (json.dumps(jsonable(record), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            exc.filename = str(path)
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
