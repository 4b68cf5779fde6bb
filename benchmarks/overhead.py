"""Overhead: evolm's whole search against the fastest raw alternative on the same cores, a pool of
one-thread processes running the same evaluations, and how busy evolm keeps its workers.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/overhead.py [--experiment experiments/quickstart.yaml] \\
        [--stage code] [--population 6 --offspring 6 --generations 3] [--workers 2] [--modes generational,steady_state] \\
        [--max-steps 20 80]

The task is the search benchmark's (``benchmarks/search.py``): one stage of the experiment, its base
model built and pretrained once (``<out>/base``). For each ``--mode`` evolm runs its real path: a
one-stage run on ``--workers`` Ray workers of one thread, generation 0 plus ``--generations``, then
the merge, the loss-matrix row and the stage's model saved; the search is timed from the first
generation's start to the stage's end, so selection, ledger, adapters on disk, checkpoints and the
merge are all inside it. Weight inheritance is off so that every evaluation is one the pool can run
alone. The pool then trains the very genomes evolm trained (same values, same seeds, same base and
blocks) on a ``multiprocessing`` pool of ``--workers`` spawned one-thread processes, each holding the
base already: the fastest plain way to run these evaluations here. Each genome's validation loss
must come out identical on both paths, or the script says so. Two ratios of throughput: without
start-up (evolm from its first generation, the pool once warm) and with it (evolm from Ray's start,
the pool from its creation).

Busy: the share of the workers' time spent in evaluations during evolm's search, sum of the
evaluations' seconds / (search seconds x workers); per generation, and after generation 0. Eval s vs
pool: the same genomes' evaluation seconds (training and validation alone) in evolm's workers over the
pool's, i.e. how much slower an evaluation runs beside Ray's own processes and evolm's driver.
Writes <out>/overhead.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402

from evolm.configfile import parse_config  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.executor import RayExecutor  # noqa: E402
from evolm.genome import evaluation_seed, hyperparameters  # noqa: E402
from evolm.jsonfiles import read_jsonl  # noqa: E402
from evolm.reporting import Reporter  # noqa: E402
from evolm.train import evaluate_genome  # noqa: E402
from search import benchmark_config, prepare_base  # noqa: E402


class SearchClock(Reporter):
    """The search's wall time: from the first generation's start to the stage's end."""

    def __init__(self):
        self.start = self.end = self.made = None

    def generation_start(self, stage, generation, n):
        if self.start is None:
            self.start = time.perf_counter()

    def stage_end(self, summary):
        self.end = time.perf_counter()


def run_evolm(raw: dict, mode: str, workers: int, out: Path) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["search"].update(mode=mode, inherit_weights=False, halving={"rungs": 1})  # whole evaluations, as the pool runs
    config = parse_config(raw)
    run_dir = out / mode
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover ledger would stand in for the evaluations
    clock, sent = SearchClock(), {}

    class Keeping(RayExecutor):  # the stage as the workers get it: the pool gets the same
        def set_stage(self, stage):
            sent["stage"] = stage
            super().set_stage(stage)

    def make():
        ray.shutdown()  # each mode pays Ray's start, as the pool pays its processes'
        clock.made = time.perf_counter()  # Ray's start, for the figure with start-up included
        return Keeping(config.ray, workers=workers)

    run = ContinualRun(config, run_dir, make, clock)
    run.run()
    records = [r for r in read_jsonl(run_dir / "evaluations.jsonl") if not r["cached"]]
    seconds = clock.end - clock.start
    busy = sum(r["seconds"] or 0.0 for r in records) / (seconds * workers)
    per_generation, gens = {}, read_jsonl(run_dir / "generations.jsonl")
    for g in gens:
        mine = [r for r in records if r["generation"] == g["generation"]]
        per_generation[g["generation"]] = round(sum(r["seconds"] or 0.0 for r in mine) / (g["seconds"] * workers), 3)
    # after generation 0 (the starting population, whose barrier and cold workers both modes share)
    later = sum(g["seconds"] for g in gens if g["generation"] > 0)
    busy_later = sum(r["seconds"] or 0.0 for r in records if r["generation"] > 0) / (later * workers) if later else None
    return {"stage": sent["stage"], "seed": config.seed, "seconds": seconds, "busy": busy, "busy_later": busy_later,
            "with_start_seconds": clock.end - clock.made,
            "busy_per_generation": per_generation, "records": records}


# ----- the pool: one-thread processes, each holding the base ----------------------------------------
_WORKER: dict = {}


def _init(stage, seed: int) -> None:
    torch.set_num_threads(1)
    _WORKER.update(stage=stage, model=stage.model.build(), seed=seed)


def _ready(_):
    return os.getpid()


def _evaluate(job: tuple[str, dict]) -> tuple[str, float | None, float]:
    genome_id, values = job
    w, stage = _WORKER, _WORKER["stage"]
    start = time.perf_counter()
    result = evaluate_genome(w["model"], stage.blocks, hyperparameters(values, stage.training),
                             evaluation_seed(w["seed"], 1, genome_id), stage.training, torch.device("cpu"),
                             objectives=stage.objectives, subspaces=stage.subspaces, tokenizer=stage.tokenizer,
                             validation=stage.validation)
    return genome_id, result["objectives"].get("val_loss"), time.perf_counter() - start


def run_pool(evolm: dict, workers: int) -> dict:
    jobs = [(r["genome_id"], r["values"]) for r in evolm["records"]]
    made = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, _init, (evolm["stage"], evolm["seed"])) as pool:
        pool.map(_ready, range(workers * 4), chunksize=1)  # every process started and holding the base
        start = time.perf_counter()
        results = list(pool.imap_unordered(_evaluate, jobs, chunksize=1))
        seconds = time.perf_counter() - start
    evolm_loss = {r["genome_id"]: (r["objectives"] or {}).get("val_loss") for r in evolm["records"]}
    differ = [gid for gid, loss, _ in results if loss != evolm_loss[gid]]
    evaluation_seconds = sum(s for _, _, s in results)
    return {"seconds": seconds, "with_start_seconds": start - made + seconds,
            "evaluations": len(jobs), "losses_differ": differ, "evaluation_seconds": evaluation_seconds,
            "busy": evaluation_seconds / (seconds * workers)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    p.add_argument("--stage", help="the stage to fine-tune on (default: the experiment's first)")
    p.add_argument("--population", type=int, default=6)
    p.add_argument("--offspring", type=int, default=6)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--modes", default="generational,steady_state")
    p.add_argument("--base", type=Path, help="a saved model directory to fine-tune instead of building one")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps of the base (default: the experiment's)")
    p.add_argument("--max-steps", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="the max_steps gene's range (default: the experiment's); longer evaluations make the "
                        "per-stage fixed costs (generation 0, the merge, the saved model) a smaller share")
    p.add_argument("--out", type=Path, default=Path("results/bench-overhead"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config, raw = benchmark_config(args)
    base_dir = prepare_base(config, args)
    raw["model"] = {"name_or_path": str(base_dir.resolve()), "build": None, "pretrain": None}
    raw["prompts"] = []
    if args.max_steps:
        raw["search"]["space"]["max_steps"] = {"type": "int", "low": args.max_steps[0], "high": args.max_steps[1]}
    report = {"max_steps": raw["search"]["space"]["max_steps"], "workers": args.workers,
              "population": args.population, "offspring": args.offspring, "generations": args.generations, "modes": {}}
    for mode in args.modes.split(","):
        evolm = run_evolm(raw, mode, args.workers, args.out)
        pool = run_pool(evolm, args.workers)
        n = len(evolm["records"])
        report["modes"][mode] = {
            "evaluations": n, "evolm_seconds": round(evolm["seconds"], 2), "pool_seconds": round(pool["seconds"], 2),
            "evolm_per_minute": round(60 * n / evolm["seconds"], 2), "pool_per_minute": round(60 * n / pool["seconds"], 2),
            "throughput_vs_pool": round(pool["seconds"] / evolm["seconds"], 3),
            "with_start_evolm_seconds": round(evolm["with_start_seconds"], 2),
            "with_start_pool_seconds": round(pool["with_start_seconds"], 2),
            "with_start_throughput_vs_pool": round(pool["with_start_seconds"] / evolm["with_start_seconds"], 3),
            "busy": round(evolm["busy"], 3), "busy_after_generation_0": round(evolm["busy_later"] or 0.0, 3),
            "busy_per_generation": evolm["busy_per_generation"], "pool_busy": round(pool["busy"], 3),
            # the same genomes' training and validation alone, in evolm's workers against the pool's processes
            "evaluation_seconds_vs_pool": round(sum(r["seconds"] or 0.0 for r in evolm["records"])
                                                / pool["evaluation_seconds"], 3),
            "losses_differ": pool["losses_differ"]}
        print(json.dumps({mode: report["modes"][mode]}), flush=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'mode':<14} {'evals':>5} {'evolm s':>8} {'pool s':>7} {'evolm/pool':>10} {'with start-up':>13} "
          f"{'busy':>5} {'busy after gen 0':>16} {'eval s vs pool':>14}")
    for mode, m in report["modes"].items():
        print(f"{mode:<14} {m['evaluations']:>5} {m['evolm_seconds']:>8.1f} {m['pool_seconds']:>7.1f} "
              f"{m['throughput_vs_pool']:>10.1%} {m['with_start_throughput_vs_pool']:>13.1%} {m['busy']:>5.0%} "
              f"{m['busy_after_generation_0']:>16.0%} {m['evaluation_seconds_vs_pool']:>14.1%}"
              + ("  LOSSES DIFFER" if m["losses_differ"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
