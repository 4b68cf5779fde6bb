"""A long run: many stages of the quickstart's size, with disk, memory and every saved model checked.

    python benchmarks/long_run.py [--experiment experiments/quickstart.yaml] [--rounds 4] [--generations 1]

The experiment's stages are repeated ``--rounds`` times (``code``, ``api-qa``, ``docstrings``, then
``code-2``, ... : the same data again, as a stream that keeps coming back), each searched for
``--generations`` generations on Ray. After every stage it records the run directory's size on disk,
the driver's resident memory and that of each Ray worker that evaluated genomes, and at the end it loads
every ``models/stage-k`` and measures its test loss on the first stage's data. Prints one line per
stage and writes <out>/long_run.json.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
import yaml  # noqa: E402

from evolm.base import load_base  # noqa: E402
from evolm.configfile import parse_config  # noqa: E402
from evolm.continual import ContinualRun  # noqa: E402
from evolm.executor import RayExecutor  # noqa: E402
from evolm.models import load_model  # noqa: E402
from evolm.train import evaluate  # noqa: E402
from memory import MB, MemoryProbe, resident_mb  # noqa: E402



def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class StageProbe(MemoryProbe):
    """After each stage: the run directory's size, the driver's and the workers' RSS (the workers as
    ``memory.MemoryProbe`` finds them)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def generation_end(self, record):
        pass  # one row a stage here, not a generation

    def stage_end(self, summary):
        workers = resident_mb(self.worker_pids)
        row = {"stage": summary.stage, "name": summary.name, "disk_mb": disk_bytes(self.run_dir) / MB,
               "driver_mb": psutil.Process().memory_info().rss / MB, "workers_mb": workers,
               "end_loss": summary.end_loss, "seconds": summary.seconds}
        self.rows.append(row)
        print(f"stage {row['stage']:2d} {row['name']:<14} disk {row['disk_mb']:7.1f} MB  driver {row['driver_mb']:6.0f} MB  "
              f"workers {' '.join(f'{v:.0f}' for v in workers.values())} MB  {row['seconds']:.0f}s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    parser.add_argument("--rounds", type=int, default=4, help="times the experiment's stages are repeated")
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/bench-long-run"))
    args = parser.parse_args(argv)
    raw = yaml.safe_load(args.experiment.read_text())
    base_dir = args.experiment.resolve().parent
    stages = []
    for r in range(args.rounds):
        for stage in raw["stages"]:
            stages.append(stage | {"name": stage["name"] if r == 0 else f"{stage['name']}-{r + 1}"})
    raw.update(stages=stages, output_dir=str(args.out))
    raw["search"] = raw.get("search", {}) | {"generations": args.generations}
    config = parse_config(raw, base_dir=base_dir)
    run_dir = args.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    probe = StageProbe(run_dir)
    ContinualRun(config, run_dir, lambda: RayExecutor(config.ray), probe).run()
    base = load_base(config, model_dir=str(run_dir / "models" / "stage-0"))
    first = base.stage_domain(1).blocks["test"]
    models = []
    for k in range(len(stages) + 1):
        model, _ = load_model(str(run_dir / "models" / f"stage-{k}"))
        models.append(evaluate(model, first, config.training.eval_batch_size))
    print("every stage's model loads; its test loss on the first stage's data:",
          " ".join(f"{x:.3f}" for x in models))
    report = {"stages": probe.rows, "first_stage_loss_by_model": models, "disk_mb": disk_bytes(run_dir) / MB,
              "models_mb": disk_bytes(run_dir / "models") / MB}
    (args.out / "long_run.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
