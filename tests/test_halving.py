"""Successive halving: paused training resumes exactly, rungs promote the best, steps are counted,
and a run stopped mid-generation resumes the same decisions without training any rung twice."""
import json

import numpy as np
import pytest
import torch

from evolm.jsonfiles import read_jsonl
from evolm.config import BuildConfig
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.schedulers import rung_steps, survivors
from evolm.executor import LocalExecutor
from evolm.models import build_model
from evolm.status import format_status, run_status
from evolm.train import evaluate_genome
from tests.conftest import tiny_experiment

HP = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["c_attn"], "learning_rate": 3e-3,
      "max_steps": 9, "per_device_train_batch_size": 4, "warmup_ratio": 0.2, "weight_decay": 0.01,
      "replay_ratio": 0.25}
TRAINING = {"eval_batch_size": 8, "eval_max_batches": 2}


@pytest.fixture(scope="module")
def base():
    return build_model(BuildConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=300), 300, 16, seed=0)


def blocks(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 300, size=(n, 16)).astype(np.int32)


def test_rung_budgets():
    assert [rung_steps(90, r, 3, 3) for r in range(3)] == [10, 30, 90]
    assert [rung_steps(2, r, 3, 3) for r in range(3)] == [1, 1, 2]  # never below one step
    assert [survivors(n, 3) for n in (1, 2, 3, 4, 6, 9)] == [1, 1, 1, 2, 2, 3]


def test_paused_training_resumes_exactly(base):
    """Training 9 steps in one go equals 3 + 4 + 2 steps with two pauses: adapter, losses and objectives."""
    torch.set_num_threads(1)
    data = {"train": blocks(), "validation": blocks(8, 1), "replay": blocks(16, 2)}
    whole = evaluate_genome(base, data, HP, 5, TRAINING, torch.device("cpu"))
    first = evaluate_genome(base, data, HP, 5, TRAINING, torch.device("cpu"), stop_at=3)
    assert first["steps"] == 3 and first["state"] is not None
    second = evaluate_genome(base, data, HP, 5, TRAINING, torch.device("cpu"), resume=first["state"], stop_at=7)
    assert second["steps"] == 7
    last = evaluate_genome(base, data, HP, 5, TRAINING, torch.device("cpu"), resume=second["state"])
    assert last["state"] is None and last["steps"] == 9 == whole["steps"]
    assert last["objectives"] == whole["objectives"]
    assert last["curve"] == whole["curve"]
    for key, value in whole["adapter"].items():
        np.testing.assert_array_equal(last["adapter"][key], value)
    assert first["objectives"]["val_loss"] != whole["objectives"]["val_loss"]  # the pause really was earlier


def experiment(corpora, tmp_path, **search):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["stages"] = raw["stages"][:1]
    raw["search"].update({"population_size": 4, "offspring_size": 4, "generations": 1,
                          "space": {"max_steps": {"type": "int", "low": 6, "high": 12}}, **search})
    return parse_config(raw)


class StopAfter(LocalExecutor):
    """Dies (like a killed process) once ``n`` evaluations have reported."""

    def __init__(self, n):
        super().__init__(threads=1)
        self.left = n

    def map(self, requests, on_result):
        def counted(result):
            if self.left == 0:
                raise KeyboardInterrupt("stopped")
            self.left -= 1
            on_result(result)

        super().map(requests, counted)


def run(config, run_dir, executor=None):
    return [s.to_json() for s in ContinualRun(config, run_dir, lambda: executor or LocalExecutor(threads=1)).run()]


def test_halving_promotes_the_best_and_counts_steps(corpora, tmp_path):
    halving = {"rungs": 2, "reduction_factor": 2}
    plain_dir, halving_dir = tmp_path / "plain", tmp_path / "halving"
    run(experiment(corpora, tmp_path), plain_dir)
    summary = run(experiment(corpora, tmp_path, halving=halving), halving_dir)[0]
    evals, rungs = read_jsonl(halving_dir / "evaluations.jsonl"), read_jsonl(halving_dir / "rungs.jsonl")
    plain = {r["genome_id"]: r for r in read_jsonl(plain_dir / "evaluations.jsonl") if r["generation"] == 0}
    gen0 = [r for r in evals if r["generation"] == 0]
    assert len(gen0) == 4 and len([r for r in rungs if r["generation"] == 0]) == 4
    full = [r for r in gen0 if not r["halted"]]
    halted = [r for r in gen0 if r["halted"]]
    assert len(full) == 2 and len(halted) == 2  # 4 genomes, factor 2: the best 2 go on
    for r in full:  # promoted genomes end exactly where training in one go ends
        assert r["steps"] == r["values"]["max_steps"] == plain[r["genome_id"]]["steps"]
        assert r["objectives"] == plain[r["genome_id"]]["objectives"]
    for r in halted:
        assert r["steps"] == rung_steps(r["values"]["max_steps"], 0, 2, 2) < r["values"]["max_steps"]
    rung0 = {r["genome_id"]: r["objectives"]["val_loss"] for r in rungs if r["generation"] == 0}
    assert max(rung0[r["genome_id"]] for r in full) <= min(rung0[r["genome_id"]] for r in halted)
    trained = [r for r in evals if not r["cached"]]
    assert summary["steps"] == sum(r["steps"] for r in trained)
    assert summary["steps"] < sum(r["values"]["max_steps"] for r in trained)
    assert not (halving_dir / "adapters" / "stage-1" / "rungs").exists()  # paused states are pruned
    status = run_status(halving_dir)
    assert status["steps_trained"] == summary["steps"] and status["halted"] == sum(r["halted"] for r in trained) >= 2
    assert "stopped early by successive halving" in format_status(status)


def test_halving_resumes_mid_generation(corpora, tmp_path):
    config = experiment(corpora, tmp_path, halving={"rungs": 3, "reduction_factor": 2})
    run(config, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "resumed", StopAfter(6))  # rung 0 of generation 0 done, rung 1 half done
    before = read_jsonl(tmp_path / "resumed" / "rungs.jsonl")
    assert len(before) == 6
    ContinualRun(config, tmp_path / "resumed", lambda: LocalExecutor(threads=1)).resume()
    outcome = lambda d: sorted(json.dumps([r["generation"], r["genome_id"], r["objectives"], r["steps"]])  # noqa: E731
                               for r in read_jsonl(d / "evaluations.jsonl"))
    assert outcome(tmp_path / "resumed") == outcome(tmp_path / "whole")
    rung_keys = [(r["generation"], r["genome_id"], r["rung"]) for r in read_jsonl(tmp_path / "resumed" / "rungs.jsonl")]
    assert len(rung_keys) == len(set(rung_keys))  # no rung trained twice
    assert rung_keys == [(r["generation"], r["genome_id"], r["rung"]) for r in read_jsonl(tmp_path / "whole" / "rungs.jsonl")]


def test_halving_with_inheritance_on_ray_equals_local(corpora, tmp_path, ray_session):
    """Paused states and parent adapters travel to Ray workers and back: same records as in-process."""
    from evolm.executor import RayExecutor

    config = experiment(corpora, tmp_path, halving={"rungs": 2, "reduction_factor": 2}, inherit_weights=True)
    run(config, tmp_path / "local")
    run(config, tmp_path / "ray", RayExecutor(config.ray))
    records = lambda d: sorted(json.dumps([r["generation"], r["genome_id"], r["objectives"], r["steps"], r["inherited"]])  # noqa: E731
                               for r in read_jsonl(d / "evaluations.jsonl"))
    assert records(tmp_path / "ray") == records(tmp_path / "local")
    children = [r for r in read_jsonl(tmp_path / "ray" / "evaluations.jsonl")
                if r["generation"] > 0 and not r["cached"] and r["ops"] != ["random"]]
    assert any(not r["halted"] for r in children)
    assert all(r["inherited"] for r in children)  # promoted children keep what they inherited at rung 0


def test_step_budget_ends_the_stage_search(corpora, tmp_path):
    config = experiment(corpora, tmp_path, generations=5, step_budget=1)
    summary = run(config, tmp_path / "budget")[0]
    gens = {r["generation"] for r in read_jsonl(tmp_path / "budget" / "evaluations.jsonl")}
    assert gens == {0} and summary["steps"] >= 1  # generation 0 spent the budget; no generation started after


def test_step_budget_ends_within_one_evaluation_of_its_value(corpora, tmp_path):
    probe = run(experiment(corpora, tmp_path, generations=0), tmp_path / "probe")[0]
    limit = probe["steps"] + 20
    summary = run(experiment(corpora, tmp_path, generations=6, step_budget=limit), tmp_path / "b")[0]
    assert limit <= summary["steps"] < limit + 12  # max_steps is at most 12: less than one evaluation over
    trained = [r for r in read_jsonl(tmp_path / "b" / "evaluations.jsonl") if not r["cached"] and r["generation"]]
    assert len(trained) < 6 * 4  # the last generation was cut short, not finished whatever it cost


def test_step_budget_decides_the_same_after_a_resume(corpora, tmp_path):
    """A kill mid-generation leaves part of that generation's steps in the ledger; the budget check
    before that generation must still see only the generations before it."""
    probe = run(experiment(corpora, tmp_path, generations=0), tmp_path / "probe")[0]
    config = experiment(corpora, tmp_path, generations=3, step_budget=probe["steps"] + 13)  # two or three of generation 1
    run(config, tmp_path / "whole")
    trained = [r["generation"] for r in read_jsonl(tmp_path / "whole" / "evaluations.jsonl") if not r["cached"]]
    assert trained.count(1) >= 2
    with pytest.raises(KeyboardInterrupt):  # all of generation 0, all but one of generation 1
        run(config, tmp_path / "resumed", StopAfter(len(trained) - 1))
    ContinualRun(config, tmp_path / "resumed", lambda: LocalExecutor(threads=1)).resume()
    outcome = lambda d: sorted(json.dumps([r["generation"], r["genome_id"], r["objectives"]])  # noqa: E731
                               for r in read_jsonl(d / "evaluations.jsonl"))
    assert outcome(tmp_path / "resumed") == outcome(tmp_path / "whole")
    assert {json.loads(r)[0] for r in outcome(tmp_path / "whole")} == {0, 1}


def test_time_budgets_end_a_stage_and_the_run_after_a_generation(corpora, tmp_path):
    """A budget below any generation's time: every stage stops after generation 0 (a stage budget per
    stage; a run budget once spent, for every later stage), and still merges its best."""
    def two_stages(**search):
        raw = tiny_experiment(corpora, tmp_path / "results")
        raw["search"].update({"population_size": 2, "offspring_size": 2, **search})
        return parse_config(raw)

    run(two_stages(generations=3, time_budget=1e-3), tmp_path / "stage")
    gens = {(r["stage"], r["generation"]) for r in read_jsonl(tmp_path / "stage" / "generations.jsonl")}
    assert gens == {(1, 0), (2, 0)}
    summaries = run(two_stages(generations=2, run_time_budget=1e-3), tmp_path / "run")
    gens = [(r["stage"], r["generation"]) for r in read_jsonl(tmp_path / "run" / "generations.jsonl")]
    assert gens == [(1, 0), (2, 0)] and len(summaries) == 2  # every stage still evaluated and merged


def test_a_rung_that_completes_a_genome_leaves_its_slot_to_a_contender(corpora, tmp_path):
    """max_steps 1 is done after rung 0 (budgets 1, 1, 2): finished at once, not halted, no promotion slot."""
    config = experiment(corpora, tmp_path, generations=0, population_size=6, offspring_size=1,
                        halving={"rungs": 3, "reduction_factor": 3},
                        space={"max_steps": {"type": "int", "low": 1, "high": 2}})
    run(config, tmp_path / "run")
    evals = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    short = [r for r in evals if r["values"]["max_steps"] == 1 and not r["cached"]]
    longer = [r for r in evals if r["values"]["max_steps"] == 2 and not r["cached"]]
    assert short and longer
    assert all(not r["halted"] and r["steps"] == 1 and r["rung"] == 0 for r in short)
    assert sum(not r["halted"] for r in longer) == 1  # survivors(6 genomes, 3) = 2 slots, then 1: one reaches the end

