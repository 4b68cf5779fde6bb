"""Fitness for one generation's genomes: from the ledger, from the fitness cache, or trained.

A genome is trained at most once per stage: a twin (same values) takes the record of the one that
trained, and a resumed run takes every record the ledger already holds. What is left goes to the
executor through a scheduler (``evolm.schedulers``): all at once (``fifo``) or rung by rung
(``halving``, successive halving). With ``search.inherit_weights`` a child born in this generation starts from the adapter of its
best parent evaluated earlier in the stage (``evolm.inherit``); its record says what it took.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file

from evolm.jsonfiles import append_jsonl
from evolm.executor import EvalRequest
from evolm.genome import Genome, evaluation_seed, hyperparameters
from evolm.ledger import StageLedger
from evolm.objectives import fitness_value
from evolm.records import EvaluationRecord
from evolm.registry import SCHEDULERS
from evolm import schedulers as _schedulers  # noqa: F401  (fills SCHEDULERS)


@dataclass
class GenerationEvaluator:
    """Evaluates the genomes of one stage's generations, writing every result to the ledger."""

    run_dir: Path
    stage: int
    stage_name: str
    ledger: StageLedger
    executor: object
    reporter: object
    objectives: list[str]
    training: dict
    run_seed: int
    halving: object
    """``HalvingConfig``: rungs (1: off) and reduction_factor."""
    inherit_weights: bool
    scheduler: str | None = None
    """A registered scheduler; None: halving when ``halving.rungs`` > 1, else fifo."""

    def evaluate(self, gen: int, todo: list[Genome]) -> None:
        groups: dict[str, list[Genome]] = {}
        for g in todo:
            groups.setdefault(g.key(), []).append(g)
        assigned = set()

        def finished(result: dict) -> None:
            key = next(k for k, gs in groups.items() if gs[0].id == result["genome_id"])
            assigned.add(key)
            self.take(gen, groups[key], result)

        scheduler = SCHEDULERS.get(self.scheduler or ("halving" if self.halving.rungs > 1 else "fifo"))(self)
        scheduler.run(gen, scheduler.pool(gen, groups), finished)
        for key, genomes in groups.items():  # cached twins, and records finished before a resume
            if key not in assigned:
                self._assign(gen, genomes, self.ledger.cache[key])

    def take(self, gen: int, genomes: list[Genome], result: dict) -> None:
        """A trained result for ``genomes`` (one genome and its twins): adapter, cache, fitness, record."""
        if result["status"] == "ok":  # the adapter is on disk before the ledger says "done"
            self.ledger.save_adapter(result["genome_id"], result.pop("adapter"))
        result.pop("state", None)
        self.ledger.cache[genomes[0].key()] = result | {"generation": gen}  # as a resumed run reads it
        self.ledger.trained += 1
        self._assign(gen, genomes, result)

    def take_recorded(self, gen: int, genomes: list[Genome], record: EvaluationRecord) -> None:
        """Fitness from a record the ledger already holds (a resumed run replaying its takes)."""
        self._assign(gen, genomes, record.to_json() | {"genome_id": record.source})

    # ----- requests -----------------------------------------------------------------------
    def hp(self, g: Genome) -> dict:
        return hyperparameters(g.values, self.training)

    def request(self, gen: int, g: Genome, rung: int = 0, stop_at: int | None = None) -> EvalRequest:
        request = EvalRequest(g.id, self.hp(g), evaluation_seed(self.run_seed, self.stage, g.id), stop_at)
        if rung > 0:  # train on from the paused state of the rung before
            arrays = self.ledger.load_rung_state(g.id, rung - 1)
            request.resume = {k: v for k, v in arrays.items() if not k.startswith("adapter.")}
        else:
            request.inherit = self._inheritance(gen, g)
        return request

    def _inheritance(self, gen: int, g: Genome) -> dict | None:
        """The adapter of ``g``'s best parent, if ``g`` was bred in this stage (not a carried or initial
        genome) and a parent was trained earlier in this stage; None: ``g`` starts fresh. A parent is
        always evaluated before its child is bred, so its record is in the ledger."""
        if not self.inherit_weights or g.born[0] != self.stage or g.born[1] < 1:
            return None
        parents = [r for r in self.ledger.records.values() if r.genome_id in g.parents and r.ok]
        if not parents:
            return None
        first = self.objectives[0]
        best = min(parents, key=lambda r: (r.objectives.get(first, 0.0), r.genome_id))
        path = self.ledger.adapter_path(best.result_of)
        if not path.exists():
            return None
        return {"adapter": load_file(str(path)), "hp": hyperparameters(best.values, self.training),
                "from": best.genome_id, "adapter_of": best.result_of,
                "privacy": (best.curve or {}).get("privacy")}  # its DP trainings: the child's ε composes them

    # ----- records ------------------------------------------------------------------------
    def _assign(self, gen: int, genomes: list[Genome], result: dict) -> None:
        """Fitness from ``result``; one record per genome per generation, unless the ledger has it."""
        ok = result["status"] == "ok"
        values = tuple(fitness_value(result["objectives"], o) if ok else float("inf") for o in self.objectives)
        for g in genomes:
            g.fitness.values = values
            if (gen, g.id) in self.ledger.records:
                continue
            cached = g.id != result["genome_id"]
            record = EvaluationRecord(
                stage=self.stage, stage_name=self.stage_name, generation=gen, genome_id=g.id, values=g.values,
                parents=g.parents, ops=g.ops, objectives=result["objectives"] if ok else None,
                status=result["status"], error=result.get("error"), traceback=result.get("traceback"),
                curve=result.get("curve"), adapter_params=result.get("adapter_params"),
                steps=0 if cached else result.get("steps"), rung=result.get("rung"),
                halted=result.get("halted", False), inherited=None if cached else result.get("inherited"),
                seconds=result.get("seconds"), train_seconds=result.get("train_seconds"),
                worker=result.get("worker"), node=result.get("node"), device=result.get("device"),
                dtype=result.get("dtype"), gpu_peak_mb=result.get("gpu_peak_mb"), cached=cached,
                result_of=result["genome_id"], seed=evaluation_seed(self.run_seed, self.stage, result["genome_id"]))
            append_jsonl(self.run_dir / "evaluations.jsonl", record.to_json())
            self.ledger.records[(gen, g.id)] = record
            self.reporter.evaluation_done(record)
