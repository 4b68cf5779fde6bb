"""How a generation's training budget is spent: a scheduler runs the evaluations a generation needs.

    fifo      every genome trains its whole ``max_steps``, all handed to the executor at once
    halving   successive halving (``search.halving``), rung by rung:
                rung r of R: every live genome trains until round(max_steps / factor**(R-1-r)) steps;
                the best ceil(n / factor) (Pareto rank, then first objective) resume from their paused
                state (adapter, optimizer moments, random streams), so promotion wastes no step;
                the others stop with the objectives measured at their rung (``halted`` in their record)

A rung's result is on disk (``rungs.jsonl`` and ``adapters/stage-k/rungs/``) before the next rung
starts, so a run killed mid-generation resumes the same decisions without retraining.
A scheduler is built per generation from the ``GenerationEvaluator``; ``pool`` picks the genomes it
must train, ``run`` trains them and calls ``finished(result)`` once per genome.
"""
from __future__ import annotations

import math

from evolm.jsonfiles import append_jsonl
from evolm.evolution import pareto_ranks
from evolm.genome import Genome
from evolm.registry import SCHEDULERS


def rung_steps(max_steps: int, rung: int, rungs: int, factor: float) -> int:
    """Steps a genome has trained at the end of ``rung`` (the last rung: all of them)."""
    return max(1, min(max_steps, round(max_steps / factor ** (rungs - 1 - rung))))


def survivors(n: int, factor: float) -> int:
    return max(1, math.ceil(n / factor))


@SCHEDULERS.register("fifo")
class AllAtOnce:
    def __init__(self, evaluator):
        self.evaluator = evaluator

    def pool(self, gen: int, groups: dict[str, list[Genome]]) -> list[Genome]:
        return [gs[0] for key, gs in groups.items() if key not in self.evaluator.ledger.cache]

    def run(self, gen: int, pool: list[Genome], finished) -> None:
        self.evaluator.executor.map([self.evaluator.request(gen, g) for g in pool], finished)


@SCHEDULERS.register("halving")
class SuccessiveHalving:
    def __init__(self, evaluator):
        self.evaluator = evaluator

    def pool(self, gen: int, groups: dict[str, list[Genome]]) -> list[Genome]:
        # A genome that began its rungs before a resume is still part of this generation's halving.
        ledger = self.evaluator.ledger
        return [gs[0] for key, gs in groups.items() if key not in ledger.cache or (gen, gs[0].id, 0) in ledger.rungs]

    def run(self, gen: int, pool: list[Genome], finished) -> None:
        ev = self.evaluator
        rungs, factor, ledger = ev.halving.rungs, ev.halving.reduction_factor, ev.ledger
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
                    stop = None if last else rung_steps(ev.hp(g).max_steps, rung, rungs, factor)
                    requests.append(ev.request(gen, g, rung, stop))

            def on_result(result: dict, rung=rung, last=last) -> None:
                self.fold_earlier(gen, rung, result)
                if last:
                    finished(result | {"rung": rung, "halted": False})
                else:
                    results[result["genome_id"]] = self._save_rung(gen, rung, result)

            ev.executor.map(requests, on_result)
            if last:
                return
            ok = [g for g in alive if results[g.id]["status"] == "ok"]
            for g in ok:  # rank this rung's genomes by what they measured at the rung
                g.fitness.values = tuple(results[g.id]["objectives"].get(o, 0.0) for o in ev.objectives)
            ranks = dict(zip((g.id for g in ok), pareto_ranks(ok))) if ok else {}
            ok.sort(key=lambda g: (ranks[g.id], g.fitness.values[0], g.id))
            # a genome this rung already trained to its max_steps is finished, not a contender
            contenders = [g for g in ok if not results[g.id]["complete"]]
            promoted = {g.id for g in contenders[: survivors(len(alive), factor)]}
            for g in alive:
                if g.id not in promoted and (gen, g.id) not in ledger.records:
                    finished(self._rung_result(gen, rung, results[g.id]))
            alive = [g for g in alive if g.id in promoted]

    def fold_earlier(self, gen: int, rung: int, result: dict) -> None:
        """What the earlier rungs did belongs to this evaluation too: their inheritance, seconds, steps."""
        if rung == 0:
            return
        before = self.evaluator.ledger.rungs[(gen, result["genome_id"], rung - 1)]
        result["inherited"] = before.get("inherited")
        result["steps"] = result.get("steps") or before.get("steps")  # a failure reports none
        for k in ("seconds", "train_seconds"):
            result[k] = (result.get(k) or 0.0) + (before.get(k) or 0.0)

    def _save_rung(self, gen: int, rung: int, result: dict, extra: dict | None = None) -> dict:
        """A rung's adapter and paused state to disk, then its record (and ``extra``) to ``rungs.jsonl``."""
        state = result.pop("state", None)
        record = {k: result.get(k) for k in ("genome_id", "status", "objectives", "error", "traceback", "curve",
                                             "adapter_params", "steps", "inherited", "seconds", "train_seconds",
                                             "worker", "node", "device", "dtype")}
        record.update(stage=self.evaluator.stage, generation=gen, rung=rung, complete=state is None, **(extra or {}))
        if result["status"] == "ok":
            arrays = {f"adapter.{k}": v for k, v in result["adapter"].items()} | (state or {})
            self.evaluator.ledger.save_rung_state(result["genome_id"], rung, arrays)
        append_jsonl(self.evaluator.run_dir / "rungs.jsonl", record)
        self.evaluator.ledger.rungs[(gen, result["genome_id"], rung)] = record
        return record

    def _rung_result(self, gen: int, rung: int, record: dict) -> dict:
        """A genome that stops at ``rung``: its rung record as a finished result, adapter included."""
        result = dict(record) | {"rung": rung, "halted": not record["complete"], "adapter": None}
        if record["status"] == "ok":
            arrays = self.evaluator.ledger.load_rung_state(record["genome_id"], rung)
            result["adapter"] = {k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")}
        return result

