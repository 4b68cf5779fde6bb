"""The DEAP side of a run: typed variation, tournament selection with elitism, hall of fame.

Everything is built per run (a fitness class made with ``type``, not DEAP's global ``creator``),
and every random choice comes from the run's own ``random.Random``, so two runs in one process
never disturb each other and a run is reproducible from its seed alone.

One generation, as DEAP's (mu + lambda):
    offspring  = vary(population)            lambda children: crossover | mutation | immigrant
    evaluate(genomes without a valid fitness)
    population = select(population + offspring, mu)   elitism + tournaments
"""
from __future__ import annotations

import math
import random
from typing import Any

from deap import base, tools

from evolm.config import SearchConfig
from evolm.genome import Genome, make_id


def sel_tournament(pool: list[Genome], k: int, tournsize: int, rng: random.Random) -> list[Genome]:
    """k winners of tournaments of ``tournsize`` genomes drawn with replacement."""
    return [max((rng.choice(pool) for _ in range(tournsize)), key=lambda g: g.fitness) for _ in range(k)]


def cx_uniform(a: dict, b: dict, space: dict, rng: random.Random) -> dict:
    """A child taking each gene from either parent (layer masks are mixed block by block)."""
    return {name: gene.cross(a[name], b[name], rng)[0] for name, gene in space.items()}


def mut_typed(values: dict, space: dict, rng: random.Random) -> tuple[dict, str]:
    """Mutate each gene with probability 1/len(space) (at least one), by the gene's own operator."""
    names = list(space)
    chosen = [n for n in names if rng.random() < 1.0 / len(names)] or [rng.choice(names)]
    child, described = dict(values), []
    for name in chosen:
        child[name], what = space[name].mutate(values[name], rng)
        described.append(f"{name} {what}")
    return child, "mut(" + ", ".join(described) + ")"


class Evolution:
    """Variation and selection for one run; ``rng`` state is part of the run's checkpoint."""

    def __init__(self, space: dict[str, Any], search: SearchConfig, run_seed: int, n_objectives: int = 1):
        self.space, self.search, self.run_seed = space, search, run_seed
        self.rng = random.Random(run_seed)
        # Minimise every objective; the class lives only as long as this run.
        self.fitness_class = type("Fitness", (base.Fitness,), {"weights": (-1.0,) * n_objectives})
        self.toolbox = base.Toolbox()
        self.toolbox.register("mate", cx_uniform, space=space, rng=self.rng)
        self.toolbox.register("mutate", mut_typed, space=space, rng=self.rng)
        self.toolbox.register("select", sel_tournament, tournsize=search.tournament_size, rng=self.rng)

    def genome(self, values: dict, stage: int, generation: int, index: int, parents=(), ops=()) -> Genome:
        for name, gene in self.space.items():
            if not gene.contains(values[name]):  # operators must never leave the space
                raise AssertionError(f"gene {name} value {values[name]!r} is outside its range")
        return Genome(values=values, id=make_id(self.run_seed, stage, generation, index), parents=list(parents),
                      ops=list(ops), born=(stage, generation), fitness=self.fitness_class())

    def random_values(self) -> dict:
        return {name: gene.sample(self.rng) for name, gene in self.space.items()}

    def initial_population(self, stage: int) -> list[Genome]:
        return [self.genome(self.random_values(), stage, 0, i, ops=["random"])
                for i in range(self.search.population_size)]

    def vary(self, population: list[Genome], stage: int, generation: int) -> list[Genome]:
        """lambda offspring, each made by crossover, mutation, or (rarely) as a random immigrant."""
        s, offspring = self.search, []
        for i in range(s.offspring_size):
            roll = self.rng.random()
            if roll < s.crossover_prob:
                p1, p2 = self.toolbox.select(population, 2)
                values, parents, ops = self.toolbox.mate(p1.values, p2.values), [p1.id, p2.id], [f"cx_uniform({p1.id}, {p2.id})"]
            elif roll < s.crossover_prob + s.mutation_prob:
                (p,) = self.toolbox.select(population, 1)
                values, op = self.toolbox.mutate(p.values)
                parents, ops = [p.id], [op]
            else:
                values, parents, ops = self.random_values(), [], ["random"]
            offspring.append(self.genome(values, stage, generation, i, parents, ops))
        return offspring

    def select(self, pool: list[Genome]) -> list[Genome]:
        """The next population: the elite, then tournament winners from the rest of the pool."""
        mu, elite_n = self.search.population_size, self.search.elitism
        elite = tools.selBest(pool, elite_n)
        return elite + self.toolbox.select(pool, mu - elite_n)

    def hall_of_fame(self, size: int = 10) -> tools.HallOfFame:
        return tools.HallOfFame(size, similar=lambda a, b: a.key() == b.key())


def fitness_summary(genomes: list[Genome]) -> dict:
    """best / median / worst of the first objective (failed evaluations count as +inf)."""
    vals = sorted(g.fitness.values[0] for g in genomes if g.fitness.valid)
    if not vals:
        return {"best": None, "median": None, "worst": None}
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return {k: (v if math.isfinite(v) else None) for k, v in
            {"best": vals[0], "median": median, "worst": vals[-1]}.items()}
