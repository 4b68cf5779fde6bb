"""Evolution logic on a fake evaluator (fitness = a formula of the genome): fast and exact."""
import math
import random

import pytest
from deap import tools

from evolm.config import SearchConfig
from evolm.configfile import parse_config
from evolm.searchspace import resolve_space
from evolm.evolution import Evolution
from tests.conftest import tiny_experiment


def fake_loss(values: dict) -> float:
    """Minimum at learning_rate=1e-3, r=8, three active layers."""
    return ((math.log10(values["learning_rate"]) + 3) ** 2 + abs(values["r"] - 8) / 8
            + abs(sum(values["layers"]) - 3) / 3)


def space_for(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    return resolve_space(parse_config(raw), "gpt2", n_layers=6)


def run_search(space, seed, generations=8, stages=1):
    evo = Evolution(space, SearchConfig(population_size=8, offspring_size=8, generations=generations), seed)
    history, population = [], None
    for stage in range(1, stages + 1):
        population = evo.initial_population(stage) if population is None else population
        for g in population:
            g.fitness.values = (fake_loss(g.values),)
        for gen in range(1, generations + 1):
            offspring = evo.vary(population, stage, gen)
            for g in offspring:
                g.fitness.values = (fake_loss(g.values),)
            population = evo.select(population + offspring)
            history.append([(g.id, g.key(), g.fitness.values) for g in population])
    return population, history


def test_search_improves_on_the_fake_objective(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    evo = Evolution(space, SearchConfig(population_size=8, offspring_size=8), 0)
    start = min(fake_loss(g.values) for g in evo.initial_population(1))
    population, _ = run_search(space, seed=0, generations=10)
    best = tools.selBest(population, 1)[0]
    assert best.fitness.values[0] < start


def test_same_seed_same_search_and_runs_do_not_interfere(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    _, first = run_search(space, seed=3)
    _, other = run_search(space, seed=4)  # a different run in the same process in between
    _, again = run_search(space, seed=3)
    assert first == again
    assert first != other


def test_elitism_keeps_the_best(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    evo = Evolution(space, SearchConfig(population_size=4, offspring_size=4, elitism=1), 1)
    pool = evo.initial_population(1) + evo.vary(evo.initial_population(1), 1, 1)
    for i, g in enumerate(pool):
        g.fitness.values = (float(i),)
    assert pool[0] in evo.select(pool)


def test_offspring_record_parents_and_operators(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    evo = Evolution(space, SearchConfig(population_size=6, offspring_size=30, crossover_prob=0.4,
                                        mutation_prob=0.5), 5)
    population = evo.initial_population(1)
    for g in population:
        g.fitness.values = (fake_loss(g.values),)
    ids = {g.id for g in population}
    offspring = evo.vary(population, 1, 1)
    kinds = {g.ops[0].split("(")[0] for g in offspring}
    assert kinds == {"cx_uniform", "mut", "random"}
    for g in offspring:
        assert set(g.parents) <= ids
        assert g.born == (1, 1)
        assert all(space[name].contains(v) for name, v in g.values.items())
        if g.ops[0].startswith("cx_uniform"):
            assert len(g.parents) == 2 and all(p in g.ops[0] for p in g.parents)
        if g.ops[0].startswith("mut"):
            assert len(g.parents) == 1
    assert len({g.id for g in offspring}) == len(offspring)


# ----- several objectives: NSGA-II and the winner rule ----------------------------------------
def penalty(values: dict) -> float:
    """0 exactly at r=8 with three active layers, at least 1/3 elsewhere."""
    return abs(values["r"] - 8) / 8 + abs(sum(values["layers"]) - 3) / 3


def fake_objectives(values: dict) -> tuple[float, float]:
    """A known Pareto front: f1 + f2 = 1 for penalty 0, x = log-position of the learning rate in [0, 1].
    The penalty is added to both objectives, so a penalised genome is dominated by an unpenalised one
    within ``penalty`` of its x."""
    x = (math.log10(values["learning_rate"]) + 4) / 2
    return x + penalty(values), 1 - x + penalty(values)


def run_nsga(space, seed, generations=12, size=12):
    evo = Evolution(space, SearchConfig(population_size=size, offspring_size=size), seed, n_objectives=2)
    population = evo.initial_population(1)
    for g in population:
        g.fitness.values = fake_objectives(g.values)
    for gen in range(1, generations + 1):
        offspring = evo.vary(population, 1, gen)
        for g in offspring:
            g.fitness.values = fake_objectives(g.values)
        population = evo.select(population + offspring)
    return population


def test_nsga2_population_converges_onto_the_known_front(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    population = run_nsga(space, seed=0)
    front = tools.sortNondominated(population, len(population), first_front_only=True)[0]
    assert len(population) == 12
    assert all(penalty(g.values) == 0 for g in front)
    assert all(abs(sum(g.fitness.values) - 1) < 1e-12 for g in front)
    xs = sorted(g.fitness.values[0] for g in front)
    assert len(set(xs)) >= 5 and xs[-1] - xs[0] > 0.5  # spread along the front, not one point
    again = run_nsga(space, seed=0)
    assert [g.key() for g in again] == [g.key() for g in population]


def test_nsga2_selection_keeps_the_first_front_and_failed_genomes_go_last(corpora, tmp_path):
    space = space_for(corpora, tmp_path)
    evo = Evolution(space, SearchConfig(population_size=4, offspring_size=4), 0, n_objectives=2)
    pool = evo.initial_population(1) + evo.vary(evo.initial_population(1), 1, 1)
    points = [(0, 1), (1, 0), (0.5, 0.5), (0.6, 0.6), (0.7, 0.7), (math.inf, math.inf), (2, 2), (math.inf, math.inf)]
    for g, p in zip(pool, points):
        g.fitness.values = p
    survivors = evo.select(pool)
    assert [g.fitness.values for g in survivors][:3] == [(0, 1), (1, 0), (0.5, 0.5)]
    assert survivors[3].fitness.values == (0.6, 0.6)


def test_crowding_distance_and_crowded_tournament():
    from deap import base

    from evolm.evolution import crowding_distances, pareto_ranks, sel_tournament_crowded
    from evolm.genome import Genome

    fitness = type("F", (base.Fitness,), {"weights": (-1.0, -1.0)})
    genomes = []
    for i, p in enumerate([(0, 1), (0.25, 0.75), (0.5, 0.5), (1, 0), (1, 1)]):
        genomes.append(Genome(values={}, id=str(i), fitness=fitness(p)))
    ranks = pareto_ranks(genomes)
    assert ranks == [0, 0, 0, 0, 1]
    # (0.25, 0.75): neighbours span 0.5 on each objective; (0.5, 0.5): 0.75 on each
    assert crowding_distances(genomes, ranks)[:4] == [math.inf, 1.0, 1.5, math.inf]
    picks = sel_tournament_crowded(genomes, 500, random.Random(0))
    counts = {g.id: picks.count(g) for g in genomes}
    # the dominated genome wins only against itself (1/25 of the draws), the crowded (0.25, 0.75) only
    # against itself or the dominated one (3/25), the less crowded (0.5, 0.5) in 5/25
    assert counts["4"] < 40 and 30 < counts["1"] < counts["2"] < 150


def two_objective_genomes(points):
    from deap import base

    from evolm.genome import Genome

    fitness = type("F", (base.Fitness,), {"weights": (-1.0, -1.0)})
    return [Genome(values={}, id=name, fitness=fitness(p)) for name, p in points.items()]


def test_winner_rule_prefers_the_best_learner_that_retains():
    from evolm.evolution import rank_by_rule

    # (val_loss, retention_loss)
    genomes = two_objective_genomes({"A": (2.0, 5.0), "B": (2.5, 4.1), "C": (3.0, 3.9), "D": (1.5, 6.0),
                                     "X": (math.inf, math.inf)})
    objectives = ["val_loss", "retention_loss"]
    rule = {"rule": "min_val_loss_within_retention", "epsilon": 0.05, "base_retention": 4.0}
    assert rank_by_rule(genomes, objectives, rule)[0].id == "B"  # B and C retain within 4.2; B learns best
    assert rank_by_rule(genomes, objectives, {**rule, "epsilon": 0.0})[0].id == "C"
    assert rank_by_rule(genomes, objectives, {**rule, "base_retention": 3.0})[0].id == "C"  # none within: least forgetting
    assert [g.id for g in rank_by_rule(genomes, objectives, rule)] == ["B", "C", "A", "D"]  # failed X left out
    assert rank_by_rule(genomes, objectives, {"rule": "min_first"})[0].id == "D"
    swapped = two_objective_genomes({"A": (5.0, 2.0), "B": (4.1, 2.5), "C": (3.9, 3.0)})
    assert rank_by_rule(swapped, ["retention_loss", "val_loss"], rule)[0].id == "B"


def test_winner_rule_errors_say_what_is_missing():
    from evolm.evolution import rank_by_rule

    genomes = two_objective_genomes({"A": (1.0, 1.0)})
    with pytest.raises(ValueError, match="unknown"):
        rank_by_rule(genomes, ["val_loss", "retention_loss"], {"rule": "max_vibes"})
    with pytest.raises(ValueError, match="retention_loss"):
        rank_by_rule(genomes, ["val_loss", "size"], {"rule": "min_val_loss_within_retention", "base_retention": 1.0})
    with pytest.raises(ValueError, match="base_retention"):
        rank_by_rule(genomes, ["val_loss", "retention_loss"], {"rule": "min_val_loss_within_retention"})
    assert rank_by_rule(two_objective_genomes({"X": (math.inf, 1.0)}), ["val_loss", "retention_loss"],
                        {"rule": "min_first"}) == []  # every evaluation failed: no winner
