"""Your own objective (``module:function``): what it receives on the workers, how it is recorded and
shown, what happens when it misbehaves, and the experiments/ example end to end."""
import importlib
import json
import math
import os
import sys
import uuid
from pathlib import Path

import pytest
import yaml

import evolm
from evolm import data as stage_data
from evolm.cli import main
from evolm.configfile import load_config, parse_config
from evolm.plots import fitness_series, plot_pareto
from evolm.report import write_report
from evolm.status import format_status, run_status
from tests.conftest import ROOT, tiny_experiment, write_experiment

SEEN = {"dir": None}
"""Where the objectives below write what they received (the workers run on this machine). Read when
the function is pickled for the workers, so set it before a run starts."""
HERE = "tests.test_own_objective"


def _seen_in(folder: Path) -> None:
    """Set ``SEEN`` in the module the config imports (``tests.test_own_objective``, which may be
    another copy than the one pytest imported)."""
    folder.mkdir()
    for module in (sys.modules[__name__], importlib.import_module(HERE)):
        module.SEEN["dir"] = str(folder)


def _write(kind: str, what: dict) -> None:
    Path(SEEN["dir"], f"{kind}-{uuid.uuid4().hex}.json").write_text(json.dumps(what))


def three_args(model, tokenizer, validation):
    """The issue's form: the model, the tokenizer, the validation examples."""
    ids = tokenizer("def parse(x):", add_special_tokens=False)["input_ids"]
    x = __import__("torch").tensor([ids], device=model.device)
    _write("three", {"decoded": tokenizer.decode(ids), "validation": validation, "training": model.training,
                     "n_ids": len(ids),
                     "logits": list(model(input_ids=x).logits.shape), "pid": os.getpid()})
    return float(len(ids))


def ctx_form(ctx):
    """The context form, maximised: the number of examples it saw, plus a half."""
    _write("ctx", {"decoded": ctx.tokenizer.decode(ctx.tokenizer("A list is")["input_ids"]),
                   "validation": ctx.validation, "blocks": sorted(ctx.blocks), "pid": os.getpid()})
    return len(ctx.validation) + 0.5


ctx_form.direction = "maximize"


def _once(kind: str) -> bool:
    """True for the first call of ``kind`` in the run, in whichever worker it happens."""
    try:
        os.close(os.open(Path(SEEN["dir"], f"once-{kind}"), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def flaky(ctx):
    """NaN once, an exception once, a string once, else a number."""
    if _once("nan"):
        return float("nan")
    if _once("raise"):
        raise ValueError("boom in my metric")
    if _once("text"):
        return "0.5"
    return 1.0


def one_stage(corpora: Path, out: Path, objectives: list[str], population: int, **training) -> dict:
    raw = tiny_experiment(corpora, out)
    raw["stages"] = raw["stages"][1:]  # qa: its validation examples are question/answer documents
    raw["search"].update(objectives=objectives, population_size=population, offspring_size=2, generations=0)
    raw["training"].update(training)
    return raw


def test_both_forms_receive_the_model_tokenizer_and_validation_examples_on_ray_workers(corpora, tmp_path,
                                                                                       ray_session):
    _seen_in(tmp_path / "seen")
    names = [f"{HERE}:ctx_form", "val_loss", f"{HERE}:three_args"]
    raw = one_stage(corpora, tmp_path, names, population=2, eval_max_examples=5)
    evolm.run(raw, tmp_path / "run", executor="ray")

    config = parse_config(raw)
    expected = stage_data.load_splits(config.stages[0])["validation"][:5]
    seen = [json.loads(p.read_text()) | {"kind": p.name.split("-")[0]} for p in Path(SEEN["dir"]).glob("*.json")]
    assert sorted(s["kind"] for s in seen) == ["ctx", "ctx", "three", "three"]  # each form, each evaluation
    assert all(s["pid"] != os.getpid() for s in seen)  # measured on the workers
    for s in seen:
        assert s["validation"] == expected and len(expected) == 5  # the split's documents, as read, capped
    assert all(s["decoded"] == "def parse(x):" and s["training"] is False and s["logits"][:2] == [1, s["n_ids"]]
               for s in seen if s["kind"] == "three")  # the tokenizer round-trips, the model runs in eval mode
    assert all(s["decoded"] == "A list is" and {"train", "validation", "retention"} <= set(s["blocks"])
               for s in seen if s["kind"] == "ctx")

    # recorded like the built-ins; the maximised one stored negated, shown un-negated where people read it
    run = evolm.load_run(tmp_path / "run")
    assert run.config["search"]["directions"] == {names[0]: "maximize", "val_loss": "minimize",
                                                  names[2]: "minimize"}
    for e in run.evaluated():
        assert e.ok and e.objectives[names[0]] == -5.5 and e.objectives[names[2]] > 0
    assert set(fitness_series(run)["best"]) == {5.5}  # the first objective, un-negated
    pareto = plot_pareto(run, 1, tmp_path)
    assert {x for x, _ in pareto.data["shown"]} == {5.5} and {x for x, _ in pareto.data["points"]} == {-5.5}
    html = write_report(tmp_path / "run").read_text()
    assert f"{names[0]} (higher is better)" in html and "5.5000" in html and "-5.5000" not in html
    status = format_status(run_status(tmp_path / "run"))
    assert f"{names[0]} 5.5000" in status and "-5.5" not in status


def test_nan_exceptions_and_non_numbers_fail_one_evaluation_each_and_the_run_goes_on(corpora, tmp_path,
                                                                                     ray_session):
    _seen_in(tmp_path / "seen")
    name = f"{HERE}:flaky"
    summaries = evolm.run(one_stage(corpora, tmp_path, ["val_loss", name], population=5), tmp_path / "run",
                          executor="ray")
    assert summaries and math.isfinite(summaries[0].end_loss)  # the stage merged a genome that measured fine
    records = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    errors = sorted(r["error"] for r in records if r["status"] == "failed")
    assert len(errors) == 3 and sum(r["status"] == "ok" for r in records) == 2
    nan, text, boom = (next(e for e in errors if key in e) for key in ("returned nan", "'0.5'", "boom"))
    assert nan == (f"objective '{name}' returned nan, not a finite number; make the function return a finite "
                   f"number for every model (a NaN or inf fails the evaluation)")
    assert text.startswith(f"ObjectiveFailed: objective '{name}' returned '0.5' (str), not a number; make it "
                           f"return an int or float")
    assert boom.startswith("ValueError: boom in my metric (raised as ObjectiveFailed: objective "
                           f"'{name}' raised; fix the function or drop it from search.objectives)")
    raised = next(r for r in records if r["error"] == boom)
    assert "in flaky" in raised["traceback"]  # the user's own frames are kept
    assert "boom in my metric" in write_report(tmp_path / "run").read_text()


@pytest.mark.parametrize("objective, module, message", [
    ("no_such_metrics:bleu", None, "objective 'no_such_metrics:bleu' cannot be imported (ModuleNotFoundError: "
                                   "No module named 'no_such_metrics'); check the module is installed, on PYTHONPATH"),
    ("broken_metrics:bleu", "raise RuntimeError('missing sacrebleu')",
     "objective 'broken_metrics:bleu' cannot be imported (RuntimeError: missing sacrebleu)"),
    ("two_metrics:bleu", "def bleu(model, tokenizer):\n    return 0.0",
     "objective 'two_metrics:bleu' takes (model, tokenizer); it must take (model, tokenizer, validation) or (ctx)"),
])
def test_an_objective_that_cannot_be_used_stops_the_cli_with_one_line(corpora, tmp_path, capsys, objective,
                                                                       module, message):
    if module is not None:  # beside the experiment file: importable by its name
        (tmp_path / f"{objective.split(':')[0]}.py").write_text(module)
    raw = one_stage(corpora, tmp_path / "results", ["val_loss", objective], population=2)
    rc = main(["run", str(write_experiment(tmp_path / "exp.yaml", raw))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'exp.yaml'}: search.objectives: ")
    assert message in err
    assert not (tmp_path / "results").exists()  # nothing ran, nothing written


def test_the_experiments_example_runs_end_to_end(corpora, tmp_path, ray_session, capsys):
    """experiments/own-objective.yaml as it stands, shrunk to seconds; its module found beside it."""
    shrink = {"model.build": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 400},
              "block_size": 32, "output_dir": str(tmp_path),
              "model.pretrain.train": str(corpora / "general.txt"), "model.pretrain.max_steps": 10,
              "stages": [yaml.safe_load((ROOT / "experiments" / "own-objective.yaml").read_text())["stages"][0]
                         | {"train": str(corpora / "api_qa.jsonl"), "max_documents": 300}],
              "search.population_size": 2, "search.offspring_size": 2, "search.generations": 1,
              "search.space": {"max_steps": {"type": "int", "low": 2, "high": 4}},
              "training.eval_max_examples": 4, "training.eval_max_batches": 2}
    config = load_config(ROOT / "experiments" / "own-objective.yaml", shrink)
    assert config.search.objectives == ["val_loss", "answer_metrics:answer_f1"]
    evolm.run(config, tmp_path / "run", executor="ray")

    run = evolm.load_run(tmp_path / "run")
    f1 = [e.objectives["answer_metrics:answer_f1"] for e in run.evaluated()]
    assert len(f1) >= 3 and all(e.ok for e in run.evaluated()) and all(-1.0 <= v <= 0.0 for v in f1)
    assert run.run_info["experiment_dir"] == str((ROOT / "experiments").resolve())  # a resume finds the module
    assert main(["status", str(tmp_path / "run")]) == 0
    assert "answer_metrics:answer_f1 " in capsys.readouterr().out
    assert "answer_metrics:answer_f1 (higher is better)" in write_report(tmp_path / "run").read_text()
