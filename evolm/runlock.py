"""One live run per run directory: an advisory lock on ``<run dir>/run.lock``, held for the run's life.

A second ``evolm run`` / ``evolm resume`` into a directory that a live run is writing is refused;
readers (status, plot, report, generate) never take the lock. The kernel releases a ``flock`` when
the process holding it ends, however it ends (SIGKILL included), so a killed run can be resumed at
once: a leftover run.lock blocks nothing.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from evolm.errors import RunDirError

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
_PATIENCE = 0.5
"""Seconds to keep trying before refusing: a reader's ``in_use`` probe holds the lock for a moment."""
_held: dict[Path, int] = {}
"""Run directories this process holds (resolved path -> how many nested holders)."""


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold the run directory's lock (creating the folder) or raise RunDirError naming its holder.
    Nested use in one process (the CLI, then ``evolm.run`` inside it) holds it once."""
    key = Path(run_dir).resolve()
    if key not in _held:
        created = not Path(run_dir).exists()
        fd = _acquire(Path(run_dir))
    _held[key] = _held.get(key, 0) + 1
    try:
        yield
    finally:
        _held[key] -= 1
        if not _held[key]:
            del _held[key]
            _release(Path(run_dir), fd, created)


def in_use(run_dir: str | Path) -> str | None:
    """Who holds the run directory's lock (``pid 123 on host``), or None when no live process, or this
    one, does."""
    if Path(run_dir).resolve() in _held:
        return None
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    except OSError:  # no locks on this filesystem: nobody can be seen holding one
        return None
    finally:
        os.close(fd)  # closing also releases a shared lock it got
    return None


def refuse_if_in_use(run_dir: str | Path) -> None:
    holder = in_use(run_dir)
    if holder is not None:
        raise _in_use_error(Path(run_dir), holder)


def _acquire(run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + _PATIENCE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise _in_use_error(run_dir, _holder(path)) from None
        except OSError as exc:  # a filesystem without locks (some network mounts): run unguarded, and say so
            log.warning("%s: cannot lock (%s); nothing stops a second run in this directory", path, exc.strerror)
            return fd
        if _is_current(fd, path):
            break
        os.close(fd)  # the holder we waited for removed that file when it ended: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


def _release(run_dir: Path, fd: int, created: bool) -> None:
    # Removed while still locked; a process that opened the old file sees it is gone (``_is_current``).
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    os.close(fd)
    if created:  # a run that stopped before writing anything (a data error) leaves no empty folder
        try:
            run_dir.rmdir()
        except OSError:
            pass


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _in_use_error(run_dir: Path, holder: str) -> RunDirError:
    return RunDirError(f"{run_dir} is in use by a running evolm ({holder}); wait for it to end, or stop it "
                       f"and then `evolm resume {run_dir}` (evolm status {run_dir} reads it safely meanwhile)")
