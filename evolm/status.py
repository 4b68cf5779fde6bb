"""What a run directory says about its run: progress, best so far, time spent and left.

Reads only the run's files, so it works while the run is going, after it finished or crashed.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from evolm.checkpoint import latest_checkpoint, read_jsonl
from evolm.errors import RunDirError


def open_run_dir(run_dir: Path) -> dict:
    """The experiment of a run directory, or a RunDirError saying why it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory; runs are in results/<run name>/")
    path = run_dir / "experiment.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not an evolm run directory (no experiment.json); give a directory "
                          f"that `evolm run` created")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunDirError(f"{path}: unreadable (not JSON); the run directory is damaged") from None


def run_status(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    experiment = open_run_dir(run_dir)
    search, stages = experiment["search"], [s["name"] for s in experiment["stages"]]
    per_stage = search["population_size"] + search["generations"] * search["offspring_size"]
    evals = read_jsonl(run_dir / "evaluations.jsonl")
    gens = read_jsonl(run_dir / "generations.jsonl")
    state, warnings = latest_checkpoint(run_dir)
    finished = (run_dir / "summary.json").exists() and (state or {}).get("stage_done") and state["stage"] == len(stages)
    best = {}
    for r in evals:
        loss = (r.get("objectives") or {}).get("val_loss")
        if r["status"] == "ok" and loss is not None:
            best[r["stage_name"]] = min(loss, best.get(r["stage_name"], float("inf")))
    elapsed = (state or {}).get("elapsed", sum(g["seconds"] for g in gens))
    done = len(evals)
    planned = per_stage * len(stages)
    left = None if finished or not done else elapsed / done * max(0, planned - done)
    last_gen = gens[-1] if gens else None
    return {"run_dir": str(run_dir), "state": "finished" if finished else ("running" if _alive(run_dir) else "stopped"),
            "stage": (last_gen or {}).get("stage", 0), "stages": len(stages),
            "stage_name": (last_gen or {}).get("stage_name"), "generation": (last_gen or {}).get("generation"),
            "generations": search["generations"], "evaluations_done": done, "evaluations_planned": planned,
            "failed": sum(r["status"] != "ok" for r in evals), "best_val_loss": best,
            "steps_trained": sum(r.get("steps") or 0 for r in evals if not r.get("cached")),
            "halted": sum(1 for r in evals if r.get("halted") and not r.get("cached")),
            "elapsed_seconds": elapsed, "estimated_seconds_left": left,
            "checkpoint": (state or {}).get("tag"), "warnings": warnings, "metrics": _metrics(run_dir)}


def format_status(s: dict) -> str:
    gen = "-" if s["generation"] is None else f"{s['generation']}/{s['generations']}"
    lines = [f"run        {s['run_dir']} ({s['state']})",
             f"stage      {s['stage']}/{s['stages']} {s['stage_name'] or ''}  generation {gen}",
             f"evaluated  {s['evaluations_done']}/{s['evaluations_planned']} planned ({s['failed']} failed; "
             f"twins served from the cache count as done)",
             f"trained    {s['steps_trained']} steps" + (
                 f" ({s['halted']} genomes stopped early by successive halving)" if s["halted"] else ""),
             f"time       {_hms(s['elapsed_seconds'])} spent" + (
                 f", about {_hms(s['estimated_seconds_left'])} left" if s["estimated_seconds_left"] is not None else ""),
             f"checkpoint {s['checkpoint'] or 'none yet'}"]
    for name, loss in s["best_val_loss"].items():
        lines.append(f"best       {name}: val_loss {loss:.4f}")
    m = s["metrics"]
    if m:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"metrics    average final test loss {fmt(m.get('average_final_loss'))}, mean forgetting "
                     f"{fmt(m.get('mean_forgetting'))}, backward transfer {fmt(m.get('backward_transfer'))}")
    lines += [f"warning    {w}" for w in s["warnings"]]
    return "\n".join(lines)


def _metrics(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(run_dir: Path) -> bool:
    try:
        info = json.loads((run_dir / "run.json").read_text())
        if info.get("host") != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)  # signal 0: only asks whether the process exists
        return True
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
