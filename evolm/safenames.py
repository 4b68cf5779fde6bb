"""Names that become paths: a run's folder name (``--name``) and the genome ids a run directory's files
hold (ledger records, checkpoints). Each must be one plain name, so that nothing written or read
through it leaves its folder, even when a run directory's files were edited by hand or tampered with.
"""
from __future__ import annotations

import re

from evolm.errors import RunDirError

_GENOME_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
"""evolm's ids are 8 hex digits (``genome.make_id``); anything of this shape is still one file name."""
_SEPARATORS = ("/", "\\", "\0")


def is_genome_id(value) -> bool:
    return isinstance(value, str) and _GENOME_ID.fullmatch(value) is not None


def genome_id(value, source) -> str:
    """``value`` if it is a genome id that is one plain file name, else RunDirError naming ``source``."""
    if not is_genome_id(value):
        raise RunDirError(f"{source}: genome id {_shown(value)} is not a plain name (letters, digits, _ and -); "
                          f"the file was edited or damaged, and evolm will not use it as a path")
    return value


def folder_name(value: str, what: str = "--name") -> str:
    """One folder name inside the output folder: not empty, no path separator, not ``.`` or ``..``."""
    if not value or value in (".", "..") or any(s in value for s in _SEPARATORS) or value != value.strip():
        raise RunDirError(f"{what} {_shown(value)} must be a single folder name (no '/', '\\', '..' or surrounding "
                          f"spaces): the run directory is created inside output_dir")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
