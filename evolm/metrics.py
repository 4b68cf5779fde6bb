"""Continual-learning metrics read from the loss matrix: pure functions, no files, no torch.

L[i][j] is the test loss of the model after stage i (row 0: the base, before any stage; rows
1..n: after stages 1..n) on domain j (column). ``learned_at[j]`` is the row at which column j was
learned: 0 for the base's own pretraining domain, k for stage k, ``None`` for a stage the run has
not reached yet (such columns are left out of forgetting and transfer). Lower loss is better;
every transfer metric is signed so that **positive = helps**, negative = hurts:

    average final loss  mean_j L[n][j]
    forgetting_j        L[n][j] − min_{i ≥ learned_at[j]} L[i][j]          (>= 0; 0 = nothing lost)
    BWT                 mean_j (L[learned_at[j]][j] − L[n][j])             over learned columns but the last stage's
    FWT_j               L[0][j] − L[learned_at[j] − 1][j]                  for stage columns (learned_at >= 1)

FWT_j compares the model just before stage j (zero-shot on stage j) with the base on stage j:
positive when the earlier stages already lowered the loss on stage j. The first stage's FWT is 0
by definition, so the mean FWT runs over stages 2..n.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def as_matrix(L: Matrix) -> np.ndarray:
    """``L`` as a float (n + 1, m) array; refuses ragged or empty matrices."""
    try:
        arr = np.asarray(L, dtype=float)
    except ValueError:
        raise ValueError("loss matrix rows have different lengths; every row needs one loss per column") from None
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"loss matrix must be a non-empty 2-D table (rows: models, columns: domains); "
                         f"got shape {arr.shape}")
    return arr


def average_final_loss(L: Matrix) -> float:
    """mean_j L[n][j]: the final model's loss, averaged over every column."""
    return float(as_matrix(L)[-1].mean())


def perplexity(loss: float) -> float:
    """exp(loss) (``inf`` where it overflows)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def forgetting(L: Matrix, learned_at: Sequence[int | None]) -> list[float | None]:
    """Per column: L[n][j] − min_{i ≥ learned_at[j]} L[i][j]; ``None`` for unlearned columns."""
    arr = as_matrix(L)
    _check_learned_at(arr, learned_at)
    return [None if k is None else float(arr[-1, j] - arr[k:, j].min()) for j, k in enumerate(learned_at)]


def backward_transfer(L: Matrix, learned_at: Sequence[int | None]) -> float | None:
    """BWT = mean over learned columns j, except those of the last stage, of L[learned_at j][j] − L[n][j].

    The base domain (learned_at 0) counts. Negative = forgetting. ``None`` when no column qualifies
    (e.g. a run of one stage without a base domain).
    """
    arr = as_matrix(L)
    _check_learned_at(arr, learned_at)
    n = arr.shape[0] - 1
    terms = [arr[k, j] - arr[n, j] for j, k in enumerate(learned_at) if k is not None and k < n]
    return float(np.mean(terms)) if terms else None


def forward_transfer(L: Matrix, learned_at: Sequence[int | None]) -> list[float | None]:
    """Per column: L[0][j] − L[learned_at[j] − 1][j] for stage columns (learned_at >= 1), else ``None``.

    The zero-shot loss of the model just before stage j versus the base's loss on stage j;
    positive = the earlier stages helped.
    """
    arr = as_matrix(L)
    _check_learned_at(arr, learned_at)
    return [None if not k else float(arr[0, j] - arr[k - 1, j]) for j, k in enumerate(learned_at)]


def infer_learned_at(columns: Sequence[str], rows: Sequence[str]) -> list[int | None]:
    """``learned_at`` from names, as ``loss_matrix.json`` writes them (rows: ``base`` + stage names).

    A column named like row i > 0 was learned at row i. Other columns before the first stage
    column are base domains (0); the others are stages not reached yet (``None``). With no stage
    row yet every column is taken as a base domain; write ``learned_at`` into the JSON to be exact.
    """
    row_of = {name: i for i, name in enumerate(rows) if i > 0}
    first_stage = next((j for j, c in enumerate(columns) if c in row_of), len(columns))
    return [row_of[c] if c in row_of else (0 if j < first_stage else None) for j, c in enumerate(columns)]


def summarize(matrix_json: dict, learned_at: Sequence[int | None] | None = None) -> dict:
    """Everything for ``metrics.json``, from the content of ``loss_matrix.json``.

    ``matrix_json``: ``{"columns": [...], "rows": [...], "matrix": [[...], ...]}`` and optionally
    ``"learned_at"``; an explicit ``learned_at`` argument wins, else it is inferred from the names.
    Mean forgetting runs over stage columns learned before the last row (the last stage forgets
    nothing by definition); mean FWT over stage columns learned at row >= 2. Perplexities are
    exp(loss); ``average_final_perplexity`` is exp(average final loss), the geometric mean.
    """
    arr = as_matrix(matrix_json["matrix"])
    columns = list(matrix_json.get("columns") or [f"col{j}" for j in range(arr.shape[1])])
    rows = list(matrix_json.get("rows") or ["base"] + [f"stage{i}" for i in range(1, arr.shape[0])])
    if len(columns) != arr.shape[1] or len(rows) != arr.shape[0]:
        raise ValueError(f"loss matrix is {arr.shape[0]}x{arr.shape[1]} but names {len(rows)} rows and "
                         f"{len(columns)} columns")
    if learned_at is None:
        learned_at = matrix_json.get("learned_at") or infer_learned_at(columns, rows)
    learned_at = list(learned_at)
    n = arr.shape[0] - 1
    forget = forgetting(arr, learned_at)
    fwt = forward_transfer(arr, learned_at)
    forget_stages = [f for f, k in zip(forget, learned_at) if k is not None and 1 <= k < n]
    fwt_stages = [f for f, k in zip(fwt, learned_at) if k is not None and k >= 2]
    avg = average_final_loss(arr)
    return {
        "columns": columns,
        "rows": rows,
        "learned_at": learned_at,
        "final_loss": dict(zip(columns, map(float, arr[-1]))),
        "final_perplexity": {c: perplexity(v) for c, v in zip(columns, arr[-1])},
        "average_final_loss": avg,
        "average_final_perplexity": perplexity(avg),
        "forgetting": dict(zip(columns, forget)),
        "mean_forgetting": _mean(forget_stages),
        # BWT as docs/design.md defines it: over the stages (the base's own domain is in "forgetting").
        "backward_transfer": backward_transfer(arr, [k or None for k in learned_at]),
        "forward_transfer": dict(zip(columns, fwt)),
        "mean_forward_transfer": _mean(fwt_stages),
    }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _check_learned_at(arr: np.ndarray, learned_at: Sequence[int | None]) -> None:
    n, m = arr.shape[0] - 1, arr.shape[1]
    if len(learned_at) != m:
        raise ValueError(f"learned_at has {len(learned_at)} entries for {m} columns; give one per column")
    bad = [k for k in learned_at if k is not None and not (isinstance(k, (int, np.integer)) and 0 <= k <= n)]
    if bad:
        raise ValueError(f"learned_at entries must be row indices 0..{n} or None; got {bad}")


def accuracy_summary(accuracy: Matrix, learned_at: Sequence[int | None], columns: Sequence[str]) -> dict:
    """A classifier's test accuracies (rows: base, after each stage): the final average, and each
    domain's forgetting, its best accuracy since it was learned minus its final one (higher is worse)."""
    arr = as_matrix(accuracy)
    n = arr.shape[0] - 1
    forget = forgetting(-arr, learned_at)  # forgetting of -accuracy: best since learned minus final
    stages = [f for f, k in zip(forget, learned_at) if k is not None and 1 <= k < n]
    return {"final_accuracy": dict(zip(columns, map(float, arr[-1]))), "average_final_accuracy": float(arr[-1].mean()),
            "accuracy_forgetting": dict(zip(columns, forget)), "mean_accuracy_forgetting": _mean(stages)}
