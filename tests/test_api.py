"""The public API: run / resume / load_run with in-memory data, and the registries as extension points."""
from __future__ import annotations

import json
from typing import Literal

import pytest
import torch

import evolm
from evolm.errors import ConfigError
from tests.conftest import ROOT, tiny_experiment


def next_token_accuracy(ctx):
    """Share of validation tokens the model predicts exactly (higher is better)."""
    x = torch.as_tensor(ctx.blocks["validation"][:8], dtype=torch.long, device=ctx.device)
    logits = ctx.model(input_ids=x).logits
    return (logits[:, :-1].argmax(-1) == x[:, 1:]).float().mean().item()


next_token_accuracy.direction = "maximize"
if "next_token_accuracy" not in evolm.OBJECTIVES:
    evolm.OBJECTIVES.register("next_token_accuracy", next_token_accuracy)


def in_memory(corpora, tmp_path, **search):
    raw = tiny_experiment(corpora, tmp_path)
    docs = (corpora / "code.txt").read_text().split("\n\n")[:300]
    raw["model"].pop("pretrain")
    raw["stages"] = [{"name": "notes", "documents": docs}]
    raw["search"] = {"population_size": 2, "offspring_size": 2, "generations": 1,
                     "objectives": ["val_loss", "next_token_accuracy"],
                     "space": {"max_steps": {"type": "int", "low": 2, "high": 4}}} | search
    return raw


def test_run_with_in_memory_data_and_a_custom_objective(corpora, tmp_path):
    summaries = evolm.run(in_memory(corpora, tmp_path), tmp_path / "run", executor="local")
    assert [s.name for s in summaries] == ["notes"] and isinstance(summaries[0], evolm.StageSummary)
    run = evolm.load_run(tmp_path / "run")
    evaluated = run.evaluated()
    assert len(evaluated) >= 2 and all(e.ok for e in evaluated)
    for e in evaluated:  # a maximised objective is stored negated: lower is better inside evolm
        assert -1.0 <= e.objectives["next_token_accuracy"] <= 0.0
    # NSGA-II over (val_loss, -accuracy): the winner is on the first front of what was evaluated
    w = summaries[0].winner_objectives
    assert not any(e.objectives["val_loss"] < w["val_loss"] and e.objectives["next_token_accuracy"]
                   < w["next_token_accuracy"] for e in evaluated)
    # the winner's recorded accuracy is what the function measures on the merged adapter's genome
    assert json.loads((tmp_path / "run" / "experiment.json").read_text())["stages"][0]["documents"]


def test_a_custom_objective_runs_on_ray_workers_with_the_same_values(corpora, tmp_path, ray_session):
    raw = in_memory(corpora, tmp_path, generations=0)
    local = evolm.run(raw, tmp_path / "local", executor="local")
    on_ray = evolm.run(raw, tmp_path / "ray", executor="ray")
    assert local[0].winner_objectives == on_ray[0].winner_objectives
    workers = {e.worker for e in evolm.load_run(tmp_path / "ray").evaluated()}
    assert all(str(w).split(":")[-1] != str(__import__("os").getpid()) for w in workers)  # ran in other processes


def test_objective_errors_are_clear(corpora, tmp_path):
    raw = in_memory(corpora, tmp_path)
    raw["search"]["objectives"] = ["val_loss", "no_such_module_xyz:score"]
    with pytest.raises(ConfigError, match="search.objectives.*no_such_module_xyz:score.*cannot be imported"):
        evolm.run(raw, tmp_path / "run", executor="local")
    raw["search"]["objectives"] = ["vibes"]
    with pytest.raises(ConfigError, match="unknown objective 'vibes'.*val_loss"):
        evolm.run(raw, tmp_path / "run", executor="local")
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_objective_that_returns_a_non_number_fails_that_evaluation_as_data(corpora, tmp_path):
    if "says_hello" not in evolm.OBJECTIVES:
        evolm.OBJECTIVES.register("says_hello", lambda ctx: "hello")
    raw = in_memory(corpora, tmp_path, objectives=["val_loss", "says_hello"], generations=0)
    with pytest.raises(evolm.EvolmError, match="every evaluation failed"):
        evolm.run(raw, tmp_path / "run", executor="local")
    errors = {e.error for e in evolm.load_run(tmp_path / "run").evaluations}
    assert errors and all("says_hello" in e and "not a number" in e for e in errors)


def test_registered_parts_are_valid_config_names(corpora, tmp_path):
    raw = in_memory(corpora, tmp_path)
    raw["merge"] = {"method": "no_merge_yet"}
    with pytest.raises(ConfigError, match="unknown merge method 'no_merge_yet'; use one of best, task_arithmetic"):
        evolm.parse_config(raw)

    @evolm.MERGE_STRATEGIES.register("keep_base")
    def keep_base(base_model, winners, weights, density, seed):
        return base_model

    @evolm.WINNER_RULES.register("last_id")
    def last_id(genomes, objectives, rule):
        return sorted(genomes, key=lambda g: g.id, reverse=True)

    class Fixed(evolm.GeneType):
        type: Literal["fixed"]
        value: float

        def sample(self, rng):
            return self.value

        def mutate(self, value, rng):
            return self.value, "fixed"

        def contains(self, value):
            return value == self.value

    evolm.GENE_TYPES.register("fixed", Fixed)
    try:
        raw["merge"] = {"method": "keep_base"}
        raw["search"]["winner"] = {"rule": "last_id"}
        raw["search"]["space"]["learning_rate"] = {"type": "fixed", "value": 0.003}
        summaries = evolm.run(raw, tmp_path / "run", executor="local")
        run = evolm.load_run(tmp_path / "run")
        assert {e.values["learning_rate"] for e in run.evaluations} == {0.003}
        assert summaries[0].winner_id == max(summaries[0].hall_of_fame)  # the rule picked the last id
        assert summaries[0].merge_method == "keep_base"
        assert summaries[0].end_loss == summaries[0].start_loss  # the base was kept as it was
    finally:
        for registry, name in ((evolm.MERGE_STRATEGIES, "keep_base"), (evolm.WINNER_RULES, "last_id"),
                               (evolm.GENE_TYPES, "fixed")):
            registry._entries.pop(name, None)


def test_resume_of_a_finished_run_changes_nothing(corpora, tmp_path):
    raw = in_memory(corpora, tmp_path, generations=0)
    first = evolm.run(raw, tmp_path / "run", executor="local")
    again = evolm.resume(tmp_path / "run", executor="local")
    assert [s.to_json() for s in again] == [s.to_json() for s in first]


def test_documents_and_train_are_exclusive(corpora, tmp_path):
    raw = in_memory(corpora, tmp_path)
    raw["stages"][0]["train"] = str(corpora / "code.txt")
    with pytest.raises(ConfigError, match=r"stages\[0\].*exactly one of train"):
        evolm.parse_config(raw)
    raw["stages"][0].pop("train")
    raw["stages"][0]["documents"] = ["  ", ""]
    with pytest.raises(ConfigError, match=r"stages\[0\].*documents is empty"):
        evolm.parse_config(raw)


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using evolm as a library"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    evolm.OBJECTIVES._entries.pop("next_token_accuracy", None)  # the example registers its own
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        evolm.OBJECTIVES._entries.pop("next_token_accuracy", None)
        evolm.OBJECTIVES.register("next_token_accuracy", next_token_accuracy)
    run = evolm.load_run(tmp_path / "results" / "notes")
    assert run.finished and all(e.ok and "next_token_accuracy" in e.objectives for e in run.evaluated())
    assert "next_token_accuracy" in capsys.readouterr().out
