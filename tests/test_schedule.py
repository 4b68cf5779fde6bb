"""A winner's schedule: the chain of inherited trainings behind its adapter, replayed into the same adapter."""
import json
import subprocess
import sys

from safetensors.numpy import load_file

from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor
from evolm.schedule import replay
from tests.conftest import ROOT, tiny_experiment


def test_the_winner_schedule_replays_into_the_same_adapter(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"] = raw["stages"][:1]
    raw["search"].update(generations=3, objectives=["val_loss"], immigrant_share=0.0)
    raw["search"]["space"]["orthogonality"] = {"type": "categorical", "choices": [0.0, 1.0]}
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 3, "high": 8}
    raw["search"]["halving"] = {"rungs": 2, "reduction_factor": 2}  # some ancestors stopped early
    raw["seed"] = 3
    run_dir = tmp_path / "run"
    ContinualRun(parse_config(raw), run_dir, lambda: LocalExecutor(threads=1)).run()
    saved = json.loads((run_dir / "adapters" / "stage-1" / "schedule.json").read_text())
    steps = saved["schedule"]
    summary = json.loads((run_dir / "summary.json").read_text())["stages"][0]
    assert steps[-1]["genome_id"] == saved["genome_id"] == summary["merged"][0]
    assert len(steps) >= 2 and steps[0]["inherited_from"] is None  # from a fresh adapter, then inherited
    assert all(b["inherited_from"] == a["genome_id"] for a, b in zip(steps, steps[1:]))
    adapter, diff = replay(run_dir, 1, say=lambda _: None)
    assert diff == 0.0
    kept = load_file(str(run_dir / "adapters" / "stage-1" / f"{saved['genome_id']}.safetensors"))
    assert set(kept) == set(adapter)
    done = subprocess.run([sys.executable, "-m", "evolm.cli", "replay", str(run_dir), "--stage", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "identical" in done.stdout, done.stderr[-2000:]
    missing = subprocess.run([sys.executable, "-m", "evolm.cli", "replay", str(run_dir), "--stage", "4"],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert missing.returncode == 2 and "no schedule for stage 4" in missing.stderr
