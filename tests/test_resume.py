"""Exact resume: a run killed with SIGKILL at several points and resumed ends exactly where the
uninterrupted run does, and no finished evaluation is run twice."""
import json
import subprocess
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load_file

from evolm.checkpoint import latest_checkpoint, tag_order
from evolm.jsonfiles import read_jsonl
from tests.cli_runs import env, evolm_cmd, kill_when, lines, run_to_end
from tests.conftest import ROOT, tiny_experiment, write_experiment


def experiment(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["search"]["generations"] = 2
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 15, "high": 30}  # slow enough to hit mid-generation
    raw["merge"] = {"strengths": [i / 10 for i in range(1, 11)], "candidates": 1}  # a scoring long enough to be killed in
    return write_experiment(tmp_path / "exp.yaml", raw)


def outcome(run_dir):
    """What must not depend on interruptions: genomes, objectives, final weights, loss matrix."""
    evals = sorted((r["stage"], r["generation"], r["genome_id"], json.dumps(r["values"], sort_keys=True),
                    r["status"], (r["objectives"] or {}).get("val_loss")) for r in read_jsonl(run_dir / "evaluations.jsonl"))
    weights = load_file(str(run_dir / "models" / "stage-2" / "model.safetensors"))
    summary = json.loads((run_dir / "summary.json").read_text())
    return evals, weights, json.loads((run_dir / "loss_matrix.json").read_text())["matrix"], \
        [(s["winner"]["id"], s["winner"]["values"]) for s in summary["stages"]]


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    exp = experiment(corpora, tmp)
    run_to_end("run", exp, "--name", "ref", "--no-ray")
    return exp, outcome(tmp / "results" / "ref")


KILL_POINTS = {
    "between generations": lambda d: (d / "checkpoints" / "s001-g0000.json").exists(),
    "mid generation": lambda d: len(lines(d / "evaluations.jsonl", stage=1, generation=1)) >= 1,
    "during a merge": lambda d: len(lines(d / "generations.jsonl", stage=1, generation=2)) >= 1,
    "during the merge-strength scoring": lambda d: len(lines(d / "merge_curve.jsonl", stage=1)) >= 1,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_is_exact(reference, point, corpora, tmp_path):
    exp, expected = reference
    exp_here = write_experiment(tmp_path / "exp.yaml", {**__import__("yaml").safe_load(exp.read_text()),
                                                        "output_dir": str(tmp_path / "results")})
    run_dir = tmp_path / "results" / "killed"
    assert kill_when(["run", exp_here, "--name", "killed", "--no-ray"], lambda: KILL_POINTS[point](run_dir)), \
        "the run ended before the kill point"
    assert not (run_dir / "summary.json").exists()
    if point == "during the merge-strength scoring":
        assert len(lines(run_dir / "merge_curve.jsonl", stage=1)) < 10  # killed before the last point
    resumed = run_to_end("resume", run_dir, "--no-ray")
    assert "resuming" in resumed.stdout
    got = outcome(run_dir)
    assert got[0] == expected[0]
    assert got[2] == expected[2] and got[3] == expected[3]
    assert all(np.array_equal(got[1][k], expected[1][k]) for k in expected[1])
    trained = Counter((r["stage"], r["result_of"]) for r in read_jsonl(run_dir / "evaluations.jsonl") if not r["cached"])
    assert max(trained.values()) == 1, "a finished evaluation was run twice"
    gens = [(g["stage"], g["generation"]) for g in read_jsonl(run_dir / "generations.jsonl")]
    assert gens == sorted(set(gens)) and len(gens) == 6
    curve = [(p["stage"], p["strength"]) for p in read_jsonl(run_dir / "merge_curve.jsonl")]
    assert curve == sorted(set(curve)) and len(curve) == 20  # points of an interrupted scoring not repeated


def test_truncated_checkpoint_falls_back_with_a_warning(reference, corpora, tmp_path):
    exp, expected = reference
    raw = __import__("yaml").safe_load(exp.read_text()) | {"output_dir": str(tmp_path / "results")}
    exp_here = write_experiment(tmp_path / "exp.yaml", raw)
    run_dir = tmp_path / "results" / "cut"
    assert kill_when(["run", exp_here, "--name", "cut", "--no-ray"],
                     lambda: (run_dir / "checkpoints" / "s001-g0002.json").exists())
    newest = max((run_dir / "checkpoints").glob("s*.json"), key=lambda p: tag_order(p.stem))
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # power loss mid-write
    state, warnings = latest_checkpoint(run_dir)
    assert state["tag"] != newest.stem and warnings and newest.name in warnings[0]
    resumed = run_to_end("resume", run_dir, "--no-ray")
    assert "falling back" in resumed.stdout
    got = outcome(run_dir)
    assert got[0] == expected[0] and got[3] == expected[3]


def test_resume_refuses_changed_config_but_allows_extension(reference, corpora, tmp_path):
    exp, _ = reference
    import yaml

    raw = yaml.safe_load(exp.read_text()) | {"output_dir": str(tmp_path / "results")}
    short = dict(raw, stages=raw["stages"][:1])
    run_to_end("run", write_experiment(tmp_path / "short.yaml", short), "--name", "grow", "--no-ray")
    run_dir = tmp_path / "results" / "grow"

    changed = dict(raw, seed=99, block_size=16)
    done = subprocess.run(evolm_cmd("resume", run_dir, "--experiment", write_experiment(tmp_path / "c.yaml", changed)),
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    assert done.returncode == 2 and "block_size, seed" in done.stderr and "Traceback" not in done.stderr

    extended = dict(raw, search=dict(raw["search"], generations=3))  # one more stage, one more generation
    out = run_to_end("resume", run_dir, "--experiment", write_experiment(tmp_path / "e.yaml", extended), "--no-ray")
    assert "2 qa" in out.stdout
    gens = [(g["stage"], g["generation"]) for g in read_jsonl(run_dir / "generations.jsonl")]
    assert gens == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]

    status = subprocess.run(evolm_cmd("status", run_dir), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert status.returncode == 0 and "finished" in status.stdout and "stage      2/2" in status.stdout
    assert "mean forgetting" in status.stdout and "evaluated  " in status.stdout


def test_status_and_resume_of_a_directory_that_is_not_a_run(tmp_path):
    for command in ("status", "resume"):
        done = subprocess.run(evolm_cmd(command, tmp_path), capture_output=True, text=True, env=env(), cwd=ROOT)
        assert done.returncode == 2 and "not an evolm run directory" in done.stderr
        assert "Traceback" not in done.stderr
