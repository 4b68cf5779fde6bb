"""Fitness for one generation's genomes: from the ledger, from the fitness cache, or trained.

A genome is trained at most once per stage: a twin (same values) takes the record of the one that
trained, and a resumed run takes every record the ledger already holds. What is left goes to the
executor, either in one batch or, with successive halving (``search.halving``), rung by rung:

    rung r of R: every live genome trains until round(max_steps / factor**(R-1-r)) steps
    keep the best ceil(n / factor) (Pareto rank, then first objective); they resume from their
    paused state (adapter, optimizer moments, random streams), so promotion wastes no step;
    the others stop with the objectives measured at their rung (``halted`` in their record).

A rung's result is on disk (``rungs.jsonl`` and ``adapters/stage-k/rungs/``) before the next
rung starts, so a run killed mid-generation resumes the same decisions without retraining.
With ``search.inherit_weights`` a child born in this generation starts from the adapter of its
best parent evaluated earlier in the stage (``evolm.inherit``); its record says what it took.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file

from evolm.checkpoint import append_jsonl
from evolm.evolution import pareto_ranks
from evolm.executor import EvalRequest
from evolm.genome import Genome, evaluation_seed, hyperparameters
from evolm.ledger import StageLedger


def rung_steps(max_steps: int, rung: int, rungs: int, factor: float) -> int:
    """Steps a genome has trained at the end of ``rung`` (the last rung: all of them)."""
    return max(1, min(max_steps, round(max_steps / factor ** (rungs - 1 - rung))))


def survivors(n: int, factor: float) -> int:
    return max(1, math.ceil(n / factor))


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

    def evaluate(self, gen: int, todo: list[Genome]) -> None:
        groups: dict[str, list[Genome]] = {}
        for g in todo:
            groups.setdefault(g.key(), []).append(g)
        ledger = self.ledger
        assigned = set()

        def finished(result: dict) -> None:
            key = next(k for k, gs in groups.items() if gs[0].id == result["genome_id"])
            if result["status"] == "ok":  # the adapter is on disk before the ledger says "done"
                ledger.save_adapter(result["genome_id"], result.pop("adapter"))
            result.pop("state", None)
            ledger.cache[key] = result
            ledger.trained += 1
            assigned.add(key)
            self._assign(gen, groups[key], result)

        if self.halving.rungs > 1:
            # A genome that began its rungs before a resume is still part of this generation's halving.
            pool = [gs[0] for key, gs in groups.items()
                    if key not in ledger.cache or (gen, gs[0].id, 0) in ledger.rungs]
            self._halve(gen, pool, finished)
        else:
            new = [gs[0] for key, gs in groups.items() if key not in ledger.cache]
            self.executor.map([self._request(gen, g) for g in new], finished)
        for key, genomes in groups.items():  # cached twins, and records finished before a resume
            if key not in assigned:
                self._assign(gen, genomes, ledger.cache[key])

    # ----- successive halving -------------------------------------------------------------
    def _halve(self, gen: int, pool: list[Genome], finished) -> None:
        rungs, factor, ledger = self.halving.rungs, self.halving.reduction_factor, self.ledger
        alive = pool
        for rung in range(rungs):
            last = rung == rungs - 1
            results, requests = {}, []
            for g in alive:
                if last and (gen, g.id) in ledger.records:
                    continue  # finished before a resume
                done = None if last else ledger.rungs.get((gen, g.id, rung))
                if done is not None:
                    results[g.id] = done
                else:
                    stop = None if last else rung_steps(self._hp(g)["max_steps"], rung, rungs, factor)
                    requests.append(self._request(gen, g, rung, stop))

            def on_result(result: dict, rung=rung, last=last) -> None:
                if rung > 0:  # what the earlier rungs did belongs to this evaluation too
                    before = ledger.rungs[(gen, result["genome_id"], rung - 1)]
                    result["inherited"] = before.get("inherited")
                    result["steps"] = result.get("steps") or before.get("steps")  # a failure reports none
                    for k in ("seconds", "train_seconds"):
                        result[k] = (result.get(k) or 0.0) + (before.get(k) or 0.0)
                if last:
                    finished(result | {"rung": rung, "halted": False})
                else:
                    results[result["genome_id"]] = self._save_rung(gen, rung, result)

            self.executor.map(requests, on_result)
            if last:
                return
            ok = [g for g in alive if results[g.id]["status"] == "ok"]
            for g in ok:  # rank this rung's genomes by what they measured at the rung
                g.fitness.values = tuple(results[g.id]["objectives"].get(o, 0.0) for o in self.objectives)
            ranks = dict(zip((g.id for g in ok), pareto_ranks(ok))) if ok else {}
            ok.sort(key=lambda g: (ranks[g.id], g.fitness.values[0], g.id))
            # a genome this rung already trained to its max_steps is finished, not a contender
            contenders = [g for g in ok if not results[g.id]["complete"]]
            promoted = {g.id for g in contenders[: survivors(len(alive), factor)]}
            for g in alive:
                if g.id not in promoted and (gen, g.id) not in ledger.records:
                    finished(self._rung_result(gen, rung, results[g.id]))
            alive = [g for g in alive if g.id in promoted]

    def _save_rung(self, gen: int, rung: int, result: dict) -> dict:
        """A rung's adapter and paused state to disk, then its record to ``rungs.jsonl``."""
        state = result.pop("state", None)
        record = {k: result.get(k) for k in ("genome_id", "status", "objectives", "error", "traceback", "curve",
                                             "adapter_params", "steps", "inherited", "seconds", "train_seconds",
                                             "worker", "node")}
        record.update(stage=self.stage, generation=gen, rung=rung, complete=state is None)
        if result["status"] == "ok":
            arrays = {f"adapter.{k}": v for k, v in result["adapter"].items()} | (state or {})
            self.ledger.save_rung_state(result["genome_id"], rung, arrays)
        append_jsonl(self.run_dir / "rungs.jsonl", record)
        self.ledger.rungs[(gen, result["genome_id"], rung)] = record
        return record

    def _rung_result(self, gen: int, rung: int, record: dict) -> dict:
        """A genome that stops at ``rung``: its rung record as a finished result, adapter included."""
        result = dict(record) | {"rung": rung, "halted": not record["complete"], "adapter": None}
        if record["status"] == "ok":
            arrays = self.ledger.load_rung_state(record["genome_id"], rung)
            result["adapter"] = {k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")}
        return result

    # ----- requests -----------------------------------------------------------------------
    def _hp(self, g: Genome) -> dict:
        return hyperparameters(g.values, self.training)

    def _request(self, gen: int, g: Genome, rung: int = 0, stop_at: int | None = None) -> EvalRequest:
        request = EvalRequest(g.id, self._hp(g), evaluation_seed(self.run_seed, self.stage, g.id), stop_at)
        if rung > 0:  # train on from the paused state of the rung before
            arrays = self.ledger.load_rung_state(g.id, rung - 1)
            request.resume = {k: v for k, v in arrays.items() if not k.startswith("adapter.")}
        else:
            request.inherit = self._inheritance(gen, g)
        return request

    def _inheritance(self, gen: int, g: Genome) -> dict | None:
        """The adapter of ``g``'s best parent, if ``g`` was born in this generation and a parent was
        trained earlier in this stage; None: ``g`` starts fresh."""
        if not self.inherit_weights or g.born != (self.stage, gen):
            return None
        parents = [r for (rg, rid), r in self.ledger.records.items()
                   if rid in g.parents and rg < gen and r["status"] == "ok"]
        if not parents:
            return None
        first = self.objectives[0]
        best = min(parents, key=lambda r: (r["objectives"].get(first, 0.0), r["genome_id"]))
        path = self.ledger.adapter_path(best["result_of"])
        if not path.exists():
            return None
        return {"adapter": load_file(str(path)), "hp": hyperparameters(best["values"], self.training),
                "from": best["genome_id"], "adapter_of": best["result_of"]}

    # ----- records ------------------------------------------------------------------------
    def _assign(self, gen: int, genomes: list[Genome], result: dict) -> None:
        """Fitness from ``result``; one record per genome per generation, unless the ledger has it."""
        ok = result["status"] == "ok"
        values = tuple((result["objectives"].get(o, 0.0) if o == "retention_loss" else result["objectives"][o])
                       if ok else float("inf") for o in self.objectives)
        for g in genomes:
            g.fitness.values = values
            if (gen, g.id) in self.ledger.records:
                continue
            cached = g.id != result["genome_id"]
            record = {"stage": self.stage, "stage_name": self.stage_name, "generation": gen,
                      "genome_id": g.id, "values": g.values, "parents": g.parents, "ops": g.ops,
                      "objectives": result["objectives"] if ok else None, "status": result["status"],
                      "error": result.get("error"), "traceback": result.get("traceback"),
                      "curve": result.get("curve"), "adapter_params": result.get("adapter_params"),
                      "steps": 0 if cached else result.get("steps"), "rung": result.get("rung"),
                      "halted": result.get("halted", False), "inherited": None if cached else result.get("inherited"),
                      "seconds": result.get("seconds"), "train_seconds": result.get("train_seconds"),
                      "worker": result.get("worker"), "node": result.get("node"), "cached": cached,
                      "result_of": result["genome_id"],
                      "seed": evaluation_seed(self.run_seed, self.stage, result["genome_id"])}
            append_jsonl(self.run_dir / "evaluations.jsonl", record)
            self.ledger.records[(gen, g.id)] = record
            self.reporter.evaluation_done(record)
