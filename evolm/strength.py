"""Merge strength: how far the next base moves from the stage base towards a merged model.

    model(s) = base + s · (merged − base)        s in merge.strengths, for every merge candidate

As WiSE-FT interpolates between a pre-trained and a fine-tuned model, a strength below 1 gives up
part of the new domain's gain for retention of the earlier ones, at no training cost. Every
(candidate, strength) point is scored on validation splits only: this stage's ``val_loss`` and each
earlier domain's loss, hence ``retention_loss`` and ``forgetting`` (a gain on one earlier domain
does not offset a loss on another). The winner rule picks the point that becomes the next base,
seeing ``retention_loss`` as the stage base's plus the point's forgetting; the Pareto set of
(val_loss, that) is marked. The whole curve goes into the stage's summary.
See docs/design.md, "Merge strength".
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch

from evolm.errors import EvolmError
from evolm.evolution import pareto_front, rank_by_rule
from evolm.genome import Genome


@dataclass
class MergePoint:
    method: str
    genomes: list[str]
    """Ids of the genomes merged, the lead first."""
    strength: float
    val_loss: float
    retention_loss: float | None
    """None when the stage has no earlier domain to retain."""
    forgetting: float | None = None
    """Nats lost on the earlier domains against the stage base, a domain's gain not offsetting
    another's loss: Σ_j w_j · max(0, L_j − L_j(base)), w_j the domain's share of the retention blocks."""
    domain_losses: dict | None = None
    """Validation loss on each earlier domain."""
    pareto: bool = False
    chosen: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def changed_parameters(base_model, merged_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (base weight, merged − base)} for every parameter the merge changed."""
    base = dict(base_model.named_parameters())
    out = {}
    with torch.no_grad():
        for name, p in merged_model.named_parameters():
            delta = p.detach().float() - base[name].detach().float()
            if torch.any(delta != 0):
                out[name] = (base[name].detach().float(), delta)
    return out


def set_strength(model, changed: dict, strength: float) -> None:
    """``model``'s changed parameters set to base + strength · delta (in place)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (w, delta) in changed.items():
            params[name].copy_((w + strength * delta).to(params[name].dtype))


def score_merges(base_model, candidates: list, strengths: list[float], measure, objectives: list[str], rule: dict,
                 fitness_class, say, on_point=lambda point: None) -> tuple[list[MergePoint], object]:
    """Every (candidate, strength) point scored by ``measure(model) -> {objective: value}`` and handed
    to ``on_point`` as it is scored. ``candidates``: ``evolm.winners.MergeCandidate`` (method, genomes,
    model). Returns the points (Pareto set and choice marked) and the chosen candidate, its model set
    to the chosen strength."""
    points, owner, changes = [], [], []
    for n, c in enumerate(candidates):
        changes.append(changed_parameters(base_model, c.model))
        for s in strengths:
            set_strength(c.model, changes[n], s)
            values = measure(c.model)
            points.append(MergePoint(c.method, [g.id for g in c.genomes], float(s), values["val_loss"],
                                     values.get("retention_loss"), values.get("forgetting"),
                                     values.get("domain_losses")))
            owner.append(n)
            on_point(points[-1])
    best = _choose(points, objectives, rule, fitness_class)
    for i in _pareto_indices(points, rule):
        points[i].pareto = True
    points[best].chosen = True
    chosen, candidate = points[best], candidates[owner[best]]
    set_strength(candidate.model, changes[owner[best]], chosen.strength)
    if len(points) > 1:
        say(f"merge: {chosen.method} of {'+'.join(chosen.genomes)} at strength {chosen.strength:g} chosen among "
            f"{len(points)} points (val_loss {chosen.val_loss:.4f}"
            + (f", retention_loss {chosen.retention_loss:.4f})" if chosen.retention_loss is not None else ")"))
    return points, candidate


def forgetting_of(losses: dict[str, float], before: dict[str, float], weights: dict[str, int]) -> dict:
    """retention_loss (the block-weighted mean of ``losses``, as one evaluation of the retention
    blocks gives it), forgetting against ``before`` with no credit for gains, and the losses."""
    if not losses:
        return {"retention_loss": None}
    total = sum(weights.values())
    return {"retention_loss": sum(weights[n] * v for n, v in losses.items()) / total,
            "forgetting": sum(weights[n] * max(0.0, v - before[n]) for n, v in losses.items()) / total,
            "domain_losses": losses}


def _retention_for_rule(p: MergePoint, rule: dict) -> float:
    """What the winner rule sees as a point's retention_loss: the stage base's plus the point's
    forgetting, so a gain on one earlier domain never pays for a loss on another."""
    if p.forgetting is not None and rule.get("base_retention") is not None:
        return rule["base_retention"] + p.forgetting
    return p.retention_loss or 0.0


def _choose(points: list[MergePoint], objectives: list[str], rule: dict, fitness_class) -> int:
    """The point ranked first by the winner rule (an objective a merge does not measure counts as 0)."""
    genomes = []
    for i, p in enumerate(points):
        g = Genome(values={}, id=str(i), fitness=fitness_class())
        known = {"val_loss": p.val_loss, "retention_loss": _retention_for_rule(p, rule)}
        g.fitness.values = tuple(known.get(o, 0.0) for o in objectives)
        genomes.append(g)
    ranked = rank_by_rule(genomes, objectives, rule)
    if not ranked:
        raise EvolmError("merge: every candidate merge gave a non-finite validation loss; the stage's "
                         "evaluations are in the ledger: change merge.method or merge.strengths and resume")
    return int(ranked[0].id)


def _pareto_indices(points: list[MergePoint], rule: dict) -> list[int]:
    finite = [i for i, p in enumerate(points) if math.isfinite(p.val_loss)]
    if all(points[i].retention_loss is None for i in finite):
        return [min(finite, key=lambda i: points[i].val_loss)] if finite else []
    values = [(points[i].val_loss, _retention_for_rule(points[i], rule)) for i in finite]
    return [finite[j] for j in pareto_front(values)]


def interpolate(base_model, merged_model, strength: float):
    """A copy of ``merged_model`` at ``strength`` (a plain model: base + strength · (merged − base))."""
    model = copy.deepcopy(merged_model)
    set_strength(model, changed_parameters(base_model, merged_model), strength)
    return model
