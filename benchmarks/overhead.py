"""Overhead: the same genomes trained by the raw ``evaluate_genome`` in a plain loop, then through
evolm's full path (Ray workers, ledger, adapters on disk, checkpoints), in one run, same threads.

    python benchmarks/overhead.py [--experiment experiments/quickstart.yaml] [--genomes 24] [--workers 2]

The raw loop runs the genomes one after another with ``workers x num_cpus_per_trial`` torch threads;
evolm runs them as one generation of its first stage on ``workers`` Ray workers of
``num_cpus_per_trial`` threads each. Both train the same base on the same blocks with the same seeds.
Prints evaluations per minute of each and the ratio; writes <out>/overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from evolm.configfile import load_config  # noqa: E402
from evolm.base import load_base  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.reporting import Reporter  # noqa: E402
from evolm.runstate import fill_replay  # noqa: E402
from evolm.executor import RayExecutor  # noqa: E402
from evolm.genome import evaluation_seed, hyperparameters  # noqa: E402
from evolm.train import evaluate_genome  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--genomes", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/bench-overhead"))
    args = parser.parse_args(argv)
    config = load_config(args.experiment, {"ray.num_workers": args.workers, "prompts": [],
                                           "search.population_size": args.genomes, "search.generations": 0})
    return 0 if run(config, args) else 1


def run(config, args) -> dict:
    # evolm: stage 1's generation 0 evaluates `genomes` random genomes on Ray, with every record written.
    config = config.model_copy(update={"stages": config.stages[:1]})
    run_dir = args.out / "evolm"
    holder = {"genomes": []}

    class Timed(Reporter):  # the generation's wall seconds and its genomes, as the run records them
        def evaluation_done(self, record):
            holder["genomes"].append((record.genome_id, record.values))

        def generation_end(self, record):
            holder["evolm_seconds"] = record.seconds

    shutil.rmtree(run_dir, ignore_errors=True)  # a ledger left by an earlier run would be taken as finished work
    run = ContinualRun(config, run_dir, lambda: RayExecutor(config.ray), Timed())
    run.run()
    # the base, blocks and settings stage 1 searched with: the saved stage-0 model, the run's own domains
    base = load_base(config, model_dir=str(run_dir / "models" / "stage-0"))
    training = run.state.training
    blocks = {s: base.stage_domain(1).blocks[s] for s in ("train", "validation")}
    replay = fill_replay(config, base, 1)
    if len(replay):
        blocks["replay"] = replay.blocks()
    holder.update(base=base.model, blocks=blocks, training=training)

    # raw: the same genomes, same seeds, same base and blocks, a plain loop
    threads = torch.get_num_threads()
    torch.set_num_threads(int(args.workers * config.ray.num_cpus_per_trial))
    start = time.perf_counter()
    for genome_id, values in holder["genomes"]:
        hp = hyperparameters(values, training)
        evaluate_genome(holder["base"], holder["blocks"], hp, evaluation_seed(config.seed, 1, genome_id),
                        training, torch.device("cpu"))
    raw_seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    n = len(holder["genomes"])
    result = {"genomes": n, "workers": args.workers, "raw_seconds": raw_seconds, "evolm_seconds": holder["evolm_seconds"],
              "raw_per_minute": 60 * n / raw_seconds, "evolm_per_minute": 60 * n / holder["evolm_seconds"],
              "ratio": raw_seconds / holder["evolm_seconds"]}
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2))
    print(f"raw loop: {result['raw_per_minute']:.1f} evaluations/min ({raw_seconds:.1f}s for {n})")
    print(f"evolm:    {result['evolm_per_minute']:.1f} evaluations/min ({holder['evolm_seconds']:.1f}s for {n}, "
          f"{args.workers} Ray workers)")
    print(f"evolm / raw throughput: {result['ratio']:.2f}")
    return result


if __name__ == "__main__":
    sys.exit(main())
