"""The search space against what the fine-tune accepts and what the model has, checked before training."""
import subprocess

import pytest

import evolm
from evolm.configfile import parse_config
from evolm.errors import ConfigError
from evolm.models import linear_layer_names, save_model, train_tokenizer
from evolm.searchspace import target_module_choices
from tests.conftest import ROOT, tiny_experiment, write_experiment
from tests.test_resume import env, evolm_cmd


@pytest.mark.parametrize("gene, spec, says", [
    ("r", {"type": "categorical", "choices": [0, 4]}, "space.r: value 0 is outside what the fine-tune accepts: r must be a whole number >= 1"),
    ("r", {"type": "uniform", "low": 2.0, "high": 8.0}, "r must be a whole number"),
    ("lora_dropout", {"type": "uniform", "low": 0.0, "high": 1.5}, "lora_dropout must be in [0, 1)"),
    ("per_device_train_batch_size", {"type": "categorical", "choices": [0, 8]}, "per_device_train_batch_size must be"),
    ("learning_rate", {"type": "uniform", "low": -0.1, "high": 0.1}, "learning_rate must be > 0"),
    ("target_modules", {"type": "categorical", "choices": [[], ["c_attn"]]}, "non-empty list of module names"),
])
def test_ranges_the_fine_tune_would_refuse_are_refused_at_load(corpora, tmp_path, gene, spec, says):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["space"][gene] = spec
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_module_names_the_model_lacks_stop_the_run_before_anything_is_written(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path / "results")
    raw["search"]["space"]["target_modules"] = {"type": "categorical", "choices": [["c_attn"], ["q_proj"]]}
    path = write_experiment(tmp_path / "exp.yaml", raw)
    done = subprocess.run(evolm_cmd("run", path, "--name", "r", "--no-ray"), capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: search.space.target_modules: q_proj is not a linear layer of this gpt2 model "
        "(its linear layers: c_attn, c_proj, c_fc); use those names"]
    assert not (tmp_path / "results" / "r").exists()


def gpt_neox_dir(corpora, where):
    """A GPT-NeoX model (an architecture outside evolm's table) saved with its own tokenizer."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    tokenizer = train_tokenizer((corpora / "general.txt").read_text().split("\n\n"), 400)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    save_model(AutoModelForCausalLM.from_config(cfg), tokenizer, where)
    return where


def test_an_architecture_outside_the_table_gets_module_choices_from_its_own_layers(corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = gpt_neox_dir(corpora, tmp_path / "neox")
    linear = linear_layer_names(AutoModelForCausalLM.from_pretrained(model_dir))
    choices = target_module_choices("gpt_neox", linear)
    assert choices == [["query_key_value"], ["query_key_value", "dense"],
                       ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]]
    raw = tiny_experiment(corpora, tmp_path)
    raw["model"] = {"name_or_path": str(model_dir)}
    raw["stages"] = raw["stages"][:1]
    raw["search"].update(population_size=3, offspring_size=2, generations=1)
    evolm.run(raw, tmp_path / "run", executor="local")
    run = evolm.load_run(tmp_path / "run")
    assert run.evaluated() and all(e.ok for e in run.evaluated())
    assert {tuple(e.values["target_modules"]) for e in run.evaluations} <= {tuple(c) for c in choices}
    assert run.config["training"]["target_modules"] == ["query_key_value"]


def test_a_conv1d_model_outside_gpt2_trains_and_merges(corpora, tmp_path):
    """OpenAI GPT stores its linear weights transposed (Conv1D) as GPT-2 does: evolm tells from the layers."""
    from transformers import AutoModelForCausalLM, OpenAIGPTConfig

    tokenizer = train_tokenizer((corpora / "general.txt").read_text().split("\n\n"), 400)
    cfg = OpenAIGPTConfig(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    save_model(AutoModelForCausalLM.from_config(cfg), tokenizer, tmp_path / "gpt")
    raw = tiny_experiment(corpora, tmp_path)
    raw["model"] = {"name_or_path": str(tmp_path / "gpt")}
    raw["stages"] = raw["stages"][:1]
    raw["search"].update(population_size=2, offspring_size=2, generations=0)
    raw["merge"] = {"method": "task_arithmetic", "top_k": 2}
    summaries = evolm.run(raw, tmp_path / "run", executor="local")
    assert summaries[0].end_loss < summaries[0].start_loss
    assert evolm.load_run(tmp_path / "run").config["training"]["fan_in_fan_out"] is True


def test_an_objective_module_that_fails_to_import_is_one_line(corpora, tmp_path, monkeypatch):
    (tmp_path / "broken_metric.py").write_text("def score(ctx:\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["objectives"] = ["val_loss", "broken_metric:score"]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "broken_metric:score" in str(err.value) and "SyntaxError" in str(err.value)
