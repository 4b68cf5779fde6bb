"""A real tiny run, in-process, for the tests that read run directories (plots, report, generate)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.executor import LocalExecutor
from tests.conftest import tiny_experiment

PROMPTS = ["def ", "Q: What does json.dumps do?\nA:"]


def make_tiny_run(corpora: Path, run_dir: Path) -> Path:
    """Two stages, one generation each after the first evaluation, two prompts sampled per stage."""
    raw = tiny_experiment(corpora, run_dir.parent, prompts=PROMPTS, sample_max_new_tokens=6)
    ContinualRun(parse_config(raw), run_dir, lambda: LocalExecutor(threads=1)).run()
    return run_dir


def crashed_copy(run_dir: Path, into: Path) -> Path:
    """A copy of a finished run as if it had died in stage 2, generation 1, mid-write: no summary.json,
    stage 2's model and loss-matrix row gone, one evaluation of the last generation logged, a torn line."""
    shutil.copytree(run_dir, into, ignore=shutil.ignore_patterns("plots", "report.html"))
    (into / "summary.json").unlink()
    shutil.rmtree(into / "models" / "stage-2")
    lines = lambda name: (into / name).read_text().splitlines()  # noqa: E731
    gens = [g for g in lines("generations.jsonl") if (json.loads(g)["stage"], json.loads(g)["generation"]) != (2, 1)]
    evals, kept, partial = lines("evaluations.jsonl"), [], 0
    for line in evals:
        e = json.loads(line)
        if (e["stage"], e["generation"]) == (2, 1):
            if partial == 1:
                continue
            partial += 1
        kept.append(line)
    (into / "generations.jsonl").write_text("\n".join(gens) + "\n")
    (into / "evaluations.jsonl").write_text("\n".join(kept) + "\n" + kept[-1][: len(kept[-1]) // 2])
    lm = json.loads((into / "loss_matrix.json").read_text())
    lm["rows"], lm["matrix"] = lm["rows"][:2], lm["matrix"][:2]
    (into / "loss_matrix.json").write_text(json.dumps(lm))
    return into
