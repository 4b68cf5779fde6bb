"""Continual-learning benchmark: does evolving for retention forget less, at equal training steps?

Four methods on the same stage stream (default: the offline quickstart's), each stage's merged
adapter trained for the same number of steps (``--steps``; the joint adapter gets steps x stages):

1. naive     sequential LoRA with common defaults (r=8, alpha=16, dropout 0.05, lr 2e-4, attention
             only), merged after each stage: one fine-tune per stage, no search
2. val_loss  evolm, selecting on the current stage's validation loss only
3. retention evolm, NSGA-II on val_loss + retention_loss, a replay_ratio gene, winner rule
             "lowest val_loss whose retention_loss is within (1 + epsilon) of the stage base's"
4. joint     one adapter trained on all stages' data mixed, its hyperparameters found by evolm's
             search on the mixed data (the upper bound; not continual)

Usage:  python benchmarks/continual.py [--experiment experiments/quickstart.yaml] [--steps 40] ...
Writes <out>/<method>/ (a normal run directory each) and <out>/continual.json, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evolm.configfile import parse_config  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.base import load_base, test_losses  # noqa: E402
from evolm.data import read_documents  # noqa: E402
from evolm.executor import LocalExecutor, RayExecutor  # noqa: E402
from evolm.metrics import summarize  # noqa: E402

METHODS = ("naive", "val_loss", "retention", "joint")


def fixed(value):
    return {"type": "categorical", "choices": [value]}


def method_config(base: dict, method: str, args, out: Path) -> dict:
    raw = json.loads(json.dumps(base))
    raw["name"], raw["output_dir"] = f"bench-{method}", str(out)
    raw["search"] = dict(raw.get("search", {}), population_size=args.population, offspring_size=args.population,
                         generations=args.generations)
    space = {"max_steps": fixed(args.steps), "replay_ratio": None}
    if method == "naive":
        attention = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}[raw["model"]["build"]["family"]]
        space.update(r=fixed(8), lora_alpha=fixed(16), lora_dropout=fixed(0.05), target_modules=fixed(attention),
                     layers=None, learning_rate=fixed(2e-4), weight_decay=fixed(0.0), warmup_ratio=fixed(0.0))
        raw["search"].update(population_size=2, generations=0)  # every genome is the same: one fine-tune
    elif method == "retention":
        space["replay_ratio"] = {"type": "uniform", "low": 0.0, "high": 0.5}
        raw["search"].update(objectives=["val_loss", "retention_loss"],
                             winner={"rule": "min_val_loss_within_retention", "epsilon": args.epsilon})
    elif method == "joint":
        space["max_steps"] = fixed(args.steps * len(raw["stages"]))
        raw["stages"] = [joint_stage(raw, out)]
    raw["search"]["space"] = space
    raw["prompts"] = []
    return raw


def joint_stage(raw: dict, out: Path) -> dict:
    """All stages' documents in one JSON-lines file; splits are derived by hashing each document,
    so every document lands in the same split as in its own stage."""
    config = parse_config(raw)
    path = out / "joint.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for stage in config.stages:
            for doc in read_documents(stage, stage.train):
                f.write(json.dumps({"text": doc}) + "\n")
    return {"name": "joint", "format": "jsonl", "train": str(path), "text_field": "text"}


def joint_matrix(base_raw: dict, run_dir: Path) -> dict:
    """The joint model's test losses on each original domain (rows: base, joint)."""
    config = parse_config(base_raw)
    rows = []
    for stage_dir in ("stage-0", "stage-1"):
        base = load_base(config, model_dir=str(run_dir / "models" / stage_dir))
        rows.append(test_losses(base.model, base.domains, config.training.eval_batch_size))
    return {"columns": [d.name for d in base.domains], "rows": ["base", "joint"], "matrix": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--out", type=Path, default=Path("results/bench-continual"))
    parser.add_argument("--steps", type=int, default=40, help="training steps of each stage's merged adapter")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    base = yaml.safe_load(args.experiment.read_text())
    base = json.loads(json.dumps(parse_config(base, base_dir=args.experiment.parent).model_dump(mode="json")))
    results = {}
    for method in args.methods:
        raw = method_config(base, method, args, args.out)
        config = parse_config(raw)
        run_dir = args.out / method
        shutil.rmtree(run_dir, ignore_errors=True)  # this script's own output of an earlier run
        start = time.time()
        executor = (lambda: LocalExecutor()) if args.no_ray else (lambda: RayExecutor(config.ray))
        ContinualRun(config, run_dir, executor).run()
        matrix = (joint_matrix(base, run_dir) if method == "joint"
                  else json.loads((run_dir / "loss_matrix.json").read_text()))
        evals = sum(1 for line in (run_dir / "evaluations.jsonl").read_text().splitlines()
                    if not json.loads(line)["cached"])
        results[method] = {"matrix": matrix, "seconds": time.time() - start, "trained_evaluations": evals}
        print(f"{method}: done in {results[method]['seconds']:.0f}s", flush=True)
    report = score(results, n_base=1 if base["model"].get("pretrain") else 0)
    (args.out / "continual.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results, "report": report}, indent=2))
    print(format_report(report))
    return 0


def score(results: dict, n_base: int) -> dict:
    """Average final test loss over the stage columns and mean forgetting of the earlier stages."""
    report = {}
    for method, r in results.items():
        L = np.array(r["matrix"]["matrix"])
        final = L[-1][n_base:]
        entry = {"average_final_loss": float(final.mean()), "final_losses": dict(zip(r["matrix"]["columns"], L[-1])),
                 "trained_evaluations": r["trained_evaluations"], "seconds": r["seconds"]}
        if method != "joint":
            m = summarize(r["matrix"], r["matrix"].get("learned_at"))
            entry["mean_forgetting"] = m["mean_forgetting"] or 0.0  # stages learned before the last one
            entry["backward_transfer"] = m["backward_transfer"]
        report[method] = entry
    if {"naive", "joint", "retention"} <= set(report):
        gap = report["naive"]["average_final_loss"] - report["joint"]["average_final_loss"]
        closed = report["naive"]["average_final_loss"] - report["retention"]["average_final_loss"]
        report["gap_closed_by_retention"] = closed / gap if gap else None
    if {"val_loss", "retention"} <= set(report) and report["val_loss"]["mean_forgetting"]:
        report["forgetting_ratio_retention_vs_val_loss"] = (report["retention"]["mean_forgetting"]
                                                            / report["val_loss"]["mean_forgetting"])
    return report


def format_report(report: dict) -> str:
    lines = ["| method | average final test loss (stages) | mean forgetting | trained evaluations | seconds |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        if method in report:
            r = report[method]
            forget = f"{r['mean_forgetting']:.4f}" if "mean_forgetting" in r else "n/a"
            lines.append(f"| {method} | {r['average_final_loss']:.4f} | {forget} | {r['trained_evaluations']} | "
                         f"{r['seconds']:.0f} |")
    for key in ("gap_closed_by_retention", "forgetting_ratio_retention_vs_val_loss"):
        if report.get(key) is not None:
            lines.append(f"\n{key}: {report[key]:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
