"""Sequence classification stages: labelled rows, a classifier head trained with LoRA and merged,
accuracy and macro-F1, the accuracy matrix, evolm predict, and the bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evolm.base import load_base
from evolm.classify import macro_f1
from evolm.configfile import parse_config
from evolm.continual import ContinualRun
from evolm.errors import ConfigError, DataError, ModelError
from evolm.executor import LocalExecutor
from evolm.merge import lora_deltas, merge_winners
from evolm.models import linear_layer_names, load_model, uses_conv1d
from evolm.searchspace import training_defaults
from evolm.train import evaluate_genome
from tests.conftest import ROOT, write_labelled


@pytest.fixture(scope="module")
def labelled(corpora, tmp_path_factory) -> dict[str, Path]:
    return write_labelled(corpora, tmp_path_factory.mktemp("labelled"),
                          {"kinds": ["prose", "code"], "more": ["docstring", "qa"], "all": ["prose", "code", "qa"]})


def experiment(labelled, out: Path, family="bert", stages=("kinds", "more"), **overrides) -> dict:
    raw = {"name": "cls", "seed": 3, "block_size": 48, "output_dir": str(out),
           "model": {"build": {"family": family, "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 400}},
           "stages": [{"name": s, "format": "classification", "train": str(labelled[s])} for s in stages],
           "search": {"population_size": 3, "offspring_size": 3, "generations": 1,
                      "space": {"max_steps": {"type": "int", "low": 6, "high": 12}}},
           "training": {"per_device_train_batch_size": 8, "eval_batch_size": 16, "eval_max_batches": 2,
                        "learning_rate": 0.01},
           "prompts": ["def main():\n    return 0"]}
    raw.update(overrides)
    return raw


def test_rows_carry_text_mask_and_class(labelled, tmp_path):
    base = load_base(parse_config(experiment(labelled, tmp_path)))
    assert base.classes == ["code", "docstring", "prose", "qa"]  # every stage's training classes, sorted
    rows = base.domains[0].blocks["train"]
    assert rows.dtype.names == ("input_ids", "attention_mask", "label")
    assert set(np.unique(rows["label"])) == {0, 2}  # stage 'kinds' holds code and prose
    lengths = rows["attention_mask"].sum(1)
    assert lengths.min() >= 1 and (rows["input_ids"][rows["attention_mask"] == 0] == base.tokenizer.pad_token_id).all()
    assert base.model.config.id2label == {0: "code", 1: "docstring", 2: "prose", 3: "qa"}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_an_evaluation_trains_the_head_and_measures_accuracy(labelled, tmp_path, family):
    cfg = parse_config(experiment(labelled, tmp_path, family=family, stages=("all",)))
    base = load_base(cfg)
    training = training_defaults(cfg, base.model.config.model_type, linear_layer_names(base.model),
                                 uses_conv1d(base.model)) | {"eval_max_batches": None}
    hp = training | {"max_steps": 60, "learning_rate": 0.02}
    head_before = {k: v.clone() for k, v in base.model.state_dict().items() if "classifier" in k or "score" in k}
    from evolm.objectives import resolve_objective
    result = evaluate_genome(base.model, base.domains[0].blocks, hp, 0, training, base.device,
                             objectives=[resolve_objective("accuracy")])
    head_keys = [k for k in result["adapter"] if ".lora_" not in k]
    assert head_keys, "the classifier head travels with the adapter"
    for k, v in base.model.state_dict().items():  # the base's own head is untouched by the evaluation
        if k in head_before:
            assert torch.equal(v, head_before[k])
    accuracy = -result["objectives"]["accuracy"]  # stored negated: evolm minimises
    assert 0.0 <= accuracy <= 1.0 and -result["objectives"]["macro_f1"] <= 1.0
    untrained = evaluate_genome(base.model, base.domains[0].blocks, training | {"max_steps": 1, "learning_rate": 1e-6},
                                0, training, base.device)["objectives"]
    assert result["objectives"]["val_loss"] < untrained["val_loss"] - 0.2
    assert accuracy > -untrained["accuracy"] + 0.3, (accuracy, untrained)
    merged = merge_winners(base.model, [(hp, result["adapter"])], "task_arithmetic", [1.0])
    deltas = lora_deltas(base.model, hp, result["adapter"])
    head = next(k for k in deltas if k.startswith(("classifier", "score")))
    assert torch.allclose(dict(merged.named_parameters())[head], torch.from_numpy(
        next(v for k, v in result["adapter"].items() if k.endswith(head))), atol=1e-6)


def test_macro_f1_weighs_every_class_alike():
    true = np.array([0, 0, 0, 0, 1])
    assert macro_f1(np.array([0, 0, 0, 0, 0]), true) == pytest.approx((8 / 9 + 0) / 2)
    assert macro_f1(true.copy(), true) == 1.0


def test_a_classification_run_records_accuracy_and_predicts(labelled, tmp_path):
    run_dir = tmp_path / "run"
    ContinualRun(parse_config(experiment(labelled, tmp_path)), run_dir, lambda: LocalExecutor(threads=1)).run()
    matrix = json.loads((run_dir / "loss_matrix.json").read_text())
    assert len(matrix["accuracy"]) == 3 and all(0 <= a <= 1 for row in matrix["accuracy"] for a in row)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["average_final_accuracy"] == pytest.approx(np.mean(matrix["accuracy"][-1]))
    records = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert all("accuracy" in r["objectives"] and "macro_f1" in r["objectives"] for r in records if r["status"] == "ok")
    sample = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[-1])
    assert sample["text"] in {"code", "docstring", "prose", "qa"} and 0 < sample["probability"] <= 1
    model, _ = load_model(str(run_dir / "models" / "stage-2"))  # a normal Hugging Face classifier
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 4

    env_cmd = [sys.executable, "-m", "evolm.cli"]
    out = subprocess.run(env_cmd + ["predict", str(run_dir), "import os\nos.getcwd()", "--stage", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    label, prob, _ = out.stdout.splitlines()[0].split("\t", 2)
    assert label in {"code", "docstring", "prose", "qa"} and 0 < float(prob) <= 1
    status = subprocess.run(env_cmd + ["status", str(run_dir)], capture_output=True, text=True, cwd=ROOT)
    assert f"average final test accuracy {metrics['average_final_accuracy']:.4f}" in status.stdout
    from evolm.report import write_report
    assert "<h3>Accuracy</h3>" in write_report(run_dir).read_text()
    refused = subprocess.run(env_cmd + ["generate", str(run_dir), "--prompt", "x"], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "evolm predict" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r["stages"].append({"name": "txt", "format": "text", "train": r["stages"][0]["train"]}),
     "stages", "all classification or all text"),
    (lambda r: r["model"].update(labels=["a", "a"]), "model", "each class once"),
    (lambda r: r["model"]["build"].update(family="bert") or r["stages"][0].update(format="jsonl") or r["stages"].pop(),
     "model", "bert is an encoder"),
])
def test_config_mistakes_name_the_field(labelled, tmp_path, change, field, words):
    raw = experiment(labelled, tmp_path)
    change(raw)
    with pytest.raises(ConfigError, match=words):
        parse_config(raw)


def test_data_mistakes_say_which_line_and_how_to_fix(labelled, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: no field 'label'.*label_field"):
        load_base(parse_config(experiment(labelled, tmp_path) | {"stages": [
            {"name": "bad", "format": "classification", "train": str(bad)}]}))
    validation = tmp_path / "val.jsonl"
    validation.write_text(json.dumps({"text": "what is this", "label": "poetry"}) + "\n")
    with pytest.raises(DataError, match="label 'poetry' is not a class of the training data"):
        load_base(parse_config(experiment(labelled, tmp_path, stages=("kinds",)) | {"stages": [
            {"name": "kinds", "format": "classification", "train": str(labelled["kinds"]),
             "validation": str(validation)}]}))
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"t{i}", "label": "only"}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match="at least two classes"):
        load_base(parse_config(experiment(labelled, tmp_path) | {"stages": [
            {"name": "one", "format": "classification", "train": str(one)}]}))


def test_a_saved_head_of_other_classes_is_refused(labelled, tmp_path):
    run_dir = tmp_path / "run"
    cfg = experiment(labelled, tmp_path, stages=("kinds",), search={"population_size": 2, "offspring_size": 2,
                     "generations": 0, "space": {"max_steps": {"type": "int", "low": 2, "high": 3}}})
    ContinualRun(parse_config(cfg), run_dir, lambda: LocalExecutor(threads=1)).run()
    with pytest.raises(ModelError, match="classifier has 2 classes, the data has 4"):
        load_model(str(run_dir / "models" / "stage-0"), classes=["a", "b", "c", "d"])
