"""What a run carries from stage to stage, and how it goes to and comes back from disk.

``RunState`` is everything the conductor holds between stages; ``checkpoint_state`` /
``restore_search`` turn it (with a stage's population and hall of fame) into a checkpoint and back.
The data files' digests (``run.json``) make a resumed run refuse changed data.
See docs/design.md, "Contracts".
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evolm import __version__, rows
from evolm.base import Base, test_accuracies, test_losses
from evolm.checkpoint import lists_to_tuples, restore_global_rng, tuples_to_lists
from evolm.jsonfiles import write_json
from evolm.config import ExperimentConfig
from evolm.errors import RunDirError
from evolm.evolution import Evolution
from evolm.genome import Genome
from evolm.metrics import accuracy_summary, summarize
from evolm.records import StageSummary
from evolm.replay import ReplayBuffer


@dataclass
class RunState:
    base: Base
    """The current base model (the merge of every stage so far), its tokenizer and every domain."""
    evolution: Evolution
    space: dict
    training: dict
    """``training`` as every evaluation sees it (``searchspace.training_defaults``)."""
    loss_matrix: list[list[float]] = field(default_factory=list)
    """Row i: test losses of the model after stage i (row 0: the base) on every domain."""
    accuracy_matrix: list[list[float]] = field(default_factory=list)
    """A classifier's test accuracies, rows and columns as ``loss_matrix``; empty for a causal LM."""
    summaries: list[StageSummary] = field(default_factory=list)
    replay: ReplayBuffer | None = None
    elapsed_before: float = 0.0
    """Seconds spent by earlier sessions of this run (resumes)."""
    session_start: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.session_start

    def eval_loss(self, model, blocks: np.ndarray) -> float:
        from evolm.train import evaluate

        return evaluate(model, blocks, self.training["eval_batch_size"], self.training["eval_max_batches"], model.device)

    def retention_parts(self, k: int) -> dict[str, np.ndarray]:
        """{domain: its validation blocks} for every domain before stage k, in equal shares within the
        evaluation cap; concatenated they are the retention blocks."""
        earlier = self.base.domains_before(k)
        cap = self.training["eval_max_batches"]
        share = None if cap is None else max(1, cap * self.training["eval_batch_size"] // max(1, len(earlier)))
        return {d.name: d.blocks["validation"][:share] for d in earlier}

    def retention_blocks(self, k: int) -> np.ndarray:
        """Validation blocks of every domain before stage k, in equal shares within the evaluation cap."""
        parts = list(self.retention_parts(k).values())
        return rows.concat(parts) if parts else self.base.stage_domain(k).blocks["validation"][:0]

    def domain_losses(self, model, parts: dict[str, np.ndarray]) -> dict[str, float]:
        return {name: self.eval_loss(model, blocks) for name, blocks in parts.items()}

    def measure_row(self, k: int, model, domains=None) -> None:
        """Row k of the loss matrix (and of a classifier's accuracy matrix): ``model``, the model after
        stage k, on every domain; with ``domains``, row k is extended by those (appended stages)."""
        bs = self.training["eval_batch_size"]
        tables = [(self.loss_matrix, test_losses)] + ([(self.accuracy_matrix, test_accuracies)] if self.base.classes else [])
        for table, measure in tables:
            row = measure(model, self.base.domains if domains is None else domains, bs)
            if domains is None:  # a re-measured row replaces itself and what followed it
                del table[k:]
                table.append(row)
            else:
                table[k] = table[k] + row


def fill_replay(config: ExperimentConfig, base: Base, first_stage: int) -> ReplayBuffer:
    """A replay buffer holding every domain learned before ``first_stage`` (rebuilt the same on resume)."""
    replay = ReplayBuffer(config.replay.buffer_blocks, config.seed)
    learned = base.domains[base.n_base_domains: base.n_base_domains + first_stage - 1]
    if base.n_base_domains and config.replay.include_base_domain:
        learned = [base.domains[0]] + learned
    for d in learned:
        replay.add(d.name, d.blocks["train"])
    return replay


def write_loss_matrix(run_dir: Path, config: ExperimentConfig, state: RunState) -> None:
    """loss_matrix.json and the metrics read from it (metrics.json)."""
    n_base, rows_done = state.base.n_base_domains, len(state.loss_matrix)
    rows = ["base"] + [s.name for s in config.stages][: rows_done - 1]
    learned_at = [0] * n_base + [k if k < rows_done else None for k in range(1, len(config.stages) + 1)]
    matrix = {"columns": [d.name for d in state.base.domains], "rows": rows, "matrix": state.loss_matrix,
              "split": "test", "learned_at": learned_at}
    metrics = summarize(matrix, learned_at)
    if state.accuracy_matrix:
        matrix["accuracy"] = state.accuracy_matrix
        metrics |= accuracy_summary(state.accuracy_matrix, learned_at, matrix["columns"])
    write_json(run_dir / "loss_matrix.json", matrix)
    write_json(run_dir / "metrics.json", metrics)


# ----- checkpoints ----------------------------------------------------------------------------
def genome_state(g: Genome) -> dict:
    return g.to_json() | {"fitness": list(g.fitness.values) if g.fitness.valid else None}


def genome_from_state(d: dict, fitness_class) -> Genome:
    g = Genome(values=d["values"], id=d["id"], parents=d["parents"], ops=d["ops"], born=tuple(d["born"]),
               fitness=fitness_class())
    if d.get("fitness") is not None:
        g.fitness.values = tuple(float("inf") if v is None else v for v in d["fitness"])
    return g


def checkpoint_state(state: RunState, config: ExperimentConfig, k: int, gen: int | None,
                     population: list[Genome], hof, steady: dict | None = None) -> dict:
    """A checkpoint after generation ``gen`` of stage ``k`` (None: after its merge); ``steady``: the
    steady-state search's children in flight and counts (``evolm.steady``)."""
    return {"stage": k, "generation": gen, "stage_done": gen is None, "steady": steady,
            "population": [genome_state(g) for g in population], "hall_of_fame": [genome_state(g) for g in hof],
            "evolution_rng": tuples_to_lists(state.evolution.rng.getstate()),
            "loss_matrix": state.loss_matrix, "accuracy_matrix": state.accuracy_matrix, "summaries": [s.to_json() for s in state.summaries],
            "config_hash": config.hash(), "base_model": f"models/stage-{k if gen is None else k - 1}",
            "dtype": str(state.base.dtype).removeprefix("torch."),
            "elapsed": state.elapsed()}


@dataclass
class ResumePoint:
    population: list[Genome] | None = None
    first_stage: int = 1
    first_gen: int = 0
    hall_of_fame: list[dict] | None = None
    steady: dict | None = None


def restore_search(checkpoint: dict | None, evolution: Evolution) -> ResumePoint:
    """Where the loop goes on from ``checkpoint`` (None: the beginning); restores every RNG."""
    if checkpoint is None:
        return ResumePoint()
    evolution.rng.setstate(lists_to_tuples(checkpoint["evolution_rng"]))
    restore_global_rng(checkpoint)
    # One object per id: a genome that stands in the population several times stays one genome.
    by_id = {d["id"]: genome_from_state(d, evolution.fitness_class) for d in checkpoint["population"]}
    population = [by_id[d["id"]] for d in checkpoint["population"]]
    if checkpoint["stage_done"]:
        return ResumePoint(population, checkpoint["stage"] + 1)
    return ResumePoint(population, checkpoint["stage"], checkpoint["generation"] + 1, checkpoint["hall_of_fame"],
                       checkpoint.get("steady"))


# ----- provenance -----------------------------------------------------------------------------
def data_files(config: ExperimentConfig) -> list[Path]:
    sources = ([config.model.own_domain] if config.model.own_domain else []) + list(config.stages)
    return [p for s in sources for p in (s.train, s.validation, s.test) if p is not None]


def write_run_info(run_dir: Path, config: ExperimentConfig) -> None:
    """run.json: who runs it (pid, host: ``evolm status`` tells running from stopped) and the data digests."""
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {"created": time.time()}
    recorded = info.get("data", {})  # digests of the run's start win; only new files are hashed
    if config.source_dir is not None:  # where a resume looks for the experiment's own objective modules
        info.setdefault("experiment_dir", str(config.source_dir))
    info.update(evolm_version=__version__, pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                data={str(p): sha256(p) for p in data_files(config) if str(p) not in recorded} | recorded)
    write_json(info_path, info)


def check_data_unchanged(run_dir: Path) -> None:
    recorded = json.loads((run_dir / "run.json").read_text()).get("data", {})
    changed = [p for p, digest in recorded.items() if Path(p).is_file() and sha256(Path(p)) != digest]
    if changed:
        raise RunDirError(f"data changed since the run started: {', '.join(changed)}; restore the "
                          f"original files or start a new run")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
