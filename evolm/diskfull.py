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
    found = _full_disk(exc)
    return found and found[1]


def _full_disk(exc: BaseException) -> tuple[BaseException, str] | None:
    """The exception of ``exc``'s chain that is a full disk, and what the disk said."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc, NO_SPACE[exc.errno]
        match = _RUST_IO.search(str(exc)) if not isinstance(exc, OSError) else None
        if match and int(match.group(1)) in NO_SPACE:
            return exc, NO_SPACE[int(match.group(1))]
        exc = exc.__cause__ or exc.__context__
    return None


def raise_naming(path: str | Path, exc: BaseException) -> None:
    """A full disk met by a writer that does not say which file (safetensors' own) raised again as an
    ``OSError`` naming ``path``; any other exception is left to its handler."""
    said = no_space(exc)
    if said is not None and not getattr(exc, "filename", None):
        code = next(code for code, text in NO_SPACE.items() if text == said)
        raise OSError(code, said, str(path)) from exc


@contextlib.contextmanager
def stop_when_disk_full(run_dir: str | Path):
    """A full disk inside the block becomes a ``DiskFullError`` naming the file and the way on."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        found = _full_disk(exc)
        if found is None:
            raise
        where, said = getattr(found[0], "filename", None), found[1]
        raise DiskFullError(f"{said}{f' writing {where}' if where else f' in {run_dir}'} (the files written "
                            f"before are whole); free space and run evolm resume {run_dir}") from None
