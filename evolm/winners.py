"""A stage's winners become the next base.

    ranked  = rank_by_rule(hall of fame, winner rule)     failed genomes left out
    chosen  = ranked[:merge.top_k]                         their adapters, from the ledger
    merged  = merge(base, chosen) by merge.method          ``auto``: one merge per registered strategy
    base'   = the best (merge, strength) point             ``evolm.strength``: scored on validation
                                                           splits, chosen by the winner rule
The merge math is in ``evolm.merge``; see docs/design.md, "Merging, precisely".
"""
from __future__ import annotations

from dataclasses import dataclass

from evolm.config import MergeConfig
from evolm.errors import EvolmError
from evolm.evolution import rank_by_rule
from evolm.genome import Genome, hyperparameters
from evolm.ledger import StageLedger
from evolm.merge import merge_winners
from evolm.registry import MERGE_STRATEGIES


@dataclass
class Winners:
    ranked: list[Genome]
    """Every genome of the hall of fame with finite objectives, best first."""
    count: int
    """The first ``count`` are merged."""
    weights: list[float] | None

    @property
    def genomes(self) -> list[Genome]:
        return self.ranked[: self.count]


def source_of(g: Genome, ledger: StageLedger) -> str:
    """The genome whose training made ``g``'s adapter (a cached twin points to its source)."""
    return ledger.cache[g.key()]["genome_id"]


def choose_winners(hof, objectives: list[str], rule: dict, merge: MergeConfig, ledger: StageLedger,
                   stage_name: str, say) -> Winners:
    ranked = rank_by_rule(list(hof), objectives, rule)
    if not ranked:
        errors = [r.get("error") for r in ledger.cache.values() if r.get("error")]
        raise EvolmError(f"stage '{stage_name}': every evaluation failed (first error: {errors[:1]}); "
                         f"see evaluations.jsonl")
    count = min(merge.top_k, len(ranked))
    weights = merge.weights
    if weights is not None and count < len(weights):  # fewer finished genomes than top_k
        weights = [w / sum(weights[:count]) for w in weights[:count]]
        say(f"stage '{stage_name}': only {count} genomes to merge; weights {weights}")
    return Winners(ranked, count, weights)


@dataclass
class MergeCandidate:
    method: str
    genomes: list[Genome]
    """The genomes merged, the lead first."""
    model: object


def merge_candidates(base_model, winners: Winners, ledger: StageLedger, training: dict, merge: MergeConfig,
                     seed: int) -> list[MergeCandidate]:
    """The winners merged by ``merge.method`` (by every registered strategy with ``auto``), then the
    ``merge.candidates − 1`` other genomes with the lowest first objective (the strongest learners,
    which a lower strength may bring within the forgetting budget), each alone (``best``)."""
    def adapter(g: Genome):
        return hyperparameters(g.values, training), ledger.load_adapter(source_of(g, ledger))

    adapters = [adapter(g) for g in winners.genomes]
    methods = list(MERGE_STRATEGIES.names()) if merge.method == "auto" else [merge.method]
    candidates = []
    for m in methods:
        try:
            model = merge_winners(base_model, adapters, m, winners.weights, merge.density, seed)
        except ValueError as exc:  # the run is resumable: the stage's evaluations are in the ledger
            raise EvolmError(f"merge.method {m}: {exc}; choose another merge.method and resume the run") from None
        candidates.append(MergeCandidate(m, winners.genomes, model))
    others = sorted((g for g in winners.ranked if g not in winners.genomes
                     and ledger.adapter_path(source_of(g, ledger)).exists()), key=lambda g: g.fitness.values[0])
    for g in others[: merge.candidates - 1]:
        candidates.append(MergeCandidate("best", [g], merge_winners(base_model, [adapter(g)], "best")))
    return candidates
