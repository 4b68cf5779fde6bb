"""``evolm`` run as users run it, in a subprocess of this worktree's code, and SIGKILLed at a chosen point."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from evolm.jsonfiles import read_jsonl
from tests.conftest import ROOT


def evolm_cmd(*args):
    return [sys.executable, "-m", "evolm.cli", *map(str, args)]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")


def run_to_end(*args, timeout=600):
    done = subprocess.run(evolm_cmd(*args), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(evolm_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=ROOT)


def kill_when(args, condition, timeout=300):
    """Start ``evolm`` and SIGKILL it as soon as ``condition()`` holds; True if it was killed. What the
    killed driver had started (its local Ray) and left behind is ended too, so nothing piles up."""
    proc = subprocess.Popen(evolm_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            started = descendants(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            end_leftovers(started)
            return True
        time.sleep(0.01)
    proc.wait()
    return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def end_leftovers(processes: list[psutil.Process], grace: float = 2.0) -> None:
    """SIGKILL those of ``processes`` (this test's own, by pid) still alive after ``grace`` seconds."""
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def lines(path, **match):
    return [r for r in read_jsonl(path) if all(r.get(k) == v for k, v in match.items())]
