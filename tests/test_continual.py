"""Whole runs of a tiny experiment, in-process: files, determinism, worker-count independence."""
import json

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from evolm.jsonfiles import read_jsonl
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor, RayExecutor
from tests.conftest import tiny_experiment


def run_tiny(corpora, run_dir, make_executor):
    config = parse_config(tiny_experiment(corpora, run_dir.parent))
    summaries = [s.to_json() for s in ContinualRun(config, run_dir, make_executor).run()]
    return config, summaries


def fingerprint(run_dir):
    evals = sorted((r["stage"], r["generation"], r["genome_id"], json.dumps(r["values"], sort_keys=True),
                    r["objectives"]["val_loss"], r["cached"]) for r in read_jsonl(run_dir / "evaluations.jsonl"))
    weights = load_file(str(run_dir / "models" / "stage-2" / "model.safetensors"))
    return evals, weights, json.loads((run_dir / "loss_matrix.json").read_text())["matrix"]


@pytest.fixture(scope="module")
def local_run(corpora, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "local"
    config, summaries = run_tiny(corpora, run_dir, lambda: LocalExecutor(threads=1))
    return config, summaries, run_dir


def test_run_directory_holds_every_record(local_run):
    config, summaries, run_dir = local_run
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["search"]["space"]["layers"]["n_layers"] == 2  # the space as searched
    assert resolved["training"]["target_modules"] == ["c_attn"]

    gens = read_jsonl(run_dir / "generations.jsonl")
    assert [(g["stage"], g["generation"]) for g in gens] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(g["best"] <= g["median"] <= g["worst"] for g in gens)

    evals = read_jsonl(run_dir / "evaluations.jsonl")
    assert {e["stage"] for e in evals} == {1, 2}
    for e in evals:
        assert e["status"] == "ok" and np.isfinite(e["objectives"]["val_loss"])
        assert e["curve"]["steps"] == e["values"]["max_steps"] and e["worker"] and e["seconds"] > 0
        assert e["ops"] and isinstance(e["parents"], list)
    stage2_gen0 = [e["genome_id"] for e in evals if e["stage"] == 2 and e["generation"] == 0]
    stage1_final = gens[1]["population"]
    assert set(stage2_gen0) <= set(stage1_final)  # the population is carried over and re-evaluated

    matrix = json.loads((run_dir / "loss_matrix.json").read_text())
    assert matrix["columns"] == ["general", "code", "qa"] and matrix["rows"] == ["base", "code", "qa"]
    assert np.array(matrix["matrix"]).shape == (3, 3)
    for k, s in enumerate(summaries, start=1):
        assert s["start_loss"] == matrix["matrix"][k - 1][k] and s["end_loss"] == matrix["matrix"][k][k]
        assert (run_dir / "models" / f"stage-{k}" / "tokenizer.json").exists()


def test_same_seed_same_run_whatever_the_workers(local_run, corpora, tmp_path, ray_session):
    _, _, first_dir = local_run
    run_tiny(corpora, tmp_path / "again", lambda: LocalExecutor(threads=1))
    run_tiny(corpora, tmp_path / "ray", lambda: RayExecutor(parse_config(tiny_experiment(corpora, tmp_path)).ray))
    first = fingerprint(first_dir)
    for other_dir in (tmp_path / "again", tmp_path / "ray"):
        other = fingerprint(other_dir)
        assert other[0] == first[0]  # same genomes, same fitness (in any order of completion)
        assert other[2] == first[2]
        assert set(other[1]) == set(first[1])
        assert all(np.array_equal(other[1][k], first[1][k]) for k in first[1])
    workers = {e["worker"] for e in read_jsonl(tmp_path / "ray" / "evaluations.jsonl") if not e["cached"]}
    assert len(workers) == 2  # the Ray run really spread its evaluations over two workers


def test_a_stage_where_every_evaluation_fails_stops_with_a_clear_error(corpora, tmp_path):
    from evolm.errors import EvolmError

    import evolm

    def explodes(ctx):
        raise RuntimeError("no_such_metric_backend")

    evolm.OBJECTIVES.register("explodes", explodes)
    try:
        raw = tiny_experiment(corpora, tmp_path)
        raw["search"].update(generations=0, objectives=["val_loss", "explodes"])
        with pytest.raises(EvolmError, match="every evaluation failed"):
            ContinualRun(parse_config(raw), tmp_path / "fails", lambda: LocalExecutor()).run()
    finally:
        evolm.OBJECTIVES._entries.pop("explodes")
    failed = read_jsonl(tmp_path / "fails" / "evaluations.jsonl")
    assert failed and all(e["status"] == "failed" and "RuntimeError: no_such_metric_backend" in e["error"]
                          for e in failed)
