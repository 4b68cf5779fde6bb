"""Memory: driver and worker resident memory over a long search must stay flat.

    python benchmarks/memory.py [--experiment experiments/quickstart.yaml] [--generations 10]

Runs the experiment's first stage for ``--generations`` generations on Ray and, after every
generation, reads the resident set size (RSS) of the driver and of each Ray worker that evaluated
genomes (their pids are in the evaluation records). Prints one line per generation and the growth
per generation (least-squares slope over the generations after the first); writes <out>/memory.json.
A worker keeps one base model per stage, so its RSS must not grow with the evaluations it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from evolm.configfile import load_config  # noqa: E402
from evolm.continual import ContinualRun, Reporter  # noqa: E402
from evolm.executor import RayExecutor  # noqa: E402

MB = 1024 * 1024


def resident_mb(pids) -> dict[int, float]:
    """Resident memory (MB) of each process of ``pids`` still alive."""
    out = {}
    for pid in sorted(pids):
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / MB
        except psutil.NoSuchProcess:
            continue
    return out


class MemoryProbe(Reporter):
    def __init__(self):
        self.worker_pids, self.rows = set(), []

    def evaluation_done(self, record):
        if record.worker:
            self.worker_pids.add(int(record.worker.rsplit(":", 1)[1]))

    def generation_end(self, record):
        workers = resident_mb(self.worker_pids)
        row = {"generation": record.generation, "driver_mb": psutil.Process().memory_info().rss / MB,
               "workers_mb": workers}
        self.rows.append(row)
        print(f"gen {row['generation']:>2}: driver {row['driver_mb']:.0f} MB, workers "
              + ", ".join(f"{mb:.0f} MB" for mb in workers.values()), flush=True)


def slope(values: list[float]) -> float:
    """Least-squares growth per generation."""
    return float(np.polyfit(np.arange(len(values)), values, 1)[0]) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/bench-memory"))
    args = parser.parse_args(argv)
    config = load_config(args.experiment, {"search.generations": args.generations, "prompts": []})
    config = config.model_copy(update={"stages": config.stages[:1]})
    probe = MemoryProbe()
    shutil.rmtree(args.out / "run", ignore_errors=True)  # this script's own output of an earlier run
    ContinualRun(config, args.out / "run", lambda: RayExecutor(config.ray), probe).run()
    later = probe.rows[1:]
    result = {"rows": probe.rows, "driver_mb_per_generation": slope([r["driver_mb"] for r in later]),
              "worker_mb_per_generation": {str(pid): slope([r["workers_mb"][pid] for r in later if pid in r["workers_mb"]])
                                           for pid in probe.worker_pids}}
    (args.out / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"driver growth: {result['driver_mb_per_generation']:+.2f} MB / generation")
    for pid, mb in result["worker_mb_per_generation"].items():
        print(f"worker {pid} growth: {mb:+.2f} MB / generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
