"""What a run directory says about its run: progress, best so far, time spent and left.

Reads the run through ``evolm.rundir`` (the one reader), so it works while the run is going, after
it finished or crashed, and counts evaluations exactly as the report does.
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from evolm.rundir import RunRecords, load_run, open_run_dir

__all__ = ["run_status", "format_status", "open_run_dir"]


def run_status(run_dir: Path) -> dict:
    run = load_run(run_dir)
    search = run.experiment.get("search")
    search = search if isinstance(search, dict) else {}  # a damaged experiment.json still has a status
    per_stage = _count(search, "population_size") + _count(search, "generations") * _count(search, "offspring_size")
    evaluated = run.evaluated()
    done = len(evaluated)
    finished = run.finished
    budget, steps = _count(search, "step_budget"), sum(e.steps or 0 for e in evaluated)
    if budget and done and steps:  # the budget, at the steps an evaluation took so far
        per_stage = min(per_stage, math.ceil(budget / (steps / done)) + 1)
    stage_seconds, run_seconds = _number(search, "time_budget"), _number(search, "run_time_budget")
    searched = sum(g.seconds or 0 for g in run.generations)
    if stage_seconds and done and searched:  # the time budget, at the seconds an evaluation took so far
        per_stage = min(per_stage, math.ceil(stage_seconds / (searched / done)) + 1)
    # a finished run did what it did; an unfinished one at most this (caching, halving: fewer)
    planned = done if finished else max(done, per_stage * run.configured_stages)
    if run_seconds and done and searched and not finished:
        planned = min(planned, max(done, math.ceil(run_seconds / (searched / done)) + run.configured_stages))
    best: dict[str, float] = {}
    for r in run.evaluations:
        if (loss := r.val_loss) is not None:
            best[r.stage_name] = min(loss, best.get(r.stage_name, float("inf")))
    others: dict[str, dict[str, float]] = {}  # stage -> the best of each other searched objective, as people read it
    for name in (n for n in run.objectives() if n != "val_loss"):
        for r in run.evaluations:
            if (v := r.objective(name)) is not None:
                stage = others.setdefault(r.stage_name, {})
                stage[name] = min(v, stage.get(name, float("inf")))
    others = {s: {n: run.natural(n, v) for n, v in vals.items()} for s, vals in others.items()}
    checkpoint = run.checkpoint
    elapsed = checkpoint.elapsed if checkpoint.elapsed is not None else sum(g.seconds or 0 for g in run.generations)
    left = None if finished or not done else elapsed / done * max(0, planned - done)
    if left is not None and run_seconds:  # the searches stop at the run's budget (merges still to come)
        left = min(left, max(0.0, run_seconds - searched) * elapsed / max(searched, 1e-9))
    last_gen = run.generations[-1] if run.generations else None
    return {"run_dir": str(run.path), "state": "finished" if finished else ("running" if _alive(run) else "stopped"),
            "stage": last_gen.stage if last_gen else 0, "stages": run.configured_stages,
            "stage_name": last_gen.stage_name if last_gen else None,
            "generation": last_gen.generation if last_gen else None,
            "diversity": last_gen.diversity if last_gen else None,
            "generations": _count(search, "generations"), "evaluations_done": done, "evaluations_planned": planned,
            "failed": sum(not e.ok for e in evaluated), "best_val_loss": best, "best_objectives": others,
            "steps_trained": sum(e.steps or 0 for e in evaluated),
            "halted": sum(1 for e in evaluated if e.halted),
            "elapsed_seconds": elapsed, "estimated_seconds_left": left,
            "checkpoint": checkpoint.tag, "warnings": checkpoint.warnings, "metrics": run.metrics,
            "merges": [{"stage": m.stage, "name": m.name, "method": m.merge_method, "strength": m.merge_strength,
                        "points": len(m.merge_curve or [])} for m in run.summaries]}


def format_status(s: dict) -> str:
    gen = "-" if s["generation"] is None else f"{s['generation']}/{s['generations']}"
    done, failed = s["evaluations_done"], s["failed"]
    evaluated = (f"{done} ({failed} failed; twins served from the cache not counted)" if s["state"] == "finished"
                 else f"{done} of at most {s['evaluations_planned']} planned ({failed} failed; twins served from "
                      f"the cache, successive halving, step and time budgets make it fewer)")
    lines = [f"run        {s['run_dir']} ({s['state']})",
             f"stage      {s['stage']}/{s['stages']} {s['stage_name'] or ''}  generation {gen}" + (
                 f"  diversity {s['diversity']:.2f}" if isinstance(s.get("diversity"), (int, float)) else ""),
             f"evaluated  {evaluated}",
             f"trained    {s['steps_trained']} steps" + (
                 f" ({s['halted']} genomes stopped early by successive halving)" if s["halted"] else ""),
             f"time       {_hms(s['elapsed_seconds'])} spent" + (
                 f", about {_hms(s['estimated_seconds_left'])} left" if s["estimated_seconds_left"] is not None else ""),
             f"checkpoint {s['checkpoint'] or 'none yet'}"]
    for name, loss in s["best_val_loss"].items():
        lines.append(f"best       {name}: val_loss {loss:.4f}"
                     + "".join(f", {o} {v:.4f}" for o, v in (s.get("best_objectives") or {}).get(name, {}).items()))
    for m in s["merges"]:
        lines.append(f"merged     stage {m['stage']} {m['name']}: {m['method']} at strength {m['strength']}"
                     f" (of {m['points']} points scored)")
    m = s["metrics"]
    if m:
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"metrics    average final test loss {fmt(m.get('average_final_loss'))}, mean forgetting "
                     f"{fmt(m.get('mean_forgetting'))}, backward transfer {fmt(m.get('backward_transfer'))}")
        if isinstance(m.get("average_final_accuracy"), (int, float)):
            lines.append(f"accuracy   average final test accuracy {m['average_final_accuracy']:.4f}, mean forgetting "
                         f"{fmt(m.get('mean_accuracy_forgetting'))}")
    lines += [f"warning    {w}" for w in s["warnings"]]
    return "\n".join(lines)


def _number(section: dict, key: str) -> float | None:
    value = section.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _count(section: dict, key: str) -> int:
    value = section.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _alive(run: RunRecords) -> bool:
    info = run.run_info
    try:
        if info.get("host") != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)  # signal 0: only asks whether the process exists
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
