"""Evolution logic on a fake evaluator (fitness = a formula of the genome): fast and exact."""
import math

from deap import tools

from evolm.config import SearchConfig, parse_config, resolve_space
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
