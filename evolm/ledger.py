"""The evaluation ledger: every finished evaluation of a run, as records and adapter files.

``evaluations.jsonl`` holds one record per genome per generation; ``adapters/stage-<k>/<id>.safetensors``
holds the adapter of each evaluation that trained. An adapter is on disk before its record is, so a
record always means "done": a resumed run takes it instead of training again.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from evolm.checkpoint import read_jsonl, write_atomic
from evolm.genome import canonical_json


@dataclass
class StageLedger:
    """One stage's finished evaluations and the fitness cache they imply."""

    run_dir: Path
    index: int
    records: dict[tuple[int, str], dict] = field(default_factory=dict)
    """(generation, genome id) -> evaluation record."""
    cache: dict[str, dict] = field(default_factory=dict)
    """genome key -> record of the evaluation that trained it: the same genome is never trained twice."""
    trained: int = 0

    @classmethod
    def read(cls, run_dir: Path, k: int) -> "StageLedger":
        ledger = cls(Path(run_dir), k)
        for r in read_jsonl(ledger.run_dir / "evaluations.jsonl"):
            if r["stage"] == k:
                ledger.records[(r["generation"], r["genome_id"])] = r
                if not r["cached"]:
                    ledger.cache[canonical_json(r["values"])] = r | {"genome_id": r["result_of"]}
                    ledger.trained += 1
        return ledger

    def adapter_path(self, genome_id: str) -> Path:
        return self.run_dir / "adapters" / f"stage-{self.index}" / f"{genome_id}.safetensors"

    def save_adapter(self, genome_id: str, arrays: dict[str, np.ndarray]) -> None:
        path = self.adapter_path(genome_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(arrays, str(tmp))
        os.replace(tmp, path)

    def load_adapter(self, genome_id: str) -> dict[str, np.ndarray]:
        return load_file(str(self.adapter_path(genome_id)))

    def prune_adapters(self, keep: set[str]) -> None:
        """After the merge only the merged adapters are worth their disk space."""
        for path in self.adapter_path("x").parent.glob("*.safetensors"):
            if path.stem not in keep:
                path.unlink()


def repair_logs(run_dir: Path, state: dict | None) -> None:
    """Drop torn lines (a kill mid-write) and generation records newer than the checkpoint."""
    last = (0, -1) if state is None else (state["stage"], 10**9 if state["stage_done"] else state["generation"])
    for name, keep in (("generations.jsonl", lambda r: (r["stage"], r["generation"]) <= last),
                       ("evaluations.jsonl", lambda r: True)):
        path = Path(run_dir) / name
        if path.exists():
            records = [r for r in read_jsonl(path) if keep(r)]
            write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
