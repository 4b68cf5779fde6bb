"""A stage winner's schedule: every training its adapter went through, replayable into the same adapter.

With weight inheritance a child starts from its best parent's trained adapter, so a winner's genes
alone do not say how its adapter was made. Its schedule is the chain of evaluations back to the
first one that started from a fresh adapter, oldest first: each step's genome, gene values, seed
and steps trained (fewer than ``max_steps`` when successive halving stopped it). Every evaluation is
deterministic given those and the adapter it started from, so training the steps in order from the
stage's base model gives the winner's adapter again (``replay``; ``evolm replay RUN --stage K``),
as Ray Tune's PBT replays a trial's schedule.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from evolm.errors import RunDirError
from evolm.genome import hyperparameters
from evolm.jsonfiles import write_json
from evolm.ledger import StageLedger


def winner_schedule(ledger: StageLedger, genome_id: str) -> list[dict]:
    """The evaluations that made ``genome_id``'s adapter, oldest first (see the module docstring)."""
    trained = {r.genome_id: r for r in ledger.records.values() if not r.cached and r.ok}
    steps, seen, gid = [], set(), genome_id
    while gid is not None and gid not in seen:
        record = trained.get(gid)
        if record is None:
            raise RunDirError(f"stage {ledger.index}: no trained evaluation of {gid} in evaluations.jsonl; "
                              f"its schedule cannot be traced")
        seen.add(gid)
        inherited = (record.inherited or {}).get("adapter_of")
        steps.append({"genome_id": gid, "generation": record.generation, "values": record.values,
                      "steps": record.steps, "seed": record.seed, "inherited_from": inherited})
        gid = inherited
    return steps[::-1]


def write_schedule(run_dir: Path, stage: int, ledger: StageLedger, genome_id: str) -> Path:
    path = Path(run_dir) / "adapters" / f"stage-{stage}" / "schedule.json"
    write_json(path, {"stage": stage, "genome_id": genome_id, "schedule": winner_schedule(ledger, genome_id)})
    return path


def replay(run_dir: Path, stage: int, say=print) -> tuple[dict[str, np.ndarray], float | None]:
    """Train stage ``stage``'s winner schedule again from ``models/stage-<stage-1>``; returns the adapter
    and its largest difference from the adapter the run kept (None when the run kept none)."""
    from evolm.api import resume_config
    from evolm.base import load_base
    from evolm.interference import stage_subspaces
    from evolm.rundir import load_run
    from evolm.runstate import fill_replay
    from evolm.train import evaluate_genome

    run_dir = Path(run_dir)
    path = run_dir / "adapters" / f"stage-{stage}" / "schedule.json"
    if not path.is_file():
        raise RunDirError(f"{path}: no schedule for stage {stage} (written when the stage is merged); "
                          f"check the stage number with `evolm status {run_dir}`")
    schedule = json.loads(path.read_text())
    config = resume_config(run_dir)
    base = load_base(config, say, str(run_dir / "models" / f"stage-{stage - 1}"))
    training = load_run(run_dir).config.get("training")  # as the run's evaluations saw it (config.yaml)
    if not isinstance(training, dict):
        raise RunDirError(f"{run_dir / 'config.yaml'}: missing or damaged (its training section is what the "
                          f"evaluations ran with); a replay needs it")
    blocks = {s: base.stage_domain(stage).blocks[s] for s in ("train", "validation")}
    buffer = fill_replay(config, base, stage)
    if len(buffer):
        blocks["replay"] = buffer.blocks()
    subspaces = stage_subspaces(run_dir, base.model, stage) if "orthogonality" in schedule_genes(schedule) else {}
    torch.set_num_threads(int(max(1, config.ray.num_cpus_per_trial)))  # as the workers trained
    adapter, parent_hp = None, None
    for step in schedule["schedule"]:
        hp = hyperparameters(step["values"], training)
        stop_at = step["steps"] if step["steps"] < hp.max_steps else None
        inherit = None if adapter is None else {"adapter": adapter, "hp": parent_hp}
        say(f"replaying {step['genome_id']}: {step['steps']} steps" + (" from its parent's adapter" if inherit else ""))
        result = evaluate_genome(base.model, blocks, hp, step["seed"], training, base.device, stop_at=stop_at,
                                 inherit=inherit, subspaces=subspaces)
        adapter, parent_hp = result["adapter"], hp
    kept = run_dir / "adapters" / f"stage-{stage}" / f"{schedule['genome_id']}.safetensors"
    diff = None
    if kept.is_file():
        stored = load_file(str(kept))
        diff = max(float(np.max(np.abs(stored[k] - adapter[k]))) for k in stored)
    return adapter, diff


def schedule_genes(schedule: dict) -> set[str]:
    return {name for step in schedule["schedule"] for name in step["values"]}
