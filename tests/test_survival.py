"""Surviving anything on the real path (issue #15): ``evolm run`` / ``evolm resume`` with their own local
Ray, in subprocesses, on tiny real models.

- the driver SIGKILLed at seven points of one run, each resumed, ends bit-identical to an uninterrupted
  Ray run (genomes, objectives, rungs, every model's weights, loss matrix, merge curve);
- a Ray worker SIGKILLed in the middle of an evaluation is restarted and the evaluation retried: the
  run ends as the uninterrupted one (a whole node of a two-node cluster lost: ``tests/test_node_loss.py``);
- a disk that fills up while a checkpoint, an adapter or a log line is written stops the run with one
  line, leaves the files before it whole, and the resumed run ends as the uninterrupted one;
- two runs at once, each with its own local Ray, end as each did alone.
"""
import errno
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from evolm.checkpoint import latest_checkpoint
from evolm.jsonfiles import read_jsonl
from tests.cli_runs import descendants, kill_when, lines, run_to_end, start
from tests.conftest import tiny_experiment, write_experiment


def halving_experiment(corpora, out_dir, **overrides):
    """Two stages, three generations each with two halving rungs, a merge scored at ten strengths."""
    raw = tiny_experiment(corpora, out_dir, **overrides)
    del raw["model"]["pretrain"]  # a fresh start costs no pretraining; stage 2 still keeps stage 1
    raw["search"].update(generations=2, halving={"rungs": 2})
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 15, "high": 30}  # long enough to be hit
    raw["merge"] = {"strengths": [i / 10 for i in range(1, 11)], "candidates": 1}
    return raw


def one_stage_experiment(corpora, out_dir, **overrides):
    """One stage, generation 0 and 1, evaluations long enough to kill a worker in one."""
    raw = tiny_experiment(corpora, out_dir, **overrides)
    del raw["model"]["pretrain"]
    raw["stages"] = raw["stages"][:1]
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 20, "high": 40}
    return raw


def outcome(run_dir: Path) -> dict:
    """All that must not depend on interruptions, exactly."""
    evals = sorted((r["stage"], r["generation"], r["genome_id"], json.dumps(r["values"], sort_keys=True), r["status"],
                    json.dumps(r["objectives"], sort_keys=True), r["steps"], r["rung"], r["halted"], r["cached"])
                   for r in read_jsonl(run_dir / "evaluations.jsonl"))
    rungs = sorted((r["stage"], r["generation"], r["genome_id"], r["rung"], json.dumps(r["objectives"], sort_keys=True))
                   for r in read_jsonl(run_dir / "rungs.jsonl"))
    weights = {f"{m.name}/{k}": v for m in sorted((run_dir / "models").glob("stage-*"))
               for k, v in load_file(str(m / "model.safetensors")).items()}
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [(p["stage"], p["strength"], p["val_loss"], p["retention_loss"])
             for p in read_jsonl(run_dir / "merge_curve.jsonl")]
    return {"evaluations": evals, "rungs": rungs, "weights": weights, "curve": curve,
            "loss_matrix": json.loads((run_dir / "loss_matrix.json").read_text())["matrix"],
            "winners": [(s["winner"]["id"], s["merge_strength"], s["merged"]) for s in summary["stages"]]}


def assert_same(got: dict, expected: dict) -> None:
    for key in ("evaluations", "rungs", "curve", "loss_matrix", "winners"):
        assert got[key] == expected[key], f"{key} differ from the uninterrupted run"
    assert got["weights"].keys() == expected["weights"].keys()
    differ = [k for k in expected["weights"] if not np.array_equal(got["weights"][k], expected["weights"][k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:3]}"


def assert_nothing_done_twice(run_dir: Path) -> None:
    trained = Counter((r["stage"], r["result_of"])
                      for r in read_jsonl(run_dir / "evaluations.jsonl") if not r["cached"])
    assert max(trained.values()) == 1, "a finished evaluation was trained twice"
    rungs = Counter((r["stage"], r["generation"], r["genome_id"], r["rung"])
                    for r in read_jsonl(run_dir / "rungs.jsonl"))
    assert not rungs or max(rungs.values()) == 1, "a finished rung was trained twice"


def newest_tag(run_dir: Path) -> str | None:
    state, warnings = latest_checkpoint(run_dir)
    assert not warnings, warnings
    return state and state["tag"]


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory):
    """The experiments and their uninterrupted Ray runs (the references)."""
    tmp = tmp_path_factory.mktemp("survival")
    exps = {"halving": write_experiment(tmp / "halving.yaml", halving_experiment(corpora, tmp / "results")),
            "one_stage": write_experiment(tmp / "one_stage.yaml", one_stage_experiment(corpora, tmp / "results"))}
    for name, exp in exps.items():
        run_to_end("run", exp, "--name", f"ref-{name}")
    return {name: (exp, outcome(tmp / "results" / f"ref-{name}")) for name, exp in exps.items()}


def here(exp: Path, tmp_path: Path) -> Path:
    """The experiment with its results under this test's folder."""
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_experiment(tmp_path / exp.name, yaml.safe_load(exp.read_text()) | {"output_dir": str(tmp_path)})


# ----- the driver SIGKILLed on the Ray path ---------------------------------------------------------

def evals(d, stage, gen):
    return len(lines(d / "evaluations.jsonl", stage=stage, generation=gen))


def generation_done(d, stage, gen):
    return bool(lines(d / "generations.jsonl", stage=stage, generation=gen))


# (point, kill when, what must hold once killed, newest whole checkpoint then), in run order
RAY_KILL_POINTS = [
    ("before the first checkpoint (Ray starting, generation 0)",
     lambda d: (d / "models" / "stage-0").is_dir(),
     lambda d: not (d / "checkpoints").exists() or not list((d / "checkpoints").glob("*.json")), None),
    ("between generations",
     lambda d: (d / "checkpoints" / "s001-g0000.json").exists(),
     lambda d: not generation_done(d, 1, 1), "s001-g0000"),
    ("during a halving rung",
     lambda d: bool(lines(d / "rungs.jsonl", stage=1, generation=1)) and evals(d, 1, 1) == 0,
     lambda d: evals(d, 1, 1) == 0, "s001-g0000"),
    ("mid-generation",
     lambda d: evals(d, 1, 2) >= 1 and not generation_done(d, 1, 2),
     lambda d: not generation_done(d, 1, 2), "s001-g0001"),
    ("during a merge",
     lambda d: generation_done(d, 1, 2) and not lines(d / "merge_curve.jsonl", stage=1),
     lambda d: not (d / "models" / "stage-1").exists(), ("s001-g0001", "s001-g0002")),
    ("during the merge-strength scoring",
     lambda d: bool(lines(d / "merge_curve.jsonl", stage=1)),
     lambda d: len(lines(d / "merge_curve.jsonl", stage=1)) < 10, "s001-g0002"),
    ("after a stage's end, in the next stage's generation 0",
     lambda d: (d / "checkpoints" / "s001-end.json").exists() and evals(d, 2, 0) >= 1,
     lambda d: not generation_done(d, 2, 0), "s001-end"),
]


def test_driver_killed_at_seven_points_on_ray_resumes_exactly(runs, tmp_path):
    """One run, SIGKILLed at each point in turn (the first time by ``run``, then by each ``resume``), ends
    bit-identical to the uninterrupted Ray run."""
    exp, expected = runs["halving"]
    run_dir = tmp_path / "killed"
    command = ["run", here(exp, tmp_path), "--name", "killed"]
    for point, when, then, tag in RAY_KILL_POINTS:
        assert kill_when(command, lambda: when(run_dir)), f"the run ended before the kill point: {point}"
        assert then(run_dir), f"killed too late for the point: {point}"
        assert newest_tag(run_dir) in (tag if isinstance(tag, tuple) else (tag,)), point
        assert not (run_dir / "summary.json").exists()
        command = ["resume", run_dir]
    done = run_to_end(*command)
    assert "resuming from checkpoint s001-end" in done.stdout
    assert_same(outcome(run_dir), expected)
    assert_nothing_done_twice(run_dir)
    gens = [(g["stage"], g["generation"]) for g in read_jsonl(run_dir / "generations.jsonl")]
    assert gens == sorted(set(gens)) and len(gens) == 6


# ----- a Ray worker SIGKILLed mid-evaluation ------------------------------------------------------------

def ray_workers(driver_pid: int) -> dict[int, str]:
    """pid -> process title of the evaluation workers of this driver's own local Ray."""
    found = {}
    for p in descendants(driver_pid):
        try:
            title = (p.cmdline() or [""])[0]
        except Exception:  # noqa: BLE001 - it ended while being looked at
            continue
        if title.startswith("ray::_RayWorker"):
            found[p.pid] = title
    return found


def test_a_ray_worker_killed_mid_evaluation_is_retried_with_identical_results(runs, tmp_path):
    exp, expected = runs["one_stage"]
    proc = start("run", here(exp, tmp_path), "--name", "worker")
    run_dir, victim, deadline = tmp_path / "worker", None, time.time() + 300
    while victim is None and proc.poll() is None and time.time() < deadline:
        if evals(run_dir, 1, 0) >= 1:  # the workers have their stage: the others are mid-evaluation
            workers = ray_workers(proc.pid)
            victim = next((pid for pid, title in workers.items() if title.startswith("ray::_RayWorker.run")), None)
            if victim is not None:
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=300)
    assert victim is not None, "no worker was seen in an evaluation"
    assert proc.returncode == 0, err[-3000:]
    records = read_jsonl(run_dir / "evaluations.jsonl")
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records if r["error"]]
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in records if not r["cached"]}
    assert pids - set(workers), f"no restarted worker did the evaluation again ({pids}, killed {victim})"
    assert_same(outcome(run_dir), expected)


# ----- a full disk -----------------------------------------------------------------------------------------

class DiskFills:
    """``os`` as ``evolm.jsonfiles`` sees it, on a disk that fills up in the middle of the first write
    ``fills(path, data)`` picks: half the bytes land, then ENOSPC. Every file of a run's state goes through
    ``jsonfiles`` (JSON, logs, checkpoints, adapters and rung states as safetensors bytes)."""

    def __init__(self, run_dir: Path, fills):
        self.run_dir, self.fills, self.paths, self.hit, self.before = run_dir, fills, {}, None, {}

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777):
        fd = os.open(path, flags, mode)
        self.paths[fd] = Path(path)
        return fd

    def write(self, fd, data):
        path = self.paths.get(fd)
        if self.hit is None and path is not None and self.fills(path, bytes(data)):
            self.hit, self.before = path, whole_files(self.run_dir)
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


def whole_files(folder: Path, under: str = "") -> dict[str, bytes]:
    """Every file's bytes, but the temporary one being written."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / under).rglob("*"))
            if p.is_file() and not p.name.endswith(".tmp")}


def stops_on_a_full_disk(monkeypatch, capsys, argv, fills, run_dir: Path) -> DiskFills:
    """``evolm`` (in this process, evaluations too) on a disk that fills: exit 2, one line, the files
    written before whole, the newest checkpoint still ``s001-g0000``."""
    from evolm import cli

    disk = DiskFills(run_dir, fills)
    with monkeypatch.context() as patch:
        patch.setattr("evolm.jsonfiles.os", disk)
        code = cli.main(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    assert disk.hit is not None, "the disk never filled up"
    assert code == 2 and len(err) == 1, err
    target = disk.hit.with_name(disk.hit.name.removeprefix(".").removesuffix(".tmp"))
    assert err[0].startswith(f"error: no space left on device writing {target} "), err[0]
    assert err[0].endswith(f"; free space and run evolm resume {run_dir}"), err[0]
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"
    assert not (run_dir / "run.lock").exists()
    assert whole_files(run_dir, "checkpoints") == {k: v for k, v in disk.before.items() if k.startswith("checkpoints/")}
    assert newest_tag(run_dir) == "s001-g0000"
    after = whole_files(run_dir)
    assert after.get(str(target.relative_to(run_dir))) == disk.before.get(str(target.relative_to(run_dir))), \
        f"{target.name}: what was half-written replaced what was there"
    return disk


def test_a_full_disk_stops_with_one_line_and_the_run_resumes_exactly(runs, tmp_path, monkeypatch, capsys):
    """The disk fills while an adapter, a log line and then a checkpoint are written; each time the run
    stops with one line, and once there is space the resumed run ends as the uninterrupted Ray run."""
    exp, expected = runs["one_stage"]
    run_dir = tmp_path / "full"
    first_checkpoint = run_dir / "checkpoints" / "s001-g0000.json"
    stops_on_a_full_disk(monkeypatch, capsys, ["run", here(exp, tmp_path), "--name", "full", "--no-ray"],
                         lambda p, _: p.parent.name == "stage-1" and first_checkpoint.exists(), run_dir)
    stops_on_a_full_disk(monkeypatch, capsys, ["resume", run_dir, "--no-ray"],
                         lambda p, data: p.name == "evaluations.jsonl" and b'"generation": 1' in data, run_dir)
    stops_on_a_full_disk(monkeypatch, capsys, ["resume", run_dir, "--no-ray"],
                         lambda p, _: p.name == ".s001-g0001.json.tmp", run_dir)

    from evolm import cli

    assert cli.main(["resume", str(run_dir), "--no-ray"]) == 0  # space freed
    assert "resuming from checkpoint s001-g0000" in capsys.readouterr().out
    assert_same(outcome(run_dir), expected)  # in this process and without Ray: the same bits
    assert_nothing_done_twice(run_dir)


def fills_the_disk(ctx):
    """An objective whose scratch file meets a full disk: the machine's problem, not the genome's."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/scratch/objective.cache")


def test_a_full_disk_inside_an_evaluation_stops_the_run_and_fails_no_genome(corpora, tmp_path):
    import evolm
    from evolm.errors import DiskFullError

    raw = one_stage_experiment(corpora, tmp_path)
    raw["search"]["objectives"] = ["val_loss", "fills_the_disk"]
    evolm.OBJECTIVES.register("fills_the_disk", fills_the_disk)
    try:
        with pytest.raises(DiskFullError) as stopped:
            evolm.run(raw, tmp_path / "run", executor="local")
    finally:
        evolm.OBJECTIVES._entries.pop("fills_the_disk")
    assert str(stopped.value) == ("no space left on device writing /scratch/objective.cache (the files written before "
                                  f"are whole); free space and run evolm resume {tmp_path / 'run'}")
    assert not read_jsonl(tmp_path / "run" / "evaluations.jsonl"), "a genome was recorded as failed"


# ----- two runs at once ----------------------------------------------------------------------------------

def test_two_runs_at_once_each_with_its_own_ray_end_as_alone(runs, tmp_path):
    procs = {name: start("run", here(exp, tmp_path / name), "--name", "twin") for name, (exp, _) in runs.items()}
    nodes = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        run_dir = tmp_path / name / "twin"
        assert_same(outcome(run_dir), runs[name][1])
        nodes[name] = {r["node"] for r in read_jsonl(run_dir / "evaluations.jsonl") if not r["cached"]}
        assert len(nodes[name]) == 1, f"{name} ran on more than one Ray node: {nodes[name]}"
    assert nodes["halving"] != nodes["one_stage"], "the two runs shared one Ray"
