"""Retention as an objective, replay and multi-adapter merges in whole (tiny) runs."""
import dataclasses
import json
import math

import numpy as np
import pytest

from evolm.jsonfiles import read_jsonl
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor
from evolm.metrics import summarize
from tests.conftest import tiny_experiment


@pytest.fixture(scope="module")
def retention_run(corpora, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    raw = tiny_experiment(corpora, tmp)
    raw["search"].update(objectives=["val_loss", "retention_loss"], population_size=4, offspring_size=4,
                         winner={"rule": "min_val_loss_within_retention", "epsilon": 0.5})
    raw["search"]["space"]["replay_ratio"] = {"type": "uniform", "low": 0.0, "high": 0.5}
    raw["merge"] = {"method": "ties", "top_k": 2, "density": 0.5}
    raw["replay"] = {"buffer_blocks": 16}
    config = parse_config(raw)
    summaries = [s.to_json() for s in ContinualRun(config, tmp / "run", lambda: LocalExecutor()).run()]
    return config, summaries, tmp / "run"


def test_two_objectives_are_measured_and_selected_with_nsga2(retention_run):
    _, summaries, run_dir = retention_run
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    assert all(set(e["objectives"]) >= {"val_loss", "retention_loss", "adapter_params"} for e in evals)
    stage1 = [e["objectives"]["retention_loss"] for e in evals if e["stage"] == 1]
    stage2 = [e["objectives"]["retention_loss"] for e in evals if e["stage"] == 2]
    assert len(set(stage1)) > 1 and len(set(stage2)) > 1  # retention is measured per genome
    for s in summaries:
        assert set(s["winner_objectives"]) == {"val_loss", "retention_loss"}
        # top_k 2, unless the Pareto archive holds a single genome
        assert s["merge_method"] == "ties" and len(s["merged"]) == min(2, len(s["hall_of_fame"]))
        for src in s["merged"]:  # the merged adapters are kept, the rest of the stage's adapters pruned
            assert (run_dir / "adapters" / f"stage-{s['stage']}" / f"{src}.safetensors").exists()
        assert len(list((run_dir / "adapters" / f"stage-{s['stage']}").glob("*.safetensors"))) == len(s["merged"])


def test_metrics_follow_the_loss_matrix(retention_run):
    """metrics.json recomputed here, by the definitions, from loss_matrix.json alone.

    L[i][j]: test loss after stage i (row 0: the base) on domain j; here column j is learned at row j."""
    _, summaries, run_dir = retention_run
    matrix = json.loads((run_dir / "loss_matrix.json").read_text())
    assert matrix["rows"] == ["base", "code", "qa"] and matrix["columns"] == ["general", "code", "qa"]
    assert matrix["learned_at"] == [0, 1, 2]
    L, columns = matrix["matrix"], matrix["columns"]
    n = len(L) - 1
    assert n == 2 and all(len(row) == 3 and all(math.isfinite(v) for v in row) for row in L)
    # the matrix is the record of the stages: a stage's start and end test losses are its column before and after it
    for s in summaries:
        k = s["stage"]
        assert s["start_loss"] == L[k - 1][k] and s["end_loss"] == L[k][k]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["columns"] == columns and metrics["rows"] == matrix["rows"] and metrics["learned_at"] == [0, 1, 2]

    # average final loss: the mean of the last row
    average = sum(L[n]) / len(L[n])
    assert metrics["average_final_loss"] == pytest.approx(average, rel=1e-12)
    assert metrics["average_final_perplexity"] == pytest.approx(math.exp(average), rel=1e-12)
    assert metrics["final_loss"] == pytest.approx({c: L[n][j] for j, c in enumerate(columns)}, rel=1e-12)
    assert metrics["final_perplexity"] == pytest.approx({c: math.exp(L[n][j]) for j, c in enumerate(columns)},
                                                        rel=1e-12)

    # forgetting of domain j: L[n][j] - min_{i >= j} L[i][j]; never negative, 0 for the last stage
    forgetting = {c: L[n][j] - min(L[i][j] for i in range(j, n + 1)) for j, c in enumerate(columns)}
    assert metrics["forgetting"] == pytest.approx(forgetting, rel=1e-12, abs=1e-15)
    assert all(v >= 0 for v in metrics["forgetting"].values()) and metrics["forgetting"]["qa"] == 0.0
    # mean forgetting over the stages learned before the last one: here stage 1 (code) alone
    assert metrics["mean_forgetting"] == pytest.approx(forgetting["code"], rel=1e-12, abs=1e-15)

    # BWT over the stages but the last (the base's domain is in forgetting): mean_{1 <= j < n} (L[j][j] - L[n][j])
    bwt = [L[j][j] - L[n][j] for j in range(1, n)]
    assert metrics["backward_transfer"] == pytest.approx(sum(bwt) / len(bwt), rel=1e-12, abs=1e-15)

    # FWT of stage j: the base's loss on j minus the loss of the model just before stage j; none for the base
    fwt = {"code": L[0][1] - L[0][1], "qa": L[0][2] - L[1][2]}
    assert metrics["forward_transfer"].pop("general") is None
    assert metrics["forward_transfer"] == pytest.approx(fwt, rel=1e-12, abs=1e-15)
    assert metrics["mean_forward_transfer"] == pytest.approx(fwt["qa"], rel=1e-12, abs=1e-15)  # stages 2..n

    # and metrics.json is exactly what evolm.metrics makes of the matrix
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summarize(matrix, matrix["learned_at"])))


def test_replay_ratio_changes_training(corpora, tmp_path):
    """The same genome trained with and without replay ends with different adapters."""
    from evolm.config import BuildConfig
    from evolm.genome import hyperparameters
    from evolm.models import build_model
    from evolm.train import evaluate_genome
    import torch

    base = build_model(BuildConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=400), 400, 16, seed=0)
    rng = np.random.default_rng(0)
    blocks = {"train": rng.integers(0, 200, (16, 16)).astype(np.int32),
              "validation": rng.integers(0, 200, (4, 16)).astype(np.int32),
              "replay": rng.integers(200, 400, (16, 16)).astype(np.int32)}
    training = {"eval_batch_size": 4, "eval_max_batches": None}
    hp = hyperparameters({}, {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["c_attn"],
                              "learning_rate": 1e-2, "max_steps": 5, "per_device_train_batch_size": 4,
                              "fan_in_fan_out": True, "replay_ratio": 0.5})
    with_replay = evaluate_genome(base, blocks, hp, 1, training, torch.device("cpu"))
    without = evaluate_genome(base, blocks, dataclasses.replace(hp, replay_ratio=0.0), 1, training, torch.device("cpu"))
    assert any(not np.array_equal(with_replay["adapter"][k], without["adapter"][k]) for k in without["adapter"])


def test_retention_without_a_base_domain_starts_at_zero(corpora, tmp_path):
    """Stage 1 of a model without pretraining has nothing to forget: retention_loss is 0 there."""
    raw = tiny_experiment(corpora, tmp_path)
    del raw["model"]["pretrain"]
    raw["search"].update(objectives=["val_loss", "retention_loss"], generations=0,
                         winner={"rule": "min_val_loss_within_retention", "epsilon": 0.1})
    summaries = [s.to_json() for s in ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor()).run()]
    assert summaries[0]["winner_objectives"]["retention_loss"] == 0.0
    assert summaries[1]["winner_objectives"]["retention_loss"] > 0.0
    evals = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    assert all(e["status"] == "ok" for e in evals)
