"""One stage's search as a plain loop, in the style of DEAP's ``eaMuPlusLambda``.

    evolve_stage(population, evolution, evaluate, budget, hooks):
        if the stage starts: evaluate(population)          the carried population, on the new stage
        for gen in 1..G:
            if budget.exhausted(gen): stop               steps, stage seconds or run seconds spent
            offspring  = budget.affordable(evolution.vary(population))   the budget's share of them
            evaluate(offspring)                           only genomes without a valid fitness
            population = evolution.select(population + offspring)
            hooks.checkpoint(gen, population)

``evaluate`` fills fitness and the hall of fame (``GenerationStep``); the conductor
(``evolm.continual``) supplies the checkpoint. A resumed stage enters at ``first_gen``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from evolm.jsonfiles import append_jsonl
from evolm.evolution import Evolution, diversity, fitness_summary
from evolm.genome import Genome
from evolm.ledger import StageLedger
from evolm.records import GenerationRecord


@dataclass
class StageBudget:
    """``search.step_budget``: no generation starts once the stage's evaluations trained ``limit`` steps;
    ``search.time_budget`` / ``run_time_budget``: none starts once the stage's (the run's) generations
    took that many seconds. Decided on earlier generations' records only (steps in the ledger, seconds
    in generations.jsonl), so a resumed run decides the same."""

    limit: int | None
    ledger: StageLedger
    steps_of: Callable[[Genome], int] = lambda g: 0
    """The steps a genome will train (its max_steps)."""
    seconds: float | None = None
    run_seconds: float | None = None
    seconds_spent: Callable[[int], tuple[float, float]] = lambda gen: (0.0, 0.0)
    """(this stage's, the whole run's) recorded generation seconds before generation ``gen``."""

    def affordable(self, gen: int, offspring: list[Genome]) -> list[Genome]:
        """The offspring the budget lets train, in order, while the steps spent before each are below
        the limit (a twin served from the cache costs nothing): the stage ends within one
        evaluation's steps of its budget instead of finishing the whole last generation."""
        if self.limit is None:
            return offspring
        spent, kept = self.ledger.steps_before(gen), []
        for g in offspring:
            if spent >= self.limit:
                break
            kept.append(g)
            earlier = self.ledger.cache.get(g.key())  # trained in an earlier generation: served from the cache
            if earlier is None or earlier.get("generation", gen) >= gen:  # the same decision after a resume
                spent += self.steps_of(g)
        return kept

    def exhausted(self, gen: int) -> str | None:
        """Why generation ``gen`` may not start, or None."""
        spent = self.ledger.steps_before(gen)  # a resume may already hold part of generation gen
        if self.limit is not None and spent >= self.limit:
            return f"step budget spent ({spent} of {self.limit} steps) after generation {gen - 1}"
        if self.seconds is not None or self.run_seconds is not None:
            stage_s, run_s = self.seconds_spent(gen)
            if self.seconds is not None and stage_s >= self.seconds:
                return f"time budget spent ({stage_s:.0f} of {self.seconds:.0f} s) after generation {gen - 1}"
            if self.run_seconds is not None and run_s >= self.run_seconds:
                return f"the run's time budget spent ({run_s:.0f} of {self.run_seconds:.0f} s) after generation {gen - 1}"
        return None


@dataclass
class StageHooks:
    checkpoint: Callable[..., None]
    """After every generation: (generation, population[, steady-state search's own state])."""
    message: Callable[[str], None]


def evolve_stage(population: list[Genome], evolution: Evolution, evaluate: Callable, budget: StageBudget,
                 hooks: StageHooks, stage: int, generations: int, first_gen: int = 0) -> list[Genome]:
    """The stage's final population; see the module docstring."""
    if first_gen == 0:
        for g in population:  # same genomes, new stage: their fitness must be measured again
            del g.fitness.values
        evaluate(0, population, population)
        hooks.checkpoint(0, population)
    for gen in range(max(1, first_gen), generations + 1):
        why = budget.exhausted(gen)
        if why:
            hooks.message(why)
            break
        offspring = budget.affordable(gen, evolution.vary(population, stage, gen))
        if not offspring:
            break
        evaluate(gen, offspring, population + offspring)
        population = evolution.select(population + offspring)
        hooks.checkpoint(gen, population)
    return population


@dataclass
class GenerationStep:
    """evaluate(gen, new, everyone): fitness for the new genomes, the hall of fame updated with
    everyone, one line in ``generations.jsonl``."""

    run_dir: Path
    stage: int
    stage_name: str
    evaluator: object
    """``evolm.evaluation.GenerationEvaluator``."""
    hall_of_fame: object
    reporter: object
    space: dict | None = None
    """The search space, for the generation's diversity."""

    def __call__(self, gen: int, new: list[Genome], everyone: list[Genome]) -> None:
        start = time.perf_counter()
        # Tournaments pick with replacement, so one genome may stand in a population several times.
        todo = list({g.id: g for g in new if not g.fitness.valid}.values())
        self.reporter.generation_start(self.stage, gen, len(todo))
        self.evaluator.evaluate(gen, todo)
        self.hall_of_fame.update(everyone)
        self.line(gen, todo, everyone, time.perf_counter() - start)

    def line(self, gen: int, evaluated: list[Genome], everyone: list[Genome], seconds: float) -> None:
        """The generation's line in ``generations.jsonl``, and the reporter told."""
        record = GenerationRecord(stage=self.stage, stage_name=self.stage_name, generation=gen,
                                  **fitness_summary(everyone), evaluations=len(evaluated),
                                  failed=sum(1 for g in evaluated if not np.isfinite(g.fitness.values[0])),
                                  seconds=seconds, population=[g.id for g in everyone],
                                  diversity=diversity(everyone, self.space or {}))
        append_jsonl(self.run_dir / "generations.jsonl", record.to_json())
        self.reporter.generation_end(record)
