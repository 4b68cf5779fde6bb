"""Generation samples of a real tiny run, ``evolm generate``, and the CLI's errors for run directories."""
import os
import subprocess
import sys

import pytest
import torch

from evolm.checkpoint import read_jsonl
from evolm.cli import main
from evolm.generate import generate_text, prompt_seed
from evolm.models import load_model
from tests.conftest import ROOT
from tests.tiny_runs import PROMPTS, make_tiny_run


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    return make_tiny_run(corpora, tmp_path_factory.mktemp("generate") / "tiny")


def test_samples_have_one_line_per_prompt_per_stage(run_dir):
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [(s["stage"], s["stage_name"], s["prompt"]) for s in samples] == [
        (stage, name, p) for stage, name in ((0, "base"), (1, "code"), (2, "qa")) for p in PROMPTS]
    assert all(isinstance(s["text"], str) for s in samples)


def test_samples_are_reproducible_from_the_saved_models(run_dir):
    model, tokenizer = load_model(str(run_dir / "models" / "stage-2"))
    recorded = [s for s in read_jsonl(run_dir / "samples.jsonl") if s["stage"] == 2]
    for i, s in enumerate(recorded):
        assert generate_text(model, tokenizer, s["prompt"], max_new_tokens=6, seed=prompt_seed(7, i)) == s["text"]


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(run_dir):
    model, tokenizer = load_model(str(run_dir / "models" / "stage-1"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate_text(model, tokenizer, "def", max_new_tokens=12, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == generate_text(model, tokenizer, "def", max_new_tokens=12, seed=5)
    greedy = generate_text(model, tokenizer, "def", max_new_tokens=12, seed=1, top_k=0)
    assert greedy == generate_text(model, tokenizer, "def", max_new_tokens=12, seed=2, top_k=0)
    long_prompt = "x = 1\n" * 200  # far past the 32-token context: the prompt's end is kept
    assert isinstance(generate_text(model, tokenizer, long_prompt, max_new_tokens=50), str)
    assert isinstance(generate_text(model, tokenizer, "", max_new_tokens=3), str)


@pytest.mark.parametrize("stage", ["0", None])
def test_generate_prints_text_for_the_base_and_the_last_stage(run_dir, capsys, stage):
    args = ["generate", str(run_dir), "--prompt", "def", "--max-new-tokens", "8", "--seed", "3"]
    assert main(args + (["--stage", stage] if stage else [])) == 0
    out = capsys.readouterr().out
    assert out.startswith("def") and len(out.strip()) > len("def")
    model, tokenizer = load_model(str(run_dir / "models" / f"stage-{stage or 2}"))
    assert out == "def" + generate_text(model, tokenizer, "def", max_new_tokens=8, seed=3) + "\n"


def test_a_missing_stage_lists_the_stages_there_are(run_dir, capsys):
    assert main(["generate", str(run_dir), "--stage", "7", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no model for stage 7" in err and "stages available: 0, 1, 2" in err


def evolm(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evolm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_a_directory_that_is_not_a_run_is_one_error_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    for args in (["plot", tmp_path], ["report", tmp_path], ["generate", tmp_path, "--prompt", "x"],
                 ["plot", tmp_path / "missing"]):
        done = evolm(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert ("not a run directory" in done.stderr) or ("no such run directory" in done.stderr)
    assert not (tmp_path / "plots").exists() and not (tmp_path / "report.html").exists()
