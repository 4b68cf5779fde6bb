"""Gene importance: how much of the validation-loss variance each gene explains, per stage.

Like Optuna's parameter importances, without a random forest: the evaluations are grouped by one
gene's value (numeric genes in quantile bins, categorical and bool genes by value, layer masks by
pattern) and the gene's score is the between-group share of the fitness variance, corrected for
the number of groups (epsilon squared), so a gene with many rare values does not win by chance.
Scores are normalised to sum to 1.

With weight inheritance an evaluation's genes do not say everything about how its adapter was made
(a child starts from its parent's trained adapter), so importances are also given separately for
fresh evaluations (trained from scratch) and inherited ones.
"""
from __future__ import annotations

import json

import numpy as np

from evolm.records import EvaluationRecord, read_records, trained_evaluations

NUMERIC_TYPES = ("int", "uniform", "log_uniform")
MIN_EVALUATIONS = 4


def gene_kind(spec: dict | None, values: list) -> str:
    """``numeric``, ``mask`` (a layer mask: one bool per block) or ``categorical``: from the gene's
    declared type, else from its values (numbers with more than 4 distinct values are numeric).
    The one definition for the figures (``evolm.plots``) and the importances here."""
    declared = spec.get("type") if isinstance(spec, dict) else None
    if declared:
        return "numeric" if declared in NUMERIC_TYPES else "mask" if declared == "layer_mask" else "categorical"
    if values and all(isinstance(v, list) and v and all(isinstance(b, bool) for b in v) for v in values):
        return "mask"
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return "numeric" if numbers and len({*values}) > 4 else "categorical"


def group_labels(values: list, kind: str, bins: int = 4) -> list[str]:
    """A group label per value: its quantile bin for numeric genes, its canonical text otherwise."""
    if kind != "numeric":
        return [json.dumps(v, sort_keys=True) for v in values]
    x = np.asarray(values, dtype=float)
    inner_edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1]))
    return [f"bin{int(i)}" for i in np.searchsorted(inner_edges, x, side="right")]


def explained_share(labels: list[str], fitness: list[float]) -> float:
    """Epsilon squared of a one-way grouping: (SS_between - (k-1) MS_within) / SS_total, >= 0."""
    y = np.asarray(fitness, dtype=float)
    n, groups = len(y), {}
    for label, v in zip(labels, y):
        groups.setdefault(label, []).append(v)
    k = len(groups)
    ss_total = float(((y - y.mean()) ** 2).sum())
    if k < 2 or n <= k or ss_total <= 0:
        return 0.0
    ss_between = sum(len(g) * (np.mean(g) - y.mean()) ** 2 for g in groups.values())
    ms_within = (ss_total - ss_between) / (n - k)
    return max(0.0, float((ss_between - (k - 1) * ms_within) / ss_total))


def gene_importance(rows: list[dict], fitness: list[float], space: dict | None = None,
                    bins: int = 4) -> dict[str, float]:
    """Each gene's normalised share of the variance of ``fitness`` over the genomes ``rows``
    (dicts of gene values); all zeros when no gene explains anything. Largest first."""
    if len(rows) != len(fitness):
        raise ValueError(f"{len(rows)} genomes but {len(fitness)} fitness values")
    genes = sorted({g for r in rows for g in r})
    scores = {}
    for gene in genes:
        pairs = [(r[gene], f) for r, f in zip(rows, fitness) if gene in r]
        values = [v for v, _ in pairs]
        labels = group_labels(values, gene_kind((space or {}).get(gene), values), bins)
        scores[gene] = explained_share(labels, [f for _, f in pairs])
    total = sum(scores.values())
    shares = {g: (s / total if total > 0 else 0.0) for g, s in scores.items()}
    return dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])))


STARTS = ("all", "fresh", "inherited")


def stage_importances(evaluations: list[EvaluationRecord], space: dict | None = None,
                      start: str = "all") -> dict[int, dict[str, float]]:
    """Per stage, gene importances over its ok evaluations that really ran
    (``evolm.records.trained_evaluations``); stages with fewer than ``MIN_EVALUATIONS`` are left out.
    ``start``: all evaluations, only ``fresh`` ones (a new adapter) or only ``inherited`` ones (started
    from a parent's adapter). ``evaluations``: records, or rows of evaluations.jsonl."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, not {start!r}")
    by_stage: dict[int, tuple[list, list]] = {}
    for e in trained_evaluations(read_records(EvaluationRecord, evaluations)):
        if start != "all" and (e.inherited is not None) != (start == "inherited"):
            continue
        if e.val_loss is not None and isinstance(e.values, dict) and isinstance(e.stage, int):
            rows, fit = by_stage.setdefault(e.stage, ([], []))
            rows.append(e.values)
            fit.append(e.val_loss)
    return {k: gene_importance(rows, fit, space) for k, (rows, fit) in sorted(by_stage.items())
            if len(rows) >= MIN_EVALUATIONS}
