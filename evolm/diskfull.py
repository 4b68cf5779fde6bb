"""A full disk (or a spent quota) while a run writes: one line that says so, and a run to resume.

The writers leave every file whole (``jsonfiles.write_atomic``: temporary file, fsync, rename; a log
line that cannot be written whole is taken back), so the checkpoints already there stay good and
``evolm resume`` goes on from the newest one once there is space again.
"""
from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path

from evolm.errors import DiskFullError

NO_SPACE = {errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "no space left on device (disk quota exceeded)"}
_RUST_IO = re.compile(r"\(os error (\d+)\)")
"""safetensors' own writer (``save_pretrained``) reports an I/O error with its errno in the text only."""


def no_space(exc: BaseException) -> str | None:
    """What the disk said, when ``exc`` (or an exception it was raised from) is a full disk; else None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return NO_SPACE[exc.errno]
        match = _RUST_IO.search(str(exc)) if not isinstance(exc, OSError) else None
        if match and int(match.group(1)) in NO_SPACE:
            return NO_SPACE[int(match.group(1))]
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


@contextlib.contextmanager
def stop_when_disk_full(run_dir: str | Path):
    """A full disk inside the block becomes a ``DiskFullError`` naming the file and the way on."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        said = no_space(exc)
        if said is None:
            raise
        where = getattr(exc, "filename", None)
        raise DiskFullError(f"{said}{f' writing {where}' if where else f' in {run_dir}'} (the files written "
                            f"before are whole); free space and run evolm resume {run_dir}") from None
