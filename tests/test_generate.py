"""Generation samples of a real tiny run, ``evolm generate``, and the CLI's errors for run directories."""
import json
import os
import subprocess
import sys

import pytest
import torch

from evolm.jsonfiles import read_jsonl
from evolm.cli import main
from evolm.generate import generate_text, prompt_seed
from evolm.models import load_model
from tests.conftest import ROOT
from tests.tiny_runs import PROMPTS, crashed_copy, make_tiny_run


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    return make_tiny_run(corpora, tmp_path_factory.mktemp("generate") / "tiny")


@pytest.fixture(scope="module")
def stage1(run_dir):
    return load_model(str(run_dir / "models" / "stage-1"))


def traced(model, tokenizer, prompt, **options):
    """``generate_text`` with the token ids it gave the model and the ids it got back, from a spy on
    ``model.generate``: (text, prompt ids the model saw, new ids)."""
    calls, real = [], model.generate

    def spy(input_ids, **kwargs):
        out = real(input_ids, **kwargs)
        calls.append((input_ids.clone(), out.clone()))
        return out

    model.generate = spy
    try:
        text = generate_text(model, tokenizer, prompt, **options)
    finally:
        del model.generate
    [(given, out)] = calls
    assert torch.equal(out[:, : given.shape[1]], given)  # the output continues the prompt, unchanged
    new = out[0, given.shape[1]:].tolist()
    assert text == tokenizer.decode(new, skip_special_tokens=True)  # the text is the new tokens, prompt left out
    return text, given[0].tolist(), new


def greedy_by_hand(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding written out: the arg max of the next-token logits, until EOS or the budget."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tokenizer.eos_token_id:
                break
    return new


def test_samples_have_one_line_per_prompt_per_stage(run_dir):
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [(s["stage"], s["stage_name"], s["prompt"]) for s in samples] == [
        (stage, name, p) for stage, name in ((0, "base"), (1, "code"), (2, "qa")) for p in PROMPTS]
    assert all(isinstance(s["text"], str) for s in samples)


def test_samples_are_reproducible_from_the_saved_models(run_dir):
    """Each stage's samples are its saved model's continuations, seeded per prompt, the same seed at every stage,
    and no longer than sample_max_new_tokens."""
    experiment = json.loads((run_dir / "experiment.json").read_text())
    seed, budget = experiment["seed"], experiment["sample_max_new_tokens"]
    assert (seed, budget) == (7, 6)
    samples = read_jsonl(run_dir / "samples.jsonl")
    for stage in (0, 1, 2):
        model, tokenizer = load_model(str(run_dir / "models" / f"stage-{stage}"))
        recorded = [s for s in samples if s["stage"] == stage]
        assert [s["prompt"] for s in recorded] == PROMPTS
        for i, s in enumerate(recorded):
            text, _, new = traced(model, tokenizer, s["prompt"], max_new_tokens=budget, seed=prompt_seed(seed, i))
            assert text == s["text"], (stage, s["prompt"])
            assert 1 <= len(new) <= budget
    assert prompt_seed(7, 0) != prompt_seed(7, 1) and prompt_seed(7, 0) != prompt_seed(8, 0)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(stage1):
    model, tokenizer = stage1
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate_text(model, tokenizer, "def", max_new_tokens=12, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state did not move
    assert a == generate_text(model, tokenizer, "def", max_new_tokens=12, seed=5)
    torch.manual_seed(999)  # and the caller's random state does not leak in
    assert a == generate_text(model, tokenizer, "def", max_new_tokens=12, seed=5)
    # the seed is really used: different seeds sample different continuations
    assert len({generate_text(model, tokenizer, "def", max_new_tokens=12, seed=s) for s in range(6)}) > 1


@pytest.mark.parametrize("top_k", [0, 1])
def test_greedy_decoding_is_the_arg_max_whatever_the_seed(stage1, top_k):
    model, tokenizer = stage1
    expected = greedy_by_hand(model, tokenizer, "def", 12)
    for seed in (1, 2, 3):
        text, prompt_ids, new = traced(model, tokenizer, "def", max_new_tokens=12, seed=seed, top_k=top_k)
        assert prompt_ids == tokenizer("def")["input_ids"]
        assert new == expected
        assert text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_new_tokens_are_bounded_by_the_request(stage1, budget):
    model, tokenizer = stage1
    for seed in range(3):
        _, prompt_ids, new = traced(model, tokenizer, "def f(x):", max_new_tokens=budget, seed=seed)
        assert prompt_ids == tokenizer("def f(x):")["input_ids"]
        # exactly the budget, unless the model ended the text first
        assert len(new) == budget or (len(new) < budget and new[-1] == tokenizer.eos_token_id)


def test_a_long_prompt_keeps_its_end_within_the_context(stage1):
    model, tokenizer = stage1
    context = model.config.n_positions
    assert context == 32
    long_prompt = "x = 1\n" * 200 + "def"  # far past the 32-token context: the prompt's end is kept
    ids = tokenizer(long_prompt)["input_ids"]
    _, prompt_ids, new = traced(model, tokenizer, long_prompt, max_new_tokens=50, top_k=0)
    assert prompt_ids == ids[-len(prompt_ids):] and len(prompt_ids) == context - 1
    assert len(new) == 1 and len(prompt_ids) + len(new) <= context  # room for one token, not 50
    _, prompt_ids, new = traced(model, tokenizer, "", max_new_tokens=3, top_k=0)
    assert prompt_ids == [tokenizer.eos_token_id] and 1 <= len(new) <= 3  # an empty prompt starts from EOS


def cli_generate(capsys, run_dir, *extra):
    code = main(["generate", str(run_dir), *map(str, extra)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("stage", ["0", None])
def test_generate_prints_text_for_the_base_and_the_last_stage(run_dir, capsys, stage):
    args = ["--prompt", "def", "--max-new-tokens", "8", "--seed", "3"] + (["--stage", stage] if stage else [])
    code, out, err = cli_generate(capsys, run_dir, *args)
    assert code == 0 and err == ""
    model, tokenizer = load_model(str(run_dir / "models" / f"stage-{stage or 2}"))  # default: the last stage
    text, _, new = traced(model, tokenizer, "def", max_new_tokens=8, seed=3)
    assert out == "def" + text + "\n"  # the prompt, then its continuation
    assert 1 <= len(new) <= 8
    assert cli_generate(capsys, run_dir, *args) == (0, out, "")  # the same seed, the same text


def test_generate_greedy_from_the_cli(run_dir, capsys):
    model, tokenizer = load_model(str(run_dir / "models" / "stage-1"))
    expected = tokenizer.decode(greedy_by_hand(model, tokenizer, "def", 5), skip_special_tokens=True)
    for seed in (1, 2):
        args = ["--stage", "1", "--prompt", "def", "--max-new-tokens", "5", "--top-k", "0", "--seed", seed]
        assert cli_generate(capsys, run_dir, *args) == (0, "def" + expected + "\n", "")


@pytest.mark.parametrize("stage", ["7", "-1"])
def test_a_missing_stage_lists_the_stages_there_are(run_dir, capsys, stage):
    code, out, err = cli_generate(capsys, run_dir, "--stage", stage, "--prompt", "x")
    assert code == 2 and out == ""
    assert err == f"error: {run_dir}: no model for stage {stage}; stages available: 0, 1, 2\n"


def test_a_crashed_run_generates_from_its_last_saved_stage(run_dir, tmp_path, capsys):
    crashed = crashed_copy(run_dir, tmp_path / "crashed")  # stage 2's model was never written
    code, out, err = cli_generate(capsys, crashed, "--prompt", "def", "--max-new-tokens", "6", "--seed", "4")
    model, tokenizer = load_model(str(run_dir / "models" / "stage-1"))
    assert (code, err) == (0, "")
    assert out == "def" + generate_text(model, tokenizer, "def", max_new_tokens=6, seed=4) + "\n"
    code, out, err = cli_generate(capsys, crashed, "--stage", "2", "--prompt", "def")
    assert (code, out) == (2, "") and err.endswith("no model for stage 2; stages available: 0, 1\n")


def test_a_zero_token_budget_is_refused(run_dir, capsys):
    code, out, err = cli_generate(capsys, run_dir, "--prompt", "def", "--max-new-tokens", "0")
    assert (code, out) == (2, "") and err == "error: --max-new-tokens must be at least 1 (got 0)\n"


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
