"""Retention as an objective, replay and multi-adapter merges in whole (tiny) runs."""
import json

import numpy as np
import pytest

from evolm.checkpoint import read_jsonl
from evolm.config import parse_config
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
    summaries = ContinualRun(config, tmp / "run", lambda: LocalExecutor()).run()
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
        assert s["merge_method"] == "ties" and len(s["merged"]) == 2
        for src in s["merged"]:  # the merged adapters are kept, the rest of the stage's adapters pruned
            assert (run_dir / "adapters" / f"stage-{s['stage']}" / f"{src}.safetensors").exists()
        assert len(list((run_dir / "adapters" / f"stage-{s['stage']}").glob("*.safetensors"))) == 2


def test_metrics_follow_the_loss_matrix(retention_run):
    _, _, run_dir = retention_run
    matrix = json.loads((run_dir / "loss_matrix.json").read_text())
    assert matrix["learned_at"] == [0, 1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summarize(matrix, matrix["learned_at"])))
    L = np.array(matrix["matrix"])
    assert metrics["average_final_loss"] == pytest.approx(L[-1].mean())


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
    without = evaluate_genome(base, blocks, hp | {"replay_ratio": 0.0}, 1, training, torch.device("cpu"))
    assert any(not np.array_equal(with_replay["adapter"][k], without["adapter"][k]) for k in without["adapter"])


def test_retention_without_a_base_domain_starts_at_zero(corpora, tmp_path):
    """Stage 1 of a model without pretraining has nothing to forget: retention_loss is 0 there."""
    raw = tiny_experiment(corpora, tmp_path)
    del raw["model"]["pretrain"]
    raw["search"].update(objectives=["val_loss", "retention_loss"], generations=0,
                         winner={"rule": "min_val_loss_within_retention", "epsilon": 0.1})
    summaries = ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor()).run()
    assert summaries[0]["winner_objectives"]["retention_loss"] == 0.0
    assert summaries[1]["winner_objectives"]["retention_loss"] > 0.0
    evals = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    assert all(e["status"] == "ok" for e in evals)
