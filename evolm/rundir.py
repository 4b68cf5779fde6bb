"""A results directory as data: the one reader behind status, plots, the report, lineage,
importance and ``evolm generate``.

Works on a finished, a running or a crashed run: apart from experiment.json (what makes a folder a
run directory) every file is optional, a torn last JSON line is skipped, a file that cannot be
parsed is logged and treated as absent. Records are typed (``evolm.records``). Nothing here writes.

Three definitions live here and nowhere else:
    a run directory   a folder holding experiment.json (``open_run_dir``)
    finished          summary.json holds a summary for every configured stage (``RunRecords.finished``)
    an evaluation     a fine-tune that really ran (``RunRecords.evaluated``, i.e. ``trained_evaluations``)
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

from evolm.checkpoint import latest_checkpoint
from evolm.jsonfiles import read_jsonl
from evolm.errors import RunDirError
from evolm.metrics import infer_learned_at
from evolm.records import EvaluationRecord, GenerationRecord, StageSummary, read_records, trained_evaluations

log = logging.getLogger(__name__)


@dataclass
class CheckpointInfo:
    """What the newest whole checkpoint says about where the run stands."""

    tag: str | None = None
    stage: int = 0
    generation: int | None = None
    stage_done: bool = False
    elapsed: float | None = None
    """Run seconds spent up to this checkpoint (all sessions of a resumed run)."""
    warnings: list[str] = field(default_factory=list)
    """One per newer checkpoint that was corrupt and skipped."""


@dataclass
class RunRecords:
    path: Path
    experiment: dict = field(default_factory=dict)
    """experiment.json: the run's experiment as given (an extended one after ``resume --experiment``)."""
    config: dict = field(default_factory=dict)
    """config.yaml: the experiment resolved for the model (search space bound, training defaults)."""
    evaluations: list[EvaluationRecord] = field(default_factory=list)
    """Every line of evaluations.jsonl, cached twins included; see ``evaluated`` for counting."""
    generations: list[GenerationRecord] = field(default_factory=list)
    summaries: list[StageSummary] = field(default_factory=list)
    """summary.json's stages: one per merged stage, as of the last time a run (or resume) ended."""
    loss_matrix: dict | None = None
    metrics: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)
    """run.json: the process running the run (pid, host) and the data digests."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def configured_stages(self) -> int:
        """Stages the run's experiment has (more than summary.json knows after stages were appended)."""
        stages = self.experiment.get("stages") or self.config.get("stages") or []
        return len(stages) if isinstance(stages, list) else 0

    @property
    def finished(self) -> bool:
        """summary.json holds a summary for every configured stage. A resumed run with stages appended
        keeps its old summary.json (fewer stages) until it ends: not finished."""
        done = {s.stage for s in self.summaries}
        n = self.configured_stages
        return bool(done) and (n == 0 or done >= set(range(1, n + 1)))

    def evaluated(self) -> list[EvaluationRecord]:
        """The evaluations of every count (status, report, figures, importance): fine-tunes that
        really ran, cached twins and repeats left out (``evolm.records.trained_evaluations``)."""
        return trained_evaluations(self.evaluations)

    @cached_property
    def checkpoint(self) -> CheckpointInfo:
        """The newest whole checkpoint (read on first use: it loads torch to check the RNG state)."""
        state, warnings = latest_checkpoint(self.path)
        if state is None:
            return CheckpointInfo(warnings=warnings)
        return CheckpointInfo(tag=state.get("tag"), stage=state.get("stage", 0), generation=state.get("generation"),
                              stage_done=bool(state.get("stage_done")), elapsed=state.get("elapsed"),
                              warnings=warnings)

    def stage_names(self) -> dict[int, str]:
        """Stage index -> name, from the config, then from whatever the logs mention."""
        stages = self.config.get("stages")
        names = {i: s["name"] for i, s in enumerate(stages if isinstance(stages, list) else [], start=1)
                 if isinstance(s, dict) and isinstance(s.get("name"), str)}
        for r in [*self.evaluations, *self.generations]:
            names.setdefault(r.stage, r.stage_name or str(r.stage))
        return {k: v for k, v in sorted(names.items()) if isinstance(k, int)}

    def summary_of(self, stage: int) -> StageSummary | None:
        return next((s for s in self.summaries if s.stage == stage), None)

    def finished_stages(self) -> dict[int, str]:
        """Stage -> winner id, for every stage whose merge happened."""
        winners = {s.stage: s.winner_id for s in self.summaries if s.winner_id is not None}
        rows = (self.loss_matrix or {}).get("rows") or []
        for k in range(1, len(rows)):  # a running run: a loss-matrix row k means stage k merged
            if k not in winners and (w := self._best_of_last_generation(k)):
                winners[k] = w
        return dict(sorted(winners.items()))

    def _best_of_last_generation(self, stage: int) -> str | None:
        gens = [g for g in self.generations if g.stage == stage]
        ids = set(gens[-1].population or []) if gens else set()
        fit = {e.genome_id: e.val_loss for e in self.evaluations
               if e.stage == stage and e.genome_id in ids and e.val_loss is not None}
        return min(fit, key=fit.get) if fit else None

    def learned_at(self) -> list[int | None]:
        """Per loss-matrix column, the row that learned it: 0 for a base domain, k for stage k,
        None for a stage not merged yet (see ``evolm.metrics``)."""
        lm, stages = self.loss_matrix, set(self.stage_names().values())
        if lm is None:
            return []
        if lm.get("learned_at") and len(lm["learned_at"]) == len(lm["columns"]):
            n = len(lm["matrix"]) - 1  # a row not written (yet) has learned nothing
            return [k if isinstance(k, int) and 0 <= k <= n else None for k in lm["learned_at"]]
        rows = {name: i for i, name in enumerate(lm["rows"]) if i > 0}
        if not stages:
            return infer_learned_at(lm["columns"], lm["rows"])
        return [rows.get(c, None if c in stages else 0) for c in lm["columns"]]

    def model_stages(self) -> list[int]:
        """Stages whose merged model is saved under models/stage-<k> (0 is the base)."""
        found = []
        for d in (self.path / "models").glob("stage-*"):
            suffix = d.name.removeprefix("stage-")
            if suffix.isdigit() and (d / "config.json").is_file():
                found.append(int(suffix))
        return sorted(found)

    def objectives(self) -> list[str]:
        """The objectives the run searched, in order (config.yaml)."""
        names = _dict(self.config.get("search")).get("objectives")
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) and names else ["val_loss"]

    def natural(self, name: str, value: float | None) -> float | None:
        """An objective's value as people read it: a maximised one un-negated (records store it negated,
        evolm minimising everything; config.yaml's ``search.directions`` says which)."""
        directions = _dict(_dict(self.config.get("search")).get("directions"))
        return -value if value is not None and directions.get(name) == "maximize" else value

    def direction(self, name: str) -> str:
        directions = _dict(_dict(self.config.get("search")).get("directions"))
        return "maximize" if directions.get(name) == "maximize" else "minimize"

    def workers(self) -> int:
        """Evaluations that could run at once: the config's ray.num_workers, else the workers seen."""
        n = _dict(self.config.get("ray")).get("num_workers")
        seen = {e.worker for e in self.evaluated() if e.worker}
        if isinstance(n, int) and n >= 1:
            return min(n, len(seen)) if seen else n
        return max(1, len(seen))


def open_run_dir(path: str | Path) -> dict:
    """The experiment of a run directory (experiment.json, written before anything else of a run),
    or a RunDirError saying why ``path`` is not one."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory; runs are in results/<run name>/ "
                          f"(e.g. results/quickstart-20250101-120000)")
    file = path / "experiment.json"
    if not file.is_file():
        raise RunDirError(f"{path}: not an evolm run directory (no experiment.json; not a run directory that "
                          f"`evolm run` created); runs are in results/<run name>/")
    try:
        experiment = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deep
        experiment = None
    if not isinstance(experiment, dict):
        raise RunDirError(f"{file}: unreadable (not a JSON object); the run directory is damaged")
    return experiment


RUN_FILES = ("experiment.json", "evaluations.jsonl", "checkpoints")
"""What a run writes first: a folder holding any of them holds a run (its ledger would stand in for a
new run's evaluations)."""


def holds_a_run(path: str | Path) -> bool:
    return any((Path(path) / name).exists() for name in RUN_FILES)


def load_run(path: str | Path) -> RunRecords:
    """Everything a run directory holds, typed; RunDirError if it is not a run directory."""
    path = Path(path)
    experiment = open_run_dir(path)
    summary = _read(path / "summary.json", json.loads)
    return RunRecords(
        path=path,
        experiment=experiment,
        config=_dict(_read(path / "config.yaml", _safe_yaml)),
        evaluations=read_records(EvaluationRecord, read_jsonl(path / "evaluations.jsonl")),
        generations=read_records(GenerationRecord, _last_per_key(read_jsonl(path / "generations.jsonl"),
                                                                 ("stage", "generation"))),
        summaries=read_records(StageSummary, _dict(summary).get("stages") or []),
        loss_matrix=_valid_matrix(_read(path / "loss_matrix.json", json.loads)),
        metrics=_valid_metrics(_read(path / "metrics.json", json.loads)),
        samples=_last_per_key(read_jsonl(path / "samples.jsonl"), ("stage", "prompt")),
        run_info=_dict(_read(path / "run.json", json.loads)),
    )


def _safe_yaml(text: str):
    """``yaml.safe_load``, with libyaml's parser where PyYAML has it (10x faster on a run's config)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _read(path: Path, parse):
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:  # ValueError: not UTF-8, not JSON
        log.warning("%s: unreadable (%s); ignored", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _valid_matrix(lm) -> dict | None:
    """loss_matrix.json, or None if it is unusable: named columns, rows of losses (None: not finite)
    as long as the columns, ``learned_at`` only if it is one row index (or None) per column."""
    if not isinstance(lm, dict) or not isinstance(lm.get("matrix"), list) or not _names(lm.get("columns")):
        return None
    cols, rows = lm["columns"], lm["rows"] if _names(lm.get("rows")) else []
    matrix = [r for r in lm["matrix"] if isinstance(r, list) and len(r) == len(cols) and all(map(_finite_or_none, r))]
    if not matrix:
        return None
    rows = (list(rows) + [f"row {i}" for i in range(len(rows), len(matrix))])[: len(matrix)]
    valid = lm | {"columns": cols, "rows": rows, "matrix": matrix}
    learned = lm.get("learned_at")
    if not (isinstance(learned, list) and len(learned) == len(cols)
            and all(k is None or (isinstance(k, int) and not isinstance(k, bool)) for k in learned)):
        valid.pop("learned_at", None)
    return valid


def _names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


_METRIC_VALUES = ("average_final_loss", "average_final_perplexity", "mean_forgetting", "backward_transfer",
                  "average_final_accuracy", "mean_accuracy_forgetting",
                  "mean_forward_transfer")
_METRIC_COLUMNS = ("final_loss", "final_perplexity", "forgetting", "forward_transfer", "final_accuracy",
                   "accuracy_forgetting")


def _valid_metrics(metrics) -> dict:
    """metrics.json (``metrics.summarize``) with every value a finite number or None; a value of
    another type (a damaged file) is left out, so readers show it as unknown."""
    metrics, out = _dict(metrics), {}
    for key in ("columns", "rows", "learned_at"):
        if isinstance(metrics.get(key), list):
            out[key] = metrics[key]
    out |= {k: metrics[k] for k in _METRIC_VALUES if k in metrics and _finite_or_none(metrics[k])}
    for key in _METRIC_COLUMNS:
        if isinstance(metrics.get(key), dict):
            out[key] = {c: v for c, v in metrics[key].items() if _finite_or_none(v)}
    return out


def _finite_or_none(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63)


def _last_per_key(records: list, keys: tuple[str, ...]) -> list[dict]:
    """One record per key (a resumed run may repeat a line): the last one, in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in records:
        if isinstance(r, dict):
            out[tuple(json.dumps(r.get(k)) for k in keys)] = r
    return list(out.values())
