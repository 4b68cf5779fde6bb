"""Asynchronous steady-state search (``search.mode: steady_state``, evolm/steady.py).

- survival and breeding: the child replaces the worst of mu + 1, a tie keeps the elders, ids never repeat;
- a run trains as many children as the generational search, one line per offspring_size takes;
- asynchronous halving promotes a rung result by ASHA's rule as it arrives and takes the others as they
  stand;
- SIGKILLed mid-generation, between generations and between a rung and a take (``--no-ray``: takes in
  birth order), resumed, it ends bit-identical to the uninterrupted run;
- on Ray with two workers and asynchronous halving (rung results and takes in the order they finish),
  killed and resumed, no recorded rung or take is lost or trained again, and the finished run replayed from its ledger alone, on another executor,
  ends bit-identical: the run is a function of its seed and its recorded take order.
"""
import random
import shutil
from collections import Counter

import pytest
import yaml

from evolm.config import SearchConfig
from evolm.configfile import parse_config
from evolm.errors import ConfigError
from evolm.evolution import Evolution
from evolm.jsonfiles import read_jsonl
from evolm.space import Uniform
from tests.cli_runs import kill_when, lines, run_to_end
from tests.conftest import tiny_experiment, write_experiment
from tests.test_survival import assert_nothing_done_twice, assert_same, outcome


def steady_experiment(corpora, out_dir, halving=False):
    raw = tiny_experiment(corpora, out_dir)
    del raw["model"]["pretrain"]
    raw["search"].update(mode="steady_state", generations=2)
    if halving:  # asynchronous promotion: a child trains half its steps, then goes on or is taken
        raw["search"]["halving"] = {"rungs": 2, "reduction_factor": 2}
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 15, "high": 30}  # long enough to be killed in
    raw["merge"] = {"strengths": [0.5, 1.0], "candidates": 1}
    return raw


# ----- breeding and survival ---------------------------------------------------------------------

def evolution(mu=3, lam=2, objectives=1):
    space = {"x": Uniform(type="uniform", low=0.0, high=1.0)}
    return Evolution(space, SearchConfig(population_size=mu, offspring_size=lam), run_seed=1, n_objectives=objectives)


def scored(evo, values, fit, gen=1, i=0):
    g = evo.genome({"x": values}, 1, gen, i)
    g.fitness.values = fit
    return g


def test_the_child_replaces_the_worst_and_a_tie_keeps_the_elders():
    evo = evolution()
    pop = [scored(evo, 0.1, (3.0,), i=0), scored(evo, 0.2, (1.0,), i=1), scored(evo, 0.3, (2.0,), i=2)]
    better = scored(evo, 0.4, (1.5,), gen=2)
    assert [g.fitness.values[0] for g in evo.replace(pop, better)] == [1.0, 1.5, 2.0]
    tie = scored(evo, 0.5, (3.0,), gen=3)
    assert tie not in evo.replace(pop, tie) and pop[0] in evo.replace(pop, tie)
    failed = scored(evo, 0.6, (float("inf"),), gen=4)
    assert failed not in evo.replace(pop, failed)


def test_several_objectives_keep_the_nsga2_survivors():
    evo = evolution(objectives=2)
    pop = [scored(evo, 0.1, (1.0, 3.0), i=0), scored(evo, 0.2, (3.0, 1.0), i=1), scored(evo, 0.3, (3.0, 3.0), i=2)]
    child = scored(evo, 0.4, (2.0, 2.0), gen=2)
    kept = evo.replace(pop, child)
    assert len(kept) == 3 and child in kept and pop[2] not in kept  # the dominated one leaves


def test_breeding_numbers_children_in_batches_of_offspring_size():
    evo = evolution(lam=2)
    pop = [scored(evo, random.random(), (float(i),), i=i) for i in range(3)]
    children = [evo.breed(pop, 1, b) for b in range(1, 6)]
    assert [c.born for c in children] == [(1, 1), (1, 1), (1, 2), (1, 2), (1, 3)]
    assert len({c.id for c in children}) == 5
    assert all(0.0 <= c.values["x"] <= 1.0 for c in children)


def test_steady_state_with_a_generation_scheduler_is_refused_saying_why(corpora, tmp_path):
    raw = steady_experiment(corpora, tmp_path)
    raw["search"]["scheduler"] = "fifo"
    with pytest.raises(ConfigError, match="steady_state .*schedules its own.*remove search.scheduler, or set "
                                          "search.mode: generational"):
        parse_config(raw)
    raw["search"]["mode"] = "generational"
    assert parse_config(raw).search.scheduler == "fifo"


def test_the_library_default_is_the_steady_state_with_asynchronous_halving(corpora, tmp_path):
    """What won the search benchmark at equal steps is what a config that says nothing gets."""
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"] = {}
    search = parse_config(raw).search
    assert (search.mode, search.halving.rungs, search.halving.reduction_factor) == ("steady_state", 3, 3)
    assert search.inherit_weights and search.scheduler is None


# ----- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """The steady-state experiment run uninterrupted without Ray."""
    tmp = tmp_path_factory.mktemp("steady")
    exp = write_experiment(tmp / "steady.yaml", steady_experiment(corpora, tmp / "results"))
    run_to_end("run", exp, "--name", "ref", "--no-ray")
    return exp, tmp / "results" / "ref"


@pytest.fixture(scope="module")
def halving_reference(corpora, tmp_path_factory):
    """The steady-state experiment with asynchronous halving, run uninterrupted without Ray."""
    tmp = tmp_path_factory.mktemp("steady-halving")
    exp = write_experiment(tmp / "steady.yaml", steady_experiment(corpora, tmp / "results", halving=True))
    run_to_end("run", exp, "--name", "ref", "--no-ray")
    return exp, tmp / "results" / "ref"


def here(exp, tmp_path):
    return write_experiment(tmp_path / exp.name, yaml.safe_load(exp.read_text()) | {"output_dir": str(tmp_path)})


def test_a_steady_run_trains_as_many_children_as_generations_would(reference):
    _, run_dir = reference
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    for stage in (1, 2):
        mine = [r for r in evals if r["stage"] == stage]
        assert Counter(r["generation"] for r in mine) == {0: 3, 1: 3, 2: 3}
        children = [r for r in mine if r["generation"] > 0]
        assert len({r["genome_id"] for r in children}) == 6 and not any(r["cached"] for r in children)
        assert all(15 <= r["steps"] <= 30 for r in children if r["inherited"] is None)
    gens = [(g["stage"], g["generation"], g["evaluations"]) for g in read_jsonl(run_dir / "generations.jsonl")]
    assert gens == [(s, g, 3) for s in (1, 2) for g in (0, 1, 2)]
    assert any(r["inherited"] for r in evals if r["generation"] > 0)  # children start from their parents


def test_asynchronous_halving_promotes_by_ashas_rule_and_takes_the_rest_as_they_stand(halving_reference):
    _, run_dir = halving_reference
    # generation 0 halves as the generational search does; the children's rungs carry takes_before
    rungs = [r for r in read_jsonl(run_dir / "rungs.jsonl") if r["stage"] == 1 and "takes_before" in r]
    evals = {r["genome_id"]: r for r in read_jsonl(run_dir / "evaluations.jsonl") if r["stage"] == 1 and r["generation"] > 0}
    assert len(rungs) == 6 and [r["takes_before"] for r in rungs] == sorted(r["takes_before"] for r in rungs)
    seen = []
    for r in rungs:  # each rung-0 result in arrival order: promoted iff within the best half of those so far
        seen.append(r["objectives"]["val_loss"])
        best_half = sorted(seen)[: -(-len(seen) // 2)]
        promoted = not r["complete"] and r["objectives"]["val_loss"] <= best_half[-1]
        taken = evals[r["genome_id"]]
        assert (taken["rung"], taken["halted"]) == ((1, False) if promoted else (0, not r["complete"]))
        if promoted:  # trained on from where it paused: its steps are its max_steps, counted once
            assert taken["steps"] == taken["values"]["max_steps"] and taken["steps"] > r["steps"]
    assert {e["rung"] for e in evals.values()} == {0, 1}  # some promoted, some taken at rung 0


KILL_POINTS = {
    "mid-generation": lambda d: len(lines(d / "evaluations.jsonl", stage=1, generation=1)) >= 1,
    "between generations": lambda d: (d / "checkpoints" / "s001-g0001.json").exists(),
    "after a rung, before its child's take": lambda d: len(lines(d / "rungs.jsonl", stage=1)) >= 2,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_and_resumed_without_ray_it_ends_as_the_uninterrupted_run(reference, halving_reference, point,
                                                                          tmp_path):
    exp, ref = halving_reference if "rung" in point else reference
    run_dir = tmp_path / "killed"
    assert kill_when(["run", here(exp, tmp_path), "--name", "killed", "--no-ray"], lambda: KILL_POINTS[point](run_dir))
    assert not (run_dir / "summary.json").exists()
    run_to_end("resume", run_dir, "--no-ray")
    assert_same(outcome(run_dir), outcome(ref))
    assert_nothing_done_twice(run_dir)


def replayed_from_ledger(run_dir, into):
    """A copy of a finished run that keeps its ledger only (no checkpoint, no model after stage 0): resumed,
    it must take every result from the ledger, in its recorded order, and train nothing."""
    shutil.copytree(run_dir, into)
    shutil.rmtree(into / "checkpoints")
    for name in ("summary.json", "merge_curve.jsonl"):
        (into / name).unlink()
    for k in (1, 2):
        shutil.rmtree(into / "models" / f"stage-{k}")
    return into


def test_on_ray_killed_and_resumed_nothing_is_lost_and_the_ledger_replays_it_exactly(halving_reference, tmp_path):
    """With asynchronous halving: rung results and takes both arrive in the order the workers finish."""
    exp, _ = halving_reference
    run_dir = tmp_path / "ray"
    before = {}

    def mid_generation():
        done = lines(run_dir / "evaluations.jsonl", stage=1, generation=1)
        if done and not lines(run_dir / "generations.jsonl", stage=1, generation=1):
            before["records"] = (run_dir / "evaluations.jsonl").read_text().splitlines()
            before["rungs"] = lines(run_dir / "rungs.jsonl")
            return True
        return False

    assert kill_when(["run", here(exp, tmp_path), "--name", "ray"], mid_generation)
    run_to_end("resume", run_dir)
    after = (run_dir / "evaluations.jsonl").read_text().splitlines()
    assert after[: len(before["records"])] == before["records"]  # every take recorded before the kill kept
    assert_nothing_done_twice(run_dir)
    assert lines(run_dir / "rungs.jsonl")[: len(before["rungs"])] == before["rungs"]
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    assert Counter((r["stage"], r["generation"]) for r in evals) == {(s, g): 3 for s in (1, 2) for g in (0, 1, 2)}
    workers = {r["worker"] for r in evals if r["generation"] > 0}
    assert None not in workers and len(workers) >= 2  # trained by Ray's workers (two, then two new ones)

    replay = replayed_from_ledger(run_dir, tmp_path / "replay")
    resumed = run_to_end("resume", replay, "--no-ray")
    assert "no checkpoint yet" in resumed.stdout
    assert_same(outcome(replay), outcome(run_dir))
    assert read_jsonl(replay / "evaluations.jsonl") == evals  # nothing trained, nothing added
