"""The evaluation ledger: every finished evaluation of a run, as records and adapter files.

``evaluations.jsonl`` holds one record per genome per generation; ``adapters/stage-<k>/<id>.safetensors``
holds the adapter of each evaluation that trained. An adapter is on disk before its record is, so a
record always means "done": a resumed run takes it instead of training again. With successive
halving, ``rungs.jsonl`` and ``adapters/stage-<k>/rungs/`` hold each rung's result and paused
training state the same way.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from evolm.jsonfiles import read_jsonl, write_atomic
from evolm.genome import canonical_json
from evolm.records import EvaluationRecord, read_records
from evolm import safenames


@dataclass
class StageLedger:
    """One stage's finished evaluations and the fitness cache they imply."""

    run_dir: Path
    index: int
    records: dict[tuple[int, str], EvaluationRecord] = field(default_factory=dict)
    """(generation, genome id) -> evaluation record."""
    cache: dict[str, dict] = field(default_factory=dict)
    """genome key -> record of the evaluation that trained it: the same genome is never trained twice."""
    rungs: dict[tuple[int, str, int], dict] = field(default_factory=dict)
    """(generation, genome id, rung) -> result of a successive-halving rung."""
    trained: int = 0

    @classmethod
    def read(cls, run_dir: Path, k: int) -> "StageLedger":
        ledger = cls(Path(run_dir), k)
        log = ledger.run_dir / "evaluations.jsonl"
        for r in read_records(EvaluationRecord, read_jsonl(log)):
            if r.stage == k:
                for name in (r.genome_id, r.source):  # both name adapter files
                    safenames.genome_id(name, log)
                ledger.records[(r.generation, r.genome_id)] = r
                if not r.cached:
                    ledger.cache[canonical_json(r.values)] = r.to_json() | {"genome_id": r.source}
                    ledger.trained += 1
        log = ledger.run_dir / "rungs.jsonl"
        for r in read_jsonl(log):
            if r.get("stage") == k and isinstance(r.get("generation"), int) and isinstance(r.get("rung"), int):
                ledger.rungs[(r.get("generation"), safenames.genome_id(r.get("genome_id"), log), r["rung"])] = r
        return ledger

    def steps_before(self, generation: int | None = None) -> int:
        """Steps trained by the generations before ``generation`` (None: all of this stage's so far);
        rungs included, inherited steps not. The same before and after a resume."""
        return sum(r.steps or 0 for (g, _), r in self.records.items()
                   if (generation is None or g < generation) and not r.cached)

    def adapter_path(self, genome: str) -> Path:
        name = safenames.genome_id(genome, f"{self.run_dir}: an adapter")  # never a path that leaves adapters/
        return self.run_dir / "adapters" / f"stage-{self.index}" / f"{name}.safetensors"

    def save_adapter(self, genome_id: str, arrays: dict[str, np.ndarray]) -> None:
        _save_atomic(self.adapter_path(genome_id), arrays)

    def load_adapter(self, genome_id: str) -> dict[str, np.ndarray]:
        return load_file(str(self.adapter_path(genome_id)))

    def rung_path(self, genome_id: str, rung: int) -> Path:
        return self.adapter_path(genome_id).parent / "rungs" / f"{genome_id}.r{rung}.safetensors"

    def save_rung_state(self, genome_id: str, rung: int, arrays: dict[str, np.ndarray]) -> None:
        _save_atomic(self.rung_path(genome_id, rung), arrays)

    def load_rung_state(self, genome_id: str, rung: int) -> dict[str, np.ndarray]:
        return load_file(str(self.rung_path(genome_id, rung)))

    def prune_adapters(self, keep: set[str]) -> None:
        """After the merge only the merged adapters are worth their disk space."""
        for path in self.adapter_path("x").parent.glob("*.safetensors"):
            if path.stem not in keep:
                path.unlink()
        shutil.rmtree(self.rung_path("x", 0).parent, ignore_errors=True)


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(arrays))  # the bytes written here, so a full disk is an OSError naming the file


def repair_logs(run_dir: Path, state: dict | None) -> None:
    """Drop torn lines (a kill mid-write), and generation records and merge-strength points newer than
    the checkpoint (a merge interrupted before its checkpoint is scored again)."""
    last = (0, -1) if state is None else (state["stage"], 10**9 if state["stage_done"] else state["generation"])
    for name, keep in (("generations.jsonl", lambda r: _at_or_before(r, last)),
                       ("merge_curve.jsonl", lambda r: _at_or_before(dict(r, generation=10**9), last)),
                       ("evaluations.jsonl", lambda r: True), ("rungs.jsonl", lambda r: True)):
        path = Path(run_dir) / name
        if path.is_file():
            records = [r for r in read_jsonl(path) if keep(r)]
            write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _at_or_before(record: dict, last: tuple[int, int]) -> bool:
    """A generation record up to ``last`` (stage, generation); a damaged one (no such numbers) is not kept."""
    at = (record.get("stage"), record.get("generation"))
    return all(isinstance(x, int) and not isinstance(x, bool) for x in at) and at <= last
