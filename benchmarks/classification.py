"""Classification benchmark, the paper's shape: a pretrained encoder learning Debian sections stage by stage.

Methods, each seed, on the same stream (an experiment YAML of classification stages), every method of
a stage training as many steps in total as evolm's search did in that stage:

  default      one LoRA fine-tune per stage with the training defaults (r=8, alpha=16, dropout 0.05,
               lr 2e-4, attention only), trained for evolm's steps, merged at full strength
  default@50   the same with the default max_steps (50): what a user gets without any tuning
  tpe          per stage, Optuna TPE over evolm's search space, maximising validation accuracy, trials
               until evolm's steps are spent; the best merged at full strength
  evolm        the experiment as a user runs it (``evolm run``: forgetting-aware defaults with the
               experiment's forgetting budget, replay and merge strength searched), on Ray with the
               experiment's workers
  evolm-f0.05  the same with the library's default budget ``search.winner.max_forgetting: 0.05``: the
               search, and so the steps, are the same; only later stages' winner and merge strength differ

After each stage every method's model is measured on every stage's test split: the accuracy matrix.
Reported: each stage's accuracy right after learning it, the final average accuracy over all stages,
forgetting (best accuracy since learned minus final), steps and seconds.

Usage:
  python benchmarks/classification.py --experiment experiments/debian-sections.yaml --seeds 0 1 2
Writes <out>/seed-<s>/<method>/ (evolm: a run directory), <out>/classification.json, and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
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

from evolm.base import load_base, test_accuracies  # noqa: E402
from evolm.configfile import parse_config  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.executor import LocalExecutor, RayExecutor  # noqa: E402
from evolm.genome import evaluation_seed, hyperparameters  # noqa: E402
from evolm.merge import merge_best  # noqa: E402
from evolm.models import family_and_layers, linear_layer_names, uses_conv1d  # noqa: E402
from evolm.objectives import resolve_objective  # noqa: E402
from evolm.replay import ReplayBuffer  # noqa: E402
from evolm.searchspace import resolve_space, training_defaults  # noqa: E402
from evolm.train import evaluate_genome  # noqa: E402
from search import from_optuna, optuna_distributions  # noqa: E402

METHODS = ("evolm", "evolm-f0.05", "default", "default@50", "tpe")


def experiment(path: Path, seed: int, out: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    for stage in raw["stages"]:  # paths relative to the experiment file
        for split in ("train", "validation", "test"):
            if stage.get(split):
                stage[split] = str((path.parent / stage[split]).resolve())
    if raw["model"].get("name_or_path") and not Path(raw["model"]["name_or_path"]).is_absolute():
        raw["model"]["name_or_path"] = str((path.parent / raw["model"]["name_or_path"]).resolve())
    raw.update(seed=seed, output_dir=str(out))
    return raw


def run_evolm(raw: dict, run_dir: Path, workers: int) -> dict:
    cfg = parse_config(raw)
    start = time.perf_counter()
    ContinualRun(cfg, run_dir, lambda: RayExecutor(cfg.ray, workers=workers) if workers > 1 else LocalExecutor(threads=1)).run()
    matrix = json.loads((run_dir / "loss_matrix.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"accuracy": matrix["accuracy"], "steps": [s["steps"] for s in summary["stages"]],
            "seconds": time.perf_counter() - start}


def run_sequential(raw: dict, method: str, steps: list[int], seed: int) -> dict:
    """default / default@50 / tpe: one stage after another in this process, each stage's best adapter
    merged into the model at full strength."""
    cfg = parse_config(raw)
    base = load_base(cfg)
    model = base.model
    family, n_layers = family_and_layers(model)
    linear = linear_layer_names(model)
    training = training_defaults(cfg, family, linear, uses_conv1d(model))
    space = resolve_space(cfg, family, n_layers, linear)
    replay = ReplayBuffer(cfg.replay.buffer_blocks, seed)
    accuracy, used, start = [test_accuracies(model, base.domains, training["eval_batch_size"])], [], time.perf_counter()
    for k, domain in enumerate(base.domains, 1):
        blocks = {"train": domain.blocks["train"], "validation": domain.blocks["validation"]}
        if len(replay):
            blocks["replay"] = replay.blocks()
        if method == "tpe":
            hp, adapter, spent = tpe_stage(model, blocks, space, training, steps[k - 1], seed, k, base.device)
        else:
            n = training["max_steps"] if method == "default@50" else steps[k - 1]
            hp = hyperparameters({"max_steps": n}, training)
            adapter = evaluate_genome(model, blocks, hp, evaluation_seed(seed, k, method), training, base.device)["adapter"]
            spent = n
        model = merge_best(model, hp, adapter)
        replay.add(domain.name, domain.blocks["train"])
        accuracy.append(test_accuracies(model, base.domains, training["eval_batch_size"]))
        used.append(spent)
    return {"accuracy": accuracy, "steps": used, "seconds": time.perf_counter() - start}


def tpe_stage(model, blocks, space, training, budget: int, seed: int, k: int, device):
    """Optuna TPE on validation accuracy until ``budget`` training steps are spent; the best trial's
    (hyperparameters, adapter, steps spent)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed + 1000 * k))
    dists, spent, best = optuna_distributions(space), 0, None
    accuracy = resolve_objective("accuracy")
    while spent < budget:
        trial = study.ask(dists)
        values = from_optuna(space, trial.params)
        values["max_steps"] = min(int(values.get("max_steps", training["max_steps"])), budget - spent)
        hp = hyperparameters(values, training)
        result = evaluate_genome(model, blocks, hp, evaluation_seed(seed, k, f"tpe{trial.number}"), training, device,
                                 objectives=[accuracy])
        spent += result["steps"]
        score = -result["objectives"]["accuracy"]
        study.tell(trial, score)
        if best is None or score > best[0]:
            best = (score, hp, result["adapter"])
    return best[1], best[2], spent


def summarise(result: dict) -> dict:
    acc = np.array(result["accuracy"])
    n = acc.shape[1]
    own = [float(acc[k + 1, k]) for k in range(n)]
    forgetting = [float(acc[k + 1:, k].max() - acc[-1, k]) for k in range(n - 1)]
    return {"own": own, "final_average": float(acc[-1].mean()), "forgetting": forgetting,
            "mean_forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
            "steps": result["steps"], "seconds": result["seconds"], "matrix": result["accuracy"]}


def table(per_seed: dict, methods: list[str]) -> str:
    def med(values):
        return statistics.median(values)

    lines = ["| method | " + " | ".join(f"stage {k + 1} acc" for k in range(len(next(iter(per_seed.values()))[methods[0]]["own"])))
             + " | final average acc | mean forgetting | steps (first seed) | seconds |",
             "|---" * (5 + len(next(iter(per_seed.values()))[methods[0]]["own"])) + "|"]
    for m in methods:
        rows = [per_seed[s][m] for s in per_seed]
        own = [med([r["own"][k] for r in rows]) for k in range(len(rows[0]["own"]))]
        spread = max(r["final_average"] for r in rows) - min(r["final_average"] for r in rows)
        lines.append(f"| {m} | " + " | ".join(f"{a:.3f}" for a in own)
                     + f" | {med([r['final_average'] for r in rows]):.3f} (spread {spread:.3f})"
                     + f" | {med([r['mean_forgetting'] for r in rows]):.3f}"
                     + f" | {'+'.join(str(int(s)) for s in rows[0]['steps'])} | {med([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/debian-sections.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results/bench-classification"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--workers", type=int, default=2, help="Ray workers for evolm (1: in this process)")
    args = parser.parse_args(argv)
    report_path = args.out / "classification.json"
    per_seed = json.loads(report_path.read_text()) if report_path.exists() else {}
    for seed in args.seeds:
        out = args.out / f"seed-{seed}"
        raw = experiment(args.experiment, seed, out)
        results = per_seed.setdefault(str(seed), {})
        if "evolm" not in results:
            import shutil
            shutil.rmtree(out / "evolm", ignore_errors=True)
            results["evolm"] = summarise(run_evolm(raw, out / "evolm", args.workers))
        for method in (m for m in args.methods if m != "evolm"):
            if method in results:
                pass
            elif method == "evolm-f0.05":
                variant = raw | {"search": raw["search"] | {"winner": {"max_forgetting": 0.05}}}
                import shutil
                shutil.rmtree(out / method, ignore_errors=True)
                results[method] = summarise(run_evolm(variant, out / method, args.workers))
            else:
                results[method] = summarise(run_sequential(raw, method, results["evolm"]["steps"], seed))
            print(f"seed {seed} {method}: final average accuracy {results[method]['final_average']:.3f}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(per_seed, indent=2))
    methods = [m for m in METHODS if all(m in per_seed[s] for s in per_seed)]
    print(table(per_seed, methods))
    gain = statistics.median(per_seed[s]["evolm"]["final_average"] - per_seed[s]["default"]["final_average"]
                             for s in per_seed)
    print(f"evolm - default (equal steps), median final average accuracy: {gain:+.3f} (target >= +0.11)")
    if "tpe" in methods:
        ahead = statistics.median(per_seed[s]["evolm"]["final_average"] - per_seed[s]["tpe"]["final_average"]
                                  for s in per_seed)
        print(f"evolm - tpe (equal steps): {ahead:+.3f} (target > 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
