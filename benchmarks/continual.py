"""Continual-learning benchmark: learn each stage like a tuned search, keep earlier domains like naive LoRA?

Methods, on each stream (an experiment YAML: a base with its own domain, then stages), each seed,
every trained adapter running the same ``--steps`` (the joint adapter: steps x stages):

  naive          sequential LoRA with common defaults (r=8, alpha=16, dropout 0.05, lr 2e-4, attention
                 only), merged at full strength after each stage: one fine-tune per stage, no search
  val_loss       evolm selecting on the stage's validation loss only, merged at full strength
  default        evolm as a user gets it: objectives [val_loss, retention_loss], the replay gene, the
                 winner within max_forgetting, merge strength searched
  orthogonality  default plus the orthogonality gene (O-LoRA-style penalty, evolm.interference)
  merge_scale    default, but the strength evolved as a gene (merge_scale) instead of searched after
  tpe            per stage, Optuna TPE on val_loss only (as many trials as val_loss's evaluations),
                 the best merged at full strength: what a user would write by hand
  joint          one adapter trained on every domain's data mixed (the base's own included), searched
                 by evolm on val_loss (the upper bound; not continual)

A stream's pretrained base is built once (<out>/<stream>/base) and loaded by every method and seed,
its pretraining data declared as the base's own domain (``model.domain``); seeds vary the searches.

Usage:
  python benchmarks/continual.py --experiments experiments/quickstart.yaml experiments/system-stream.yaml \
      --seeds 0 1 [--steps 40 --population 4 --generations 1 --methods ...]
Writes <out>/<stream>/seed-<s>/<method>/ (a run directory each), <out>/continual.json, and prints
the tables (loss matrices, average final test loss, forgetting, each stage's own loss right after
learning it, seconds) and the targets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evolm.base import load_base, prepare_base, test_losses  # noqa: E402
from evolm.configfile import parse_config  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.data import example_key, read_documents  # noqa: E402
from evolm.executor import EvalRequest, LocalExecutor, RayExecutor, StagePayload  # noqa: E402
from evolm.genome import evaluation_seed, hyperparameters  # noqa: E402
from evolm.merge import merge_best  # noqa: E402
from evolm.config import DataSource  # noqa: E402
from evolm.models import ModelPayload, family_and_layers, linear_layer_names, save_model  # noqa: E402
from evolm.searchspace import resolve_space, training_defaults  # noqa: E402
from search import from_optuna, optuna_distributions  # noqa: E402

METHODS = ("naive", "val_loss", "default", "orthogonality", "merge_scale", "tpe", "joint")


def fixed(value):
    return {"type": "categorical", "choices": [value]}


def method_config(stream: dict, method: str, seed: int, args, out: Path) -> dict:
    raw = json.loads(json.dumps(stream))
    raw.update(name=f"bench-{method}", output_dir=str(out), seed=seed, prompts=[])
    search = raw["search"]
    search.update(population_size=args.population, offspring_size=args.population, generations=args.generations)
    space = dict(search.get("space") or {}, max_steps=fixed(args.steps))
    if method in ("naive", "val_loss", "joint", "tpe"):
        search.update(objectives=["val_loss"], winner={"rule": "min_first"})
        raw["merge"] = dict(raw.get("merge", {}), strengths=[1.0])
        space["replay_ratio"] = None
    if method == "naive":
        attention = {"gpt2": ["c_attn"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}[args.family]
        space.update(r=fixed(8), lora_alpha=fixed(16), lora_dropout=fixed(0.05), target_modules=fixed(attention),
                     layers=None, learning_rate=fixed(2e-4), weight_decay=fixed(0.0), warmup_ratio=fixed(0.0))
        search.update(population_size=2, generations=0)  # every genome is the same: one fine-tune
    elif method == "orthogonality":
        space["orthogonality"] = {"type": "categorical", "choices": [0.0, 0.1, 1.0, 10.0]}
    elif method == "merge_scale":
        space["merge_scale"] = {"type": "uniform", "low": 0.2, "high": 1.0}
        raw["merge"] = dict(raw.get("merge", {}), strengths=[1.0])
    elif method == "joint":
        space["max_steps"] = fixed(args.steps * len(raw["stages"]))
        raw["stages"] = [joint_stage(raw, out)]
        raw["model"]["domain"] = None
    search["space"] = space
    return raw


def joint_stage(raw: dict, out: Path) -> dict:
    """Every domain's training documents in one JSON-lines file (splits are derived by hashing each
    document, so a document lands in the split it has in its own stage)."""
    config = parse_config(raw)
    path = out / "joint.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    sources = ([config.model.own_domain] if config.model.own_domain else []) + list(config.stages)
    with open(path, "w", encoding="utf-8") as f:
        for source in sources:
            for doc in read_documents(source, source.train):
                f.write(json.dumps({"text": example_key(doc)}) + "\n")  # Q&A as its whole text
    return {"name": "joint", "format": "jsonl", "train": str(path), "text_field": "text"}


def joint_matrix(stream: dict, run_dir: Path) -> list[list[float]]:
    """Rows base and joint on the stream's own domains."""
    config = parse_config(stream)
    rows = []
    for stage_dir in ("stage-0", "stage-1"):
        base = load_base(config, model_dir=str(run_dir / "models" / stage_dir))
        rows.append(test_losses(base.model, base.domains, config.training.eval_batch_size))
    return rows


def run_tpe(stream: dict, seed: int, args, run_dir: Path) -> list[list[float]]:
    """Per stage: Optuna TPE on val_loss (batches of ``workers``, constant liar) on the Ray workers,
    as many trials as evolm's val_loss search trains; the best adapter merged at full strength."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = parse_config(method_config(stream, "tpe", seed, args, run_dir.parent))
    base = prepare_base(config)
    family, n_layers = family_and_layers(base.model)
    linear = linear_layer_names(base.model)
    space, training = resolve_space(config, family, n_layers, linear), training_defaults(config, family, linear)
    matrix, trials = [test_losses(base.model, base.domains, training["eval_batch_size"])], args.population * (1 + args.generations)
    executor = LocalExecutor() if args.no_ray else RayExecutor(config.ray)
    try:
        for k in range(1, len(config.stages) + 1):
            domain = base.stage_domain(k)
            executor.set_stage(StagePayload(f"tpe-{seed}-{k}", ModelPayload.of(base.model),
                                            {s: domain.blocks[s] for s in ("train", "validation")}, training))
            sampler = optuna.samplers.TPESampler(seed=seed * 100 + k, constant_liar=True)
            study, best = optuna.create_study(direction="minimize", sampler=sampler), None
            for start in range(0, trials, config.ray.num_workers):
                batch = [study.ask(optuna_distributions(space)) for _ in range(min(config.ray.num_workers, trials - start))]
                values = {f"tpe-{t.number}": from_optuna(space, t.params) for t in batch}
                results = {}
                executor.map([EvalRequest(tag, hyperparameters(v, training), evaluation_seed(seed, k, tag))
                              for tag, v in values.items()], lambda r: results.__setitem__(r["genome_id"], r))
                for t in batch:
                    r = results[f"tpe-{t.number}"]
                    loss = r["objectives"]["val_loss"] if r["status"] == "ok" else math.inf
                    study.tell(t, loss if math.isfinite(loss) else None,
                               state=None if math.isfinite(loss) else optuna.trial.TrialState.FAIL)
                    if math.isfinite(loss) and (best is None or loss < best[0]):
                        best = (loss, hyperparameters(values[f"tpe-{t.number}"], training), r["adapter"])
            base.model = merge_best(base.model, best[1], best[2])
            matrix.append(test_losses(base.model, base.domains, training["eval_batch_size"]))
    finally:
        executor.close()
    return matrix


def run_method(stream: dict, method: str, seed: int, args, out: Path) -> dict:
    run_dir = out / method
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own output of an earlier run
    start = time.time()
    if method == "tpe":
        return {"matrix": run_tpe(stream, seed, args, run_dir), "seconds": time.time() - start}
    config = parse_config(method_config(stream, method, seed, args, out))
    executor = (lambda: LocalExecutor()) if args.no_ray else (lambda: RayExecutor(config.ray))
    summaries = ContinualRun(config, run_dir, executor).run()
    matrix = (joint_matrix(stream, run_dir) if method == "joint"
              else json.loads((run_dir / "loss_matrix.json").read_text())["matrix"])
    return {"matrix": matrix, "seconds": time.time() - start,
            "strengths": [s.merge_strength for s in summaries], "evaluations": sum(s.evaluations for s in summaries)}


def measures(matrix: list[list[float]], n_base: int, joint: bool) -> dict:
    """Average final test loss over all domains; for a continual method also the forgetting of each
    earlier domain (final minus right after learning it; the base's own: minus the base's) and each
    stage's own test loss right after learning it."""
    L = np.array(matrix)
    out = {"average_final_loss": float(L[-1].mean())}
    if joint:
        return out
    n_stages = L.shape[0] - 1
    learned_row = [0] * n_base + list(range(1, n_stages + 1))
    earlier = range(L.shape[1] - 1)  # every domain but the last stage's
    out["forgetting"] = [float(L[-1, j] - L[learned_row[j], j]) for j in earlier]
    out["mean_forgetting"] = float(np.mean(out["forgetting"]))
    out["own_after_learning"] = [float(L[k, n_base + k - 1]) for k in range(1, n_stages + 1)]
    return out


def targets(per_seed: dict) -> dict:
    """The issue's three targets, on the median over seeds."""
    med = {m: {"average_final_loss": statistics.median(r["average_final_loss"] for r in runs)}
           for m, runs in per_seed.items()}
    for m, runs in per_seed.items():
        if "mean_forgetting" in runs[0]:
            med[m]["mean_forgetting"] = statistics.median(r["mean_forgetting"] for r in runs)
            med[m]["own_after_learning"] = [statistics.median(v) for v in zip(*(r["own_after_learning"] for r in runs))]
    out = {"median": med}
    for m in ("default", "orthogonality", "merge_scale"):
        if m not in med:
            continue
        t = {"mean_forgetting": med[m]["mean_forgetting"], "forgetting_met": med[m]["mean_forgetting"] <= 0.10}
        if "val_loss" in med:
            gap = max(a - b for a, b in zip(med[m]["own_after_learning"], med["val_loss"]["own_after_learning"]))
            t.update(own_loss_gap_to_val_loss=gap, own_loss_met=gap <= 0.10)
        if {"naive", "joint"} <= set(med):
            span = med["naive"]["average_final_loss"] - med["joint"]["average_final_loss"]
            closed = (med["naive"]["average_final_loss"] - med[m]["average_final_loss"]) / span if span else None
            t.update(share_of_naive_to_joint=closed, average_met=closed is not None and closed >= 0.9)
        out[m] = t
    return out


def format_stream(name: str, columns: list[str], results: dict, report: dict) -> str:
    lines = [f"### {name}", "", "| method | average final test loss | mean forgetting | forgetting per earlier domain "
             "| own test loss right after learning | seconds |", "|---|---|---|---|---|---|"]
    for m, runs in results.items():
        med = report["median"][m]
        forget = (f"{med['mean_forgetting']:.3f}" if "mean_forgetting" in med else "n/a")
        per = ("; ".join(f"{c} " + "/".join(f"{r['forgetting'][j]:+.3f}" for r in runs)
                         for j, c in enumerate(columns[:-1])) if "forgetting" in runs[0] else "n/a")
        own = ("; ".join(f"{v:.3f}" for v in med["own_after_learning"]) if "own_after_learning" in med else "n/a")
        secs = statistics.median(r["seconds"] for r in runs)
        lines.append(f"| {m} | {med['average_final_loss']:.3f} | {forget} | {per} | {own} | {secs:.0f} |")
    for m in ("default", "orthogonality", "merge_scale"):
        if m in report:
            lines.append(f"\n{m}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in report[m].items()))
    return "\n".join(lines)


def shared_base(stream: dict, out: Path, args) -> dict:
    """The stream with its pretrained base built once and loaded by every method and seed: the
    pretraining data stays the base's own domain (``model.domain``), so nothing else changes."""
    pretrain = stream["model"].get("pretrain")
    if not pretrain:
        return stream
    base_dir = out / "base"
    if not (base_dir / "config.json").exists():
        config = parse_config(stream)
        base = prepare_base(config)
        save_model(base.model, base.tokenizer, base_dir)
    domain_fields = set(DataSource.model_fields) | {"name"}
    model = {"name_or_path": str(base_dir.resolve()), "dtype": stream["model"]["dtype"],
             "domain": {k: v for k, v in pretrain.items() if k in domain_fields}}
    return dict(stream, model=model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=Path, nargs="+",
                        default=[Path("experiments/quickstart.yaml"), Path("experiments/system-stream.yaml")])
    parser.add_argument("--out", type=Path, default=Path("results/bench-continual"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=40, help="training steps of every adapter")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--pretrain-steps", type=int, help="override model.pretrain.max_steps (a quick check)")
    parser.add_argument("--reuse", type=Path, help="a continual.json whose runs of the methods not given "
                        "in --methods are taken as they are (rerun only what changed)")
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args(argv)
    summary = args.out / "continual.json"  # streams benchmarked by earlier invocations are kept in it
    everything, texts = json.loads(summary.read_text())["streams"] if summary.exists() else {}, []
    for path in args.experiments:
        raw = yaml.safe_load(path.read_text())
        config = parse_config(raw, base_dir=path.parent)
        stream = json.loads(json.dumps(config.model_dump(mode="json")))
        if args.pretrain_steps is not None and stream["model"].get("pretrain"):  # before the base is built
            stream["model"]["pretrain"]["max_steps"] = args.pretrain_steps
        args.family = config.model.build.family if config.model.build else "llama"
        stream = shared_base(stream, args.out / config.name, args)
        n_base = 1 if config.model.own_domain else 0
        columns = ([config.model.own_domain.name] if n_base else []) + [s.name for s in config.stages]
        results = {}
        if args.reuse:
            earlier = json.loads(args.reuse.read_text())["streams"].get(config.name, {}).get("results", {})
            results = {m: runs for m, runs in earlier.items() if m not in args.methods}
        for method in args.methods:
            for seed in args.seeds:
                out = args.out / config.name / f"seed-{seed}"
                r = run_method(stream, method, seed, args, out)
                r.update(measures(r["matrix"], n_base, method == "joint"))
                results.setdefault(method, []).append(r)
                print(f"{config.name} seed {seed} {method}: average final {r['average_final_loss']:.3f}"
                      f" forgetting {r.get('mean_forgetting', float('nan')):.3f} in {r['seconds']:.0f}s", flush=True)
        results = {m: results[m] for m in METHODS if m in results}
        report = targets(results)
        everything[config.name] = {"columns": columns, "results": results, "report": report}
        texts.append(format_stream(config.name, columns, results, report))
        summary.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "streams": everything}, indent=2))
    print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
