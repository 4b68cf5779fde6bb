"""The real entry point in a subprocess: a tiny experiment on a real local Ray, and user errors."""
import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, tiny_experiment, write_experiment


def evolm(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "evolm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def test_run_end_to_end_on_local_ray(corpora, tmp_path):
    exp = write_experiment(tmp_path / "tiny.yaml", tiny_experiment(corpora, tmp_path / "results"))
    done = evolm("run", exp, "--name", "smoke", "--workers", "2", "--seed", "11")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "stage 1 code gen 1: best" in out and "stage 2 qa gen 1: best" in out
    table = out[out.index("test loss start -> end"):]
    assert "1 code" in table and "2 qa" in table
    run_dir = tmp_path / "results" / "smoke"
    for name in ("config.yaml", "evaluations.jsonl", "generations.jsonl", "loss_matrix.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert "seed: 11" in (run_dir / "config.yaml").read_text()
    AutoModelForCausalLM.from_pretrained(run_dir / "models" / "stage-2")

    again = evolm("run", exp, "--name", "smoke")
    assert again.returncode == 2 and "already holds a run; resume it" in again.stderr and "Traceback" not in again.stderr


def test_config_error_is_one_line_and_exit_2(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["population_size"] = "lots"
    done = evolm("run", write_experiment(tmp_path / "bad.yaml", raw))
    assert done.returncode == 2
    assert "search.population_size" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")


def test_data_error_is_one_line_and_exit_2(corpora, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"][0]["train"] = str(empty)
    done = evolm("run", write_experiment(tmp_path / "empty.yaml", raw))
    assert done.returncode == 2 and "empty.txt: no documents found" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_help_documents_run():
    done = evolm("run", "--help")
    assert done.returncode == 0
    for flag in ("--name", "--ray-address", "--workers", "--seed"):
        assert flag in done.stdout
