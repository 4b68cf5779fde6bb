"""Asynchronous steady-state search (``search.mode: steady_state``): no barrier between generations.

    evaluate the starting population                   generation 0, as the generational search does
    breed one child per worker
    whenever a worker's result is taken:
        the child joins the population, the worst of the mu + 1 leaves        Evolution.replace
        the freed worker gets a child bred from the population as it is now    Evolution.breed
        every offspring_size takes: a line in generations.jsonl and a checkpoint
    until generations x offspring_size children are taken (as many as the generational search
    trains), the step budget would be passed, or a time budget is spent

Results are taken in the order they finish, so with several workers a run depends on timing, as
Ray Tune's PBT and ASHA do; the ledger (evaluations.jsonl) records that order. A checkpoint holds
the children in flight; a resumed run takes the ledger's later records in their recorded order,
breeding exactly what the interrupted run bred, and sends only the unfinished children to the
workers. A run is therefore a function of its seed and the order of its takes: replayed from its
ledger it ends bit-identical, even on another executor. ``ray.num_workers`` children are in flight
whatever the executor: ``--no-ray`` trains them in turn, taking results in birth order, so there a
run is fully reproducible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from evolm.errors import RunDirError
from evolm.evolution import Evolution
from evolm.genome import Genome, canonical_json
from evolm.runstate import genome_from_state, genome_state
from evolm.stage import GenerationStep, StageBudget, StageHooks

TWIN_RETRIES = 20
"""A child equal to a genome already taken or in flight is bred again, up to this many times (then
it trains under its own id: a tiny search space may have nothing new left)."""


@dataclass
class SteadyState:
    evolution: Evolution
    step: GenerationStep
    """Its evaluator trains and records; its hall of fame and generation lines are shared."""
    budget: StageBudget
    hooks: StageHooks
    stage: int
    generations: int
    workers: int
    """Children in flight at once (``ray.num_workers``)."""
    population: list[Genome] = field(default_factory=list)
    flying: dict[str, Genome] = field(default_factory=dict)
    """Children bred and not yet taken, in birth order."""
    taken: int = 0
    born: int = 0
    spent: int = 0
    """Steps the children bred so far will train (their max_steps): the step budget is decided on it."""
    stopped: str | None = None
    known: set = field(default_factory=set)
    window: list[Genome] = field(default_factory=list)
    window_start: float = 0.0

    @property
    def offspring(self) -> int:
        return self.evolution.search.offspring_size

    @property
    def ledger(self):
        return self.step.evaluator.ledger

    def run(self, population: list[Genome], first_gen: int = 0, saved: dict | None = None) -> list[Genome]:
        """The stage's final population; ``saved`` is a checkpoint's steady-state part (a resume)."""
        if first_gen == 0:
            for g in population:  # same genomes, new stage: their fitness must be measured again
                del g.fitness.values
            self.step(0, population, population)
            self.hooks.checkpoint(0, population, self.state())
            first_gen = 1
        self.population = population
        self.restore(first_gen - 1, saved or {})
        self.window_start = time.perf_counter()
        if self.taken == 0:  # the phase starts: one child per worker
            self.stopped = self.stopped or self.budget.exhausted(1)
            if self.generations > 0 and not self.stopped:
                self.step.reporter.generation_start(self.stage, 1, self.offspring)
            self.fill()
        else:  # the checkpoint was written after a take and before the child that take let breed
            self.breed()
        self.replay(first_gen)
        self.fill()  # a resume with more workers than the run had
        evaluator = self.step.evaluator
        requests = [evaluator.request(self.generation(), g) for g in self.flying.values()]
        evaluator.executor.map(requests, self.on_result)
        if self.window:  # the last generation, cut short by a budget
            self.end_generation()
        if self.stopped:
            self.hooks.message(self.stopped)
        return self.population

    # ----- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps besides the population: the children in flight and the counts."""
        return {"taken": self.taken, "born": self.born, "spent": self.spent, "stopped": self.stopped,
                "in_flight": [genome_state(g) for g in self.flying.values()]}

    def restore(self, gen: int, saved: dict) -> None:
        """Counts and children in flight after generation ``gen`` (0: the phase starts)."""
        self.taken, self.born = saved.get("taken", 0), saved.get("born", 0)
        self.spent, self.stopped = saved.get("spent", 0), saved.get("stopped")
        fitness = self.evolution.fitness_class
        self.flying = {d["id"]: genome_from_state(d, fitness) for d in saved.get("in_flight", [])}
        self.known = {canonical_json(r.values) for (g, _), r in self.ledger.records.items() if g <= gen}
        self.known |= {g.key() for g in self.flying.values()}

    def generation(self) -> int:
        """The generation of the next take: takes are counted in generations of offspring_size."""
        return self.taken // self.offspring + 1

    # ----- breeding and taking ---------------------------------------------------------------
    def fill(self) -> None:
        while len(self.flying) < self.workers and self.breed() is not None:
            pass

    def breed(self) -> Genome | None:
        """The next child, in flight from now; None once the births or a budget are spent."""
        limit, steps_of = self.budget.limit, self.budget.steps_of
        if self.stopped or self.born >= self.generations * self.offspring:
            return None
        if limit is not None and self.spent >= limit:
            self.stopped = f"step budget spent ({self.spent} of {limit} steps planned) after {self.born} children"
            return None
        for _ in range(TWIN_RETRIES):
            child = self.evolution.breed(self.population, self.stage, self.born + 1)
            if child.key() not in self.known:
                break
        self.born += 1
        self.spent += steps_of(child)
        self.known.add(child.key())
        self.flying[child.id] = child
        return child

    def on_result(self, result: dict) -> list:
        """A worker's result: taken, and the freed worker's next request (if any child is left)."""
        child = self.flying.pop(result["genome_id"])
        gen = self.generation()
        self.step.evaluator.take(gen, [child], result)
        self.accept(child)
        nxt = self.breed()
        return [] if nxt is None else [self.step.evaluator.request(self.generation(), nxt)]

    def replay(self, first_gen: int) -> None:
        """The ledger's takes after the checkpoint, in their recorded order, as they happened."""
        later = [r for (g, _), r in self.ledger.records.items() if g >= first_gen]
        for record in later:
            child = self.flying.pop(record.genome_id, None)
            if child is None or record.generation != self.generation():
                raise RunDirError(f"{self.ledger.run_dir / 'evaluations.jsonl'}: stage {self.stage} record of "
                                  f"{record.genome_id} (generation {record.generation}) is not the take the "
                                  f"steady-state search expects next; the ledger does not belong to this run's "
                                  f"checkpoints: start a new run")
            self.step.evaluator.take_recorded(record.generation, [child], record)
            self.accept(child)
            self.breed()

    def accept(self, child: Genome) -> None:
        self.taken += 1
        self.population = self.evolution.replace(self.population, child)
        self.step.hall_of_fame.update([child])
        self.window.append(child)
        if len(self.window) == self.offspring:
            self.end_generation()

    def end_generation(self) -> None:
        gen = (self.taken - 1) // self.offspring + 1
        now = time.perf_counter()
        self.step.line(gen, self.window, self.population, now - self.window_start)
        self.window, self.window_start = [], now
        why = self.budget.exhausted(gen + 1)
        if why and not self.stopped:
            self.stopped = why
        self.hooks.checkpoint(gen, self.population, self.state())
        if self.born < self.generations * self.offspring and not self.stopped:
            self.step.reporter.generation_start(self.stage, gen + 1, self.offspring)

