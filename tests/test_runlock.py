"""One live run per run directory: a second run or resume is refused while a run holds it, readers
keep reading, and a SIGKILLed run leaves nothing that blocks its resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import evolm
from evolm.cli import main
from evolm.errors import DataError, RunDirError
from evolm.runlock import LOCK_FILE, in_use, run_lock
from tests.conftest import ROOT, tiny_experiment, write_experiment

HOLD = "import sys, time\nfrom evolm.runlock import run_lock\nwith run_lock(sys.argv[1]):\n" \
       "    print('locked', flush=True)\n    time.sleep(600)\n"


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")


def _start_holder(run_dir):
    """Another process holding the run directory's lock, as a live run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_live_run_refuses_a_second_run_and_resume_and_a_killed_one_resumes(corpora, tmp_path, capsys):
    raw = tiny_experiment(corpora, tmp_path / "results")
    exp = write_experiment(tmp_path / "exp.yaml", raw)
    run_dir = tmp_path / "results" / "live"
    live = subprocess.Popen([sys.executable, "-m", "evolm.cli", "run", str(exp), "--name", "live", "--no-ray"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    try:
        # run.json (pid, host: what status calls running) is written right after experiment.json
        assert _wait_for(lambda: (run_dir / "run.json").exists() and in_use(run_dir), live)
        live.send_signal(signal.SIGSTOP)  # alive and holding the lock while we check, however slow the checks
        assert in_use(run_dir) == f"pid {live.pid} on {os.uname().nodename}"
        capsys.readouterr()
        assert main(["resume", str(run_dir), "--no-ray"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run_dir} is in use by a running evolm (pid {live.pid}") and err.count("\n") == 1
        assert main(["run", str(exp), "--name", "live", "--no-ray"]) == 2
        assert "is in use by a running evolm" in capsys.readouterr().err
        with pytest.raises(RunDirError, match="in use by a running evolm"):
            evolm.resume(run_dir, executor="local")
        assert main(["status", str(run_dir)]) == 0  # readers never take the lock
        assert "(running)" in capsys.readouterr().out
    finally:
        _kill(live)
    assert (run_dir / LOCK_FILE).exists() and in_use(run_dir) is None  # the kernel released it at the kill
    assert main(["resume", str(run_dir), "--no-ray"]) == 0
    assert len(json.loads((run_dir / "summary.json").read_text())["stages"]) == 2
    assert not (run_dir / LOCK_FILE).exists()  # a run that ends removes its lock file


def test_the_cli_refusal_is_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "experiment.json").write_text("{}")
    holder = _start_holder(run_dir)
    try:
        done = subprocess.run([sys.executable, "-m", "evolm.cli", "resume", str(run_dir)], capture_output=True,
                              text=True, env=_env(), cwd=ROOT, timeout=300)
    finally:
        _kill(holder)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: {run_dir} is in use by a running evolm (pid {holder.pid} on "
                                        f"{os.uname().nodename}); wait for it to end, or stop it and then "
                                        f"`evolm resume {run_dir}` (evolm status {run_dir} reads it safely meanwhile)"]


def test_a_killed_holder_blocks_nothing_and_nesting_holds_once(tmp_path):
    run_dir = tmp_path / "run"
    holder = _start_holder(run_dir)
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        with run_lock(run_dir):
            pass
    _kill(holder)
    with run_lock(run_dir):
        with run_lock(run_dir):  # the CLI holds it, then evolm.run inside it
            assert in_use(run_dir) is None  # this process: not someone else's live run
            other = subprocess.run([sys.executable, "-c", HOLD, str(run_dir)], capture_output=True, text=True,
                                   env=_env(), cwd=ROOT, timeout=120)
            assert other.returncode != 0 and "in use by a running evolm" in other.stderr
        assert (run_dir / LOCK_FILE).exists()
    assert not (run_dir / LOCK_FILE).exists()


def test_a_run_stopped_by_a_user_error_leaves_no_folder_and_a_leftover_lock_file_blocks_nothing(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["stages"][0]["train"] = str(tmp_path / "short.txt")
    (tmp_path / "short.txt").write_text("too short to fill one block\n")  # valid config; load_base refuses it
    with pytest.raises(DataError):
        evolm.run(raw, executor="local")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    config = evolm.api.as_config(tiny_experiment(corpora, tmp_path / "results"))
    (tmp_path / "results" / "left").mkdir(parents=True)
    (tmp_path / "results" / "left" / LOCK_FILE).write_text('{"pid": 1, "host": "gone"}')  # its process was killed
    assert evolm.api.new_run_dir(config, "left") == tmp_path / "results" / "left"
