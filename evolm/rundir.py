"""A results directory as data: what plots, the report and ``evolm generate`` read.

Works on a finished, a running or a crashed run: every file is optional, a torn last JSON line is
skipped, a file that cannot be parsed is logged and treated as absent. Nothing here writes.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evolm.checkpoint import read_jsonl
from evolm.errors import RunDirError
from evolm.metrics import infer_learned_at

log = logging.getLogger(__name__)


@dataclass
class RunRecords:
    path: Path
    config: dict = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)
    loss_matrix: dict | None = None
    summary: dict | None = None
    samples: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def stage_names(self) -> dict[int, str]:
        """Stage index -> name, from the config, then from whatever the logs mention."""
        names = {i: s.get("name", str(i)) for i, s in enumerate(self.config.get("stages") or [], start=1)
                 if isinstance(s, dict)}
        for r in self.evaluations + self.generations:
            names.setdefault(r.get("stage"), r.get("stage_name", str(r.get("stage"))))
        return {k: v for k, v in sorted(names.items()) if isinstance(k, int)}

    def stage_summaries(self) -> list[dict]:
        return [s for s in (self.summary or {}).get("stages", []) if isinstance(s, dict)]

    def finished_stages(self) -> dict[int, str]:
        """Stage -> winner id, for every stage whose merge happened."""
        winners = {s["stage"]: s["winner"]["id"] for s in self.stage_summaries()
                   if isinstance(s.get("winner"), dict) and "id" in s["winner"]}
        rows = (self.loss_matrix or {}).get("rows") or []
        for k in range(1, len(rows)):  # a running run: a loss-matrix row k means stage k merged
            if k not in winners and (w := self._best_of_last_generation(k)):
                winners[k] = w
        return dict(sorted(winners.items()))

    def _best_of_last_generation(self, stage: int) -> str | None:
        gens = [g for g in self.generations if g.get("stage") == stage]
        ids = set(gens[-1].get("population") or []) if gens else set()
        fit = {e["genome_id"]: val_loss(e) for e in self.evaluations
               if e.get("stage") == stage and e.get("genome_id") in ids and val_loss(e) is not None}
        return min(fit, key=fit.get) if fit else None

    def evaluated(self) -> list[dict]:
        """One record per fine-tune that really ran: see ``real_evaluations``."""
        return real_evaluations(self.evaluations)

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

    def workers(self) -> int:
        """Evaluations that could run at once: the config's ray.num_workers, else the workers seen."""
        n = (self.config.get("ray") or {}).get("num_workers")
        seen = {e.get("worker") for e in self.evaluated() if e.get("worker")}
        if isinstance(n, int) and n >= 1:
            return min(n, len(seen)) if seen else n
        return max(1, len(seen))


def load_run(path: str | Path) -> RunRecords:
    """Everything a run directory holds; RunDirError if it is not a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such run directory (give a folder under results/, e.g. "
                          f"results/quickstart-20250101-120000)")
    if not (path / "config.yaml").is_file() and not (path / "evaluations.jsonl").is_file():
        raise RunDirError(f"{path}: not a run directory (no config.yaml and no evaluations.jsonl); "
                          f"give the folder that `evolm run` created under results/")
    return RunRecords(
        path=path,
        config=_read(path / "config.yaml", yaml.safe_load) or {},
        evaluations=read_jsonl(path / "evaluations.jsonl"),
        generations=_last_per_key(read_jsonl(path / "generations.jsonl"), ("stage", "generation")),
        loss_matrix=_valid_matrix(_read(path / "loss_matrix.json", json.loads)),
        summary=_read(path / "summary.json", json.loads),
        samples=_last_per_key(read_jsonl(path / "samples.jsonl"), ("stage", "prompt")),
    )


def real_evaluations(evaluations: list[dict]) -> list[dict]:
    """The records of evaluations that ran: records served from the cache are left out, and so are
    repeats of one result (same stage and ``result_of`` / genome id), whatever their ``cached`` flag."""
    seen, out = set(), []
    for e in evaluations:
        key = (e.get("stage"), e.get("result_of") or e.get("genome_id"))
        if not e.get("cached") and (key[1] is None or key not in seen):
            seen.add(key)
            out.append(e)
    return out


def val_loss(evaluation: dict) -> float | None:
    """The validation loss of an ok evaluation, else None."""
    if evaluation.get("status") != "ok":
        return None
    v = (evaluation.get("objectives") or {}).get("val_loss")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _read(path: Path, parse):
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable (%s); ignored", path, str(exc).splitlines()[0] if str(exc) else exc)
        return None


def _valid_matrix(lm) -> dict | None:
    if not isinstance(lm, dict) or not isinstance(lm.get("matrix"), list):
        return None
    cols, rows = lm.get("columns") or [], lm.get("rows") or []
    matrix = [r for r in lm["matrix"] if isinstance(r, list) and len(r) == len(cols)]
    if not cols or not matrix:
        return None
    rows = (list(rows) + [f"row {i}" for i in range(len(rows), len(matrix))])[: len(matrix)]
    return lm | {"columns": cols, "rows": rows, "matrix": matrix}


def _last_per_key(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One record per key (a resumed run may repeat a line): the last one, in first-seen order."""
    out: dict[tuple, dict] = {}
    for r in records:
        out[tuple(json.dumps(r.get(k)) for k in keys)] = r
    return list(out.values())

