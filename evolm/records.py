"""The records a run writes and reads back: one typed class per kind, one place that knows the keys.

    EvaluationRecord   a line of evaluations.jsonl   one genome, one generation: what it measured
    GenerationRecord   a line of generations.jsonl   fitness statistics of one generation
    StageSummary       an entry of summary.json      one stage's winner, merge and test losses

The run writes them (``to_json``); status, plots, the report, lineage, importance and tracking
read them (``from_json``), which accepts records of older versions and damaged files: a missing
key, or a value of the wrong type, takes its default; an unknown key is ignored. See docs/design.md,
"Files of a run directory".
"""
from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any


class _Record:
    @classmethod
    def from_json(cls, d: dict):
        """A missing key, or a value of the wrong type (a damaged or hand-edited file), takes the default."""
        hints = _hints(cls)
        return cls(**{k: v for k, v in d.items() if k in hints and _fits(v, hints[k])})

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationRecord(_Record):
    """One genome in one generation; ``cached`` records reuse the result of ``result_of``."""

    stage: int = 0
    stage_name: str = ""
    generation: int = 0
    genome_id: str = ""
    values: dict = field(default_factory=dict)
    parents: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    objectives: dict | None = None
    """Objective name -> value (internal direction: lower is better); None when it failed."""
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None
    curve: dict | None = None
    adapter_params: int | None = None
    steps: int | None = None
    """Steps this evaluation trained (0 for a cached twin; inherited training not counted)."""
    rung: int | None = None
    halted: bool = False
    """Stopped by successive halving before its max_steps."""
    inherited: dict | None = None
    seconds: float | None = None
    train_seconds: float | None = None
    worker: str | None = None
    node: str | None = None
    device: str | None = None
    """Where it trained (``cpu``, ``cuda:0``) and the base's dtype there."""
    dtype: str | None = None
    gpu_peak_mb: float | None = None
    """Peak GPU memory allocated during the evaluation (a GPU trial only)."""
    cached: bool = False
    result_of: str | None = None
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def objective(self, name: str) -> float | None:
        """A finite objective value of an ok evaluation, else None."""
        if not self.ok:
            return None
        v = (self.objectives or {}).get(name)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    @property
    def val_loss(self) -> float | None:
        return self.objective("val_loss")

    @property
    def source(self) -> str:
        """The genome whose training produced this record's result."""
        return self.result_of or self.genome_id


@dataclass
class GenerationRecord(_Record):
    stage: int = 0
    stage_name: str = ""
    generation: int = 0
    best: float | None = None
    median: float | None = None
    worst: float | None = None
    """best / median / worst first objective of the population (None: not finite)."""
    evaluations: int = 0
    failed: int = 0
    seconds: float = 0.0
    population: list = field(default_factory=list)
    diversity: float | None = None
    """Mean gene distance between the genomes considered (``evolution.diversity``): 0 = all the same."""


@dataclass
class StageSummary(_Record):
    stage: int = 0
    name: str = ""
    start_loss: float | None = None
    end_loss: float | None = None
    """Test loss on this stage's domain before and after its merge."""
    winner: dict = field(default_factory=dict)
    """The winning genome (id, values, parents, ops, born) and ``result_of``."""
    winner_objectives: dict = field(default_factory=dict)
    winner_val_loss: float | None = None
    merge_method: str = ""
    merge_strength: float = 1.0
    """How far the next base moved from the stage base towards the merge (``evolm.strength``)."""
    merge_curve: list = field(default_factory=list)
    """Every (method, strength) point scored: val_loss, retention_loss, pareto, chosen."""
    merged: list = field(default_factory=list)
    evaluations: int = 0
    """Evaluations trained in this stage (cached twins and records from before a resume not counted twice)."""
    steps: int = 0
    hall_of_fame: list = field(default_factory=list)
    adapters: list = field(default_factory=list)
    """The winner's and the best runners-up's adapters in PEFT's format (paths in the run directory)."""
    seconds: float = 0.0

    def __post_init__(self):
        if not isinstance(self.winner, dict):  # a damaged summary.json
            self.winner = {}

    @property
    def winner_id(self) -> str | None:
        return self.winner.get("id") if isinstance(self.winner, dict) else None


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, hint) -> bool:
    """``value`` is of type ``hint`` (``int``, ``str | None``, ``dict``...); booleans are not numbers,
    floats are finite, integers fit in 64 bits."""
    if typing.get_args(hint) and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        if isinstance(value, float):
            return hint is float and math.isfinite(value)
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    return isinstance(value, typing.get_origin(hint) or hint)


def trained_evaluations(records: list[EvaluationRecord]) -> list[EvaluationRecord]:
    """The one definition of "an evaluation" for every count: a fine-tune that really ran. Records
    served from the cache are left out, and so are repeats of one result (same stage and source)."""
    seen, out = set(), []
    for e in records:
        key = (e.stage, e.source)
        if not e.cached and key not in seen:
            seen.add(key)
            out.append(e)
    return out


def utilisation(evaluation_seconds: float, wall_seconds: float, workers: int) -> float | None:
    """Share of the workers' time spent evaluating: evaluation seconds / (wall seconds x workers)."""
    if not wall_seconds or not evaluation_seconds:
        return None
    return min(1.0, evaluation_seconds / (wall_seconds * max(1, workers)))


def read_records(cls, rows: list[Any]) -> list:
    """Typed records of JSON rows (records of ``cls`` are kept as they are); rows that are not
    objects (a damaged file) are skipped."""
    if not isinstance(rows, list):  # a damaged file: no records
        return []
    return [r if isinstance(r, cls) else cls.from_json(r) for r in rows if isinstance(r, (cls, dict))]
