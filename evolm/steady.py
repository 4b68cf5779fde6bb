"""Asynchronous steady-state search (``search.mode: steady_state``): no barrier between generations.

    evaluate the starting population                   generation 0, as the generational search does
    breed one child per worker
    whenever a worker's result is taken:
        the child joins the population, the worst of the mu + 1 leaves        Evolution.replace
        the freed worker gets a child bred from the population as it is now    Evolution.breed
        every offspring_size takes: a line in generations.jsonl and a checkpoint
    until generations x offspring_size children are taken (as many as the generational search
    trains), the step budget would be passed, or a time budget is spent

With ``search.halving`` the promotion is asynchronous, as ASHA's: a child first trains to its rung-0
share of max_steps; when a rung's result arrives, the child goes on (its worker resumes it from the
paused state) if its first objective is within the best 1/reduction_factor of every result recorded
at that rung in this stage so far, else it is taken as it stands (``halted``); no rung waits for
another child. Each rung result is on disk (``rungs.jsonl``, with the number of takes before it)
before its decision, so a resume replays promotions and takes in their recorded order.

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

import math
import time
from dataclasses import dataclass, field

from evolm.errors import RunDirError
from evolm.evolution import Evolution
from evolm.genome import Genome, canonical_json
from evolm.objectives import fitness_value
from evolm.runstate import genome_from_state, genome_state
from evolm.schedulers import SuccessiveHalving, rung_steps
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
    """Steps planned so far: generation 0's trained steps, then each child's max_steps (with halving:
    its rung-0 share, plus each promotion's); the step budget is decided on it, so a resume decides
    the same."""
    stopped: str | None = None
    rung_of: dict[str, int] = field(default_factory=dict)
    """The rung each child in flight is training (0 without halving)."""
    rung_values: dict[int, list[float]] = field(default_factory=dict)
    """First objective of every ok result recorded at each rung of this stage, in arrival order."""
    known: set = field(default_factory=set)
    window: list[Genome] = field(default_factory=list)
    window_start: float = 0.0

    @property
    def offspring(self) -> int:
        return self.evolution.search.offspring_size

    @property
    def ledger(self):
        return self.step.evaluator.ledger

    @property
    def rungs(self) -> int:
        return self.step.evaluator.halving.rungs

    @property
    def halving(self) -> SuccessiveHalving:
        return SuccessiveHalving(self.step.evaluator)

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
            self.spent = self.ledger.steps_before(1)  # the step budget counts generation 0's training too
            self.stopped = self.stopped or self.budget.exhausted(1)
            if self.generations > 0 and not self.stopped:
                self.step.reporter.generation_start(self.stage, 1, self.offspring)
            self.fill()
        else:  # the checkpoint was written after a take and before the child that take let breed
            self.breed()
        self.replay(first_gen)
        self.fill()  # a resume with more workers than the run had
        requests = [self.request(g) for g in self.flying.values()]
        self.step.evaluator.executor.map(requests, self.on_result)
        if self.window:  # the last generation, cut short by a budget
            self.end_generation()
        if self.stopped:
            self.hooks.message(self.stopped)
        return self.population

    # ----- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps besides the population: the children in flight and the counts."""
        return {"taken": self.taken, "born": self.born, "spent": self.spent, "stopped": self.stopped,
                "in_flight": [genome_state(g) | {"rung": self.rung_of[g.id]} for g in self.flying.values()]}

    def restore(self, gen: int, saved: dict) -> None:
        """Counts and children in flight after generation ``gen`` (0: the phase starts)."""
        self.taken, self.born = saved.get("taken", 0), saved.get("born", 0)
        self.spent, self.stopped = saved.get("spent", 0), saved.get("stopped")
        fitness = self.evolution.fitness_class
        self.flying = {d["id"]: genome_from_state(d, fitness) for d in saved.get("in_flight", [])}
        self.rung_of = {d["id"]: int(d.get("rung", 0)) for d in saved.get("in_flight", [])}
        self.known = {canonical_json(r.values) for (g, _), r in self.ledger.records.items() if g <= gen}
        self.known |= {g.key() for g in self.flying.values()}
        self.rung_values = {}
        for r in self.rung_events(before=self.taken):
            self.note_rung(r)

    def generation(self) -> int:
        """The generation of the next take: takes are counted in generations of offspring_size."""
        return self.taken // self.offspring + 1

    def rung_events(self, before: int | None = None, since: int | None = None) -> list[dict]:
        """This stage's steady-state rung records (they carry ``takes_before``), in arrival order: those
        that arrived after fewer than ``before`` takes, or after ``since`` takes or more."""
        return [r for r in self.ledger.rungs.values() if isinstance(r.get("takes_before"), int)
                and (before is None or r["takes_before"] < before) and (since is None or r["takes_before"] >= since)]

    def note_rung(self, record: dict) -> None:
        if record["status"] == "ok":
            first = self.step.evaluator.objectives[0]
            self.rung_values.setdefault(record["rung"], []).append(fitness_value(record["objectives"], first))

    def promoted(self, record: dict) -> bool:
        """ASHA's rule at arrival: an ok, incomplete result at most the (1 - 1/factor) quantile of the
        rung's recorded values (its own included) goes on to the next rung."""
        if record["status"] != "ok" or record["complete"]:
            return False
        values = sorted(self.rung_values.get(record["rung"], []))
        factor = self.step.evaluator.halving.reduction_factor
        cutoff = values[min(len(values) - 1, max(0, math.ceil(len(values) / factor) - 1))]
        return fitness_value(record["objectives"], self.step.evaluator.objectives[0]) <= cutoff

    def stop_at(self, child: Genome, rung: int) -> int | None:
        """Where the child's training pauses at ``rung`` (None: the last rung, its max_steps)."""
        if rung == self.rungs - 1:
            return None
        return rung_steps(self.step.evaluator.hp(child).max_steps, rung, self.rungs, self.step.evaluator.halving.reduction_factor)

    def planned(self, child: Genome, rung: int) -> int:
        """Steps the child trains at ``rung``."""
        end = self.stop_at(child, rung) or self.budget.steps_of(child)
        return end - (0 if rung == 0 else self.stop_at(child, rung - 1))

    def request(self, child: Genome):
        rung = self.rung_of[child.id]
        return self.step.evaluator.request(self.generation(), child, rung, self.stop_at(child, rung))

    # ----- breeding and taking ---------------------------------------------------------------
    def fill(self) -> None:
        while len(self.flying) < self.workers and self.breed() is not None:
            pass

    def breed(self) -> Genome | None:
        """The next child, in flight from now; None once the births or a budget are spent."""
        limit = self.budget.limit
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
        self.known.add(child.key())
        self.flying[child.id], self.rung_of[child.id] = child, 0
        self.spent += self.planned(child, 0)
        return child

    def on_result(self, result: dict) -> list:
        """A worker's result: a rung's (promoted: the same worker goes on with the child) or the
        child's last; a child taken frees the worker for the next child (if any is left)."""
        child = self.flying[result["genome_id"]]
        rung, halving = self.rung_of[child.id], self.halving
        halving.fold_earlier(child.born[1], rung, result)
        if rung < self.rungs - 1:
            record = halving._save_rung(child.born[1], rung, result, {"takes_before": self.taken})
            self.note_rung(record)
            if self.promoted(record):
                self.rung_of[child.id] = rung + 1
                self.spent += self.planned(child, rung + 1)
                return [self.request(child)]
            result = halving._rung_result(child.born[1], rung, record)
        else:
            result |= {"rung": rung, "halted": False}
        del self.flying[child.id], self.rung_of[child.id]
        self.step.evaluator.take(self.generation(), [child], result)
        self.accept(child)
        nxt = self.breed()
        return [] if nxt is None else [self.request(nxt)]

    def replay(self, first_gen: int) -> None:
        """The ledger's rung results and takes after the checkpoint, in their recorded order: a rung
        result that arrived after t takes comes before take t + 1."""
        rung_events = self.rung_events(since=self.taken)
        takes = [r for (g, _), r in self.ledger.records.items() if g >= first_gen]
        for record in takes + [None]:
            while rung_events and rung_events[0]["takes_before"] == self.taken:
                self.replay_rung(rung_events.pop(0))
            if record is None:
                break
            child = self.flying.pop(record.genome_id, None)
            if child is None or record.generation != self.generation():
                raise self.not_this_run(f"record of {record.genome_id} (generation {record.generation})",
                                        "evaluations.jsonl")
            del self.rung_of[child.id]
            self.step.evaluator.take_recorded(record.generation, [child], record)
            self.accept(child)
            self.breed()

    def replay_rung(self, record: dict) -> None:
        """A recorded rung result: promoted again as it was, or left for the take that follows it."""
        gid = record["genome_id"]
        if self.rung_of.get(gid) != record["rung"]:
            raise self.not_this_run(f"rung {record['rung']} result of {gid}", "rungs.jsonl")
        self.note_rung(record)
        if self.promoted(record):
            self.rung_of[gid] = record["rung"] + 1
            self.spent += self.planned(self.flying[gid], record["rung"] + 1)

    def not_this_run(self, what: str, name: str) -> RunDirError:
        return RunDirError(f"{self.ledger.run_dir / name}: stage {self.stage} {what} is not what the steady-state "
                           f"search expects next; the file does not belong to this run's checkpoints: start a new run")

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

