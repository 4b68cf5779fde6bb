"""The DEAP side of a run: typed variation, tournament selection with elitism, hall of fame.

Everything is built per run (a fitness class made with ``type``, not DEAP's global ``creator``),
and every random choice comes from the run's own ``random.Random``, so two runs in one process
never disturb each other and a run is reproducible from its seed alone.

One generation, as DEAP's (mu + lambda):
    offspring  = vary(population)            lambda children: crossover | mutation | immigrant
    evaluate(genomes without a valid fitness)
    population = select(population + offspring, mu)   elitism + tournaments

With several objectives (``n_objectives > 1``) the same loop is NSGA-II: parents come from binary
tournaments on (non-domination rank, crowding distance) and survivors from ``tools.selNSGA2``.
``rank_by_rule`` then orders the hall of fame / Pareto front by a winner rule (``WINNER_RULES``).
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Sequence

from deap import base, tools

from evolm.registry import WINNER_RULES
from evolm.genome import Genome, make_id

if TYPE_CHECKING:
    from evolm.config import SearchConfig


def sel_tournament(pool: list[Genome], k: int, tournsize: int, rng: random.Random) -> list[Genome]:
    """k winners of tournaments of ``tournsize`` genomes drawn with replacement."""
    return [max((rng.choice(pool) for _ in range(tournsize)), key=lambda g: g.fitness) for _ in range(k)]


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` (every objective minimised): no worse in any, better in one. As DEAP's
    ``Fitness.dominates`` on weights -1 (a NaN compares as neither better nor worse)."""
    return not any(x > y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (the first front), in order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-domination rank of each point (0: the first front, 1: the front without it, ...)."""
    ranks, left, r = [0] * len(points), list(range(len(points))), 0
    while left:
        front = set(pareto_front([points[i] for i in left]))
        for j in front:
            ranks[left[j]] = r
        left = [i for n, i in enumerate(left) if n not in front]
        r += 1
    return ranks


def pareto_ranks(genomes: list[Genome]) -> list[int]:
    """Non-domination rank of each genome by its fitness (0: the first front); as DEAP's
    ``sortNondominated`` ranks them."""
    return nondominated_ranks([[-w for w in g.fitness.wvalues] for g in genomes])


def crowding_distances(genomes: list[Genome], ranks: list[int]) -> list[float]:
    """NSGA-II crowding distance of each genome within its front: per objective, the normalised gap
    between its two neighbours (the extremes get inf); objectives with no finite spread are skipped."""
    dist = [0.0] * len(genomes)
    for r in set(ranks):
        members = [i for i, rank in enumerate(ranks) if rank == r]
        for m in range(len(genomes[members[0]].fitness.values)):
            order = sorted(members, key=lambda i: genomes[i].fitness.values[m])
            lo, hi = genomes[order[0]].fitness.values[m], genomes[order[-1]].fitness.values[m]
            dist[order[0]] = dist[order[-1]] = math.inf
            span = hi - lo
            if not math.isfinite(span) or span == 0:
                continue
            for prev, i, nxt in zip(order, order[1:-1], order[2:]):
                dist[i] += (genomes[nxt].fitness.values[m] - genomes[prev].fitness.values[m]) / span
    return dist


def sel_tournament_crowded(pool: list[Genome], k: int, rng: random.Random) -> list[Genome]:
    """k winners of binary tournaments: lower non-domination rank wins, then larger crowding
    distance, then the first drawn (NSGA-II's crowded-comparison operator, on the run's ``rng``)."""
    ranks = pareto_ranks(pool)
    crowd = crowding_distances(pool, ranks)
    winners = []
    for _ in range(k):
        i, j = rng.randrange(len(pool)), rng.randrange(len(pool))
        better_j = (ranks[j], -crowd[j]) < (ranks[i], -crowd[i])
        winners.append(pool[j] if better_j else pool[i])
    return winners


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


def diversity(genomes: list[Genome], space: dict) -> float | None:
    """Mean over pairs of distinct genomes of the mean gene distance (each in [0, 1]): 0 when every
    genome is the same, near 1/2 for random ones. None for fewer than two genomes."""
    pool = list({g.id: g for g in genomes}.values())
    if len(pool) < 2 or not space:
        return None
    total, pairs = 0.0, 0
    for i, a in enumerate(pool):
        for b in pool[i + 1:]:
            total += sum(gene.distance(a.values[n], b.values[n]) for n, gene in space.items()) / len(space)
            pairs += 1
    return total / pairs


class Evolution:
    """Variation and selection for one run; ``rng`` state is part of the run's checkpoint."""

    def __init__(self, space: dict[str, Any], search: SearchConfig, run_seed: int, n_objectives: int = 1):
        if n_objectives < 1:
            raise ValueError(f"n_objectives must be >= 1. Current value: {n_objectives}")
        self.space, self.search, self.run_seed, self.n_objectives = space, search, run_seed, n_objectives
        self.rng = random.Random(run_seed)
        # Minimise every objective; the class lives only as long as this run.
        self.fitness_class = type("Fitness", (base.Fitness,), {"weights": (-1.0,) * n_objectives})
        self.toolbox = base.Toolbox()
        self.toolbox.register("mate", cx_uniform, space=space, rng=self.rng)
        self.toolbox.register("mutate", mut_typed, space=space, rng=self.rng)
        if n_objectives == 1:
            self.toolbox.register("select", sel_tournament, tournsize=search.tournament_size, rng=self.rng)
        else:  # NSGA-II parents: binary tournaments on (rank, crowding distance)
            self.toolbox.register("select", sel_tournament_crowded, rng=self.rng)

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

    def immigrants(self, population: list[Genome]) -> int:
        """Offspring that are random immigrants this generation: ``immigrant_share`` of them (at least
        one when the share is above 0), half of them when the population's diversity has collapsed
        below ``min_diversity``."""
        s = self.search
        n = round(s.immigrant_share * s.offspring_size)
        if s.immigrant_share > 0 and s.offspring_size > 1:  # at least one, never all: variation goes on
            n = min(max(1, n), s.offspring_size - 1)
        spread = diversity(population, self.space)
        if spread is not None and spread < s.min_diversity:
            n = max(n, s.offspring_size // 2)
        return min(n, s.offspring_size)

    def immigrant(self, population: list[Genome]) -> tuple[dict, list[str], list[str]]:
        """(values, parents, ops) of a random immigrant. With ``inherit_weights`` its parent is the
        population's best genome (first objective): random genes, that genome's trained adapter to start
        from, as PBT's resample explores. A fresh adapter would be judged against children that start
        trained, and with successive halving it would almost never pass the first rung."""
        ranked = [g for g in population if g.fitness.valid] if self.search.inherit_weights else []
        best = min(ranked, key=lambda g: (g.fitness.values[0], g.id)) if ranked else None
        return self.random_values(), [best.id] if best else [], ["random"]

    def vary(self, population: list[Genome], stage: int, generation: int) -> list[Genome]:
        """lambda offspring: the generation's random immigrants first, then each by crossover,
        mutation, or (when the two probabilities sum below 1) as a random immigrant too."""
        s, offspring = self.search, []
        n_immigrants = self.immigrants(population)
        for i in range(s.offspring_size):
            roll = self.rng.random()
            if i < n_immigrants:
                values, parents, ops = self.immigrant(population)
            elif roll < s.crossover_prob:
                p1, p2 = self.toolbox.select(population, 2)
                values, parents, ops = self.toolbox.mate(p1.values, p2.values), [p1.id, p2.id], [f"cx_uniform({p1.id}, {p2.id})"]
            elif roll < s.crossover_prob + s.mutation_prob:
                (p,) = self.toolbox.select(population, 1)
                values, op = self.toolbox.mutate(p.values)
                parents, ops = [p.id], [op]
            else:
                values, parents, ops = self.immigrant(population)
            offspring.append(self.genome(values, stage, generation, i, parents, ops))
        return offspring

    def breed(self, population: list[Genome], stage: int, birth: int) -> Genome:
        """One child for the steady-state search, its ``birth``-th of the stage (1, 2, ...): a random
        immigrant with probability ``immigrant_share`` (one half while diversity is below
        ``min_diversity``), else by crossover or mutation as in ``vary``. Born in batch
        ``(birth - 1) // offspring_size + 1`` at index ``(birth - 1) % offspring_size``: one id per birth."""
        s = self.search
        lam = s.offspring_size
        spread = diversity(population, self.space)
        immigrant = s.immigrant_share if spread is None or spread >= s.min_diversity else max(0.5, s.immigrant_share)
        roll = self.rng.random()
        if self.rng.random() < immigrant or roll >= s.crossover_prob + s.mutation_prob:
            values, parents, ops = self.immigrant(population)
        elif roll < s.crossover_prob:
            p1, p2 = self.toolbox.select(population, 2)
            values, parents, ops = self.toolbox.mate(p1.values, p2.values), [p1.id, p2.id], [f"cx_uniform({p1.id}, {p2.id})"]
        else:
            (p,) = self.toolbox.select(population, 1)
            values, op = self.toolbox.mutate(p.values)
            parents, ops = [p.id], [op]
        return self.genome(values, stage, (birth - 1) // lam + 1, (birth - 1) % lam, parents, ops)

    def replace(self, population: list[Genome], child: Genome) -> list[Genome]:
        """Steady-state survival: the child joins and the worst of the ``mu + 1`` leaves (on a tie the
        one that came last, so an equal child does not displace its elders). Several objectives:
        NSGA-II's survivors of the ``mu + 1``."""
        pool = population + [child]
        if self.n_objectives > 1:
            return tools.selNSGA2(pool, self.search.population_size)
        return sorted(pool, key=lambda g: g.fitness, reverse=True)[: self.search.population_size]

    def select(self, pool: list[Genome]) -> list[Genome]:
        """The next population: the elite, then tournament winners from the rest of the pool.

        Several objectives: NSGA-II's survivors (whole fronts, the last one cut by crowding distance).
        """
        mu, elite_n = self.search.population_size, self.search.elitism
        if self.n_objectives > 1:
            return tools.selNSGA2(pool, mu)
        elite = tools.selBest(pool, elite_n)
        return elite + self.toolbox.select(pool, mu - elite_n)

    def hall_of_fame(self, size: int = 10) -> tools.HallOfFame:
        return tools.HallOfFame(size, similar=lambda a, b: a.key() == b.key())

    def pareto_archive(self) -> tools.ParetoFront:
        """Every non-dominated genome seen (the multi-objective hall of fame); ``update`` it like one."""
        return tools.ParetoFront(similar=lambda a, b: a.key() == b.key())


def fitness_summary(genomes: list[Genome]) -> dict:
    """best / median / worst of the first objective (failed evaluations count as +inf)."""
    vals = sorted(g.fitness.values[0] for g in genomes if g.fitness.valid)
    if not vals:
        return {"best": None, "median": None, "worst": None}
    mid = len(vals) // 2
    median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
    return {k: (v if math.isfinite(v) else None) for k, v in
            {"best": vals[0], "median": median, "worst": vals[-1]}.items()}


# ----- the winner of a stage ------------------------------------------------------------------
# A winner rule orders genomes with finite objectives, best first:
#     rule(genomes, objectives, settings) -> list[Genome]
# ``settings`` is ``search.winner`` plus ``base_retention`` (the stage base's own retention loss).


def rank_by_rule(genomes: list[Genome], objectives: list[str], rule: dict) -> list[Genome]:
    """``genomes`` with finite objectives, best first by the winner rule ``rule["rule"]`` (failed
    genomes are left out); ``objectives`` names the fitness values in order.
    ``rank_by_rule(...)[:top_k]`` are the winners to merge with several adapters."""
    name = rule.get("rule")
    if name not in WINNER_RULES:
        raise ValueError(f"winner rule '{name}' is unknown; use one of {', '.join(WINNER_RULES.names())}")
    ok = [g for g in genomes if g.fitness.valid and all(math.isfinite(v) for v in g.fitness.values)]
    return WINNER_RULES.get(name)(ok, objectives, rule)


@WINNER_RULES.register("min_first")
def min_first(genomes: list[Genome], objectives: list[str], rule: dict) -> list[Genome]:
    """Lowest first objective (ties: the next objectives, then list order)."""
    return sorted(genomes, key=lambda g: tuple(g.fitness.values))


@WINNER_RULES.register("min_val_loss_within_retention")
def min_val_loss_within_retention(genomes: list[Genome], objectives: list[str], rule: dict) -> list[Genome]:
    """The genomes whose retention_loss is at most (1 + epsilon) · base_retention, by val_loss; then
    the others, by retention_loss. So the winner is the best learner that forgets at most epsilon,
    or else the one that forgets least."""
    epsilon = float(rule.get("epsilon", 0.05))
    base = _base_retention("min_val_loss_within_retention", objectives, rule, "epsilon", epsilon)
    return _learners_within(genomes, objectives, (1.0 + epsilon) * base)


@WINNER_RULES.register("min_val_loss_within_forgetting")
def min_val_loss_within_forgetting(genomes: list[Genome], objectives: list[str], rule: dict) -> list[Genome]:
    """The genomes whose retention_loss exceeds the stage base's by at most ``max_forgetting`` nats,
    by val_loss; then the others, by retention_loss. So each stage forgets at most max_forgetting
    (on validation splits) when any candidate allows it, and as little as it can otherwise."""
    budget = float(rule.get("max_forgetting", 0.05))
    base = _base_retention("min_val_loss_within_forgetting", objectives, rule, "max_forgetting", budget)
    return _learners_within(genomes, objectives, base + budget)


def _base_retention(name: str, objectives: list[str], rule: dict, knob: str, value: float) -> float:
    """The stage base's retention loss, once the rule's needs are checked."""
    missing = [o for o in ("val_loss", "retention_loss") if o not in objectives]
    if missing:
        raise ValueError(f"winner rule '{name}' needs the objectives val_loss and retention_loss; missing: "
                         f"{', '.join(missing)} (objectives: {objectives})")
    base_retention = rule.get("base_retention")
    if base_retention is None or not math.isfinite(base_retention) or value < 0:
        raise ValueError(f"winner rule '{name}' needs a finite base_retention and {knob} >= 0. "
                         f"Current values: base_retention={base_retention}, {knob}={value}")
    return base_retention


def _learners_within(genomes: list[Genome], objectives: list[str], limit: float) -> list[Genome]:
    """Genomes with retention_loss <= limit by (val_loss, retention_loss), then the rest by
    (retention_loss, val_loss)."""
    v, r = objectives.index("val_loss"), objectives.index("retention_loss")
    within = [g for g in genomes if g.fitness.values[r] <= limit]
    beyond = [g for g in genomes if g.fitness.values[r] > limit]
    return (sorted(within, key=lambda g: (g.fitness.values[v], g.fitness.values[r]))
            + sorted(beyond, key=lambda g: (g.fitness.values[r], g.fitness.values[v])))
