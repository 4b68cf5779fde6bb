import pytest
import yaml

from evolm.config import ExperimentConfig
from evolm.configfile import load_config, parse_config
from evolm.searchspace import resolve_space
from evolm.errors import ConfigError
from tests.conftest import tiny_experiment, write_experiment


def error_of(raw, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=tmp_path)
    return str(info.value)


def test_tiny_experiment_is_valid(corpora, tmp_path):
    config = parse_config(tiny_experiment(corpora, tmp_path))
    assert isinstance(config, ExperimentConfig)
    assert [s.name for s in config.stages] == ["code", "qa"]
    assert config.stages[1].format == "qa"


@pytest.mark.parametrize("mutate, field, hint", [
    (lambda r: r.update(bogus=1), "bogus", "unknown key"),
    (lambda r: r["search"].update(population_size="many"), "search.population_size", "integer"),
    (lambda r: r["search"].update(population_size=1), "search.population_size", "greater than or equal to 2"),
    (lambda r: r["stages"][1].update(train="missing.txt"), "stages[1].train", "file not found"),
    (lambda r: r["stages"][0].pop("name"), "stages[0].name", "missing"),
    (lambda r: r["stages"][0].update(format="csvish"), "stages[0].format", "'text', 'jsonl', 'qa' or 'classification'"),
    (lambda r: r["search"]["space"].update(r={"type": "int", "low": 9, "high": 2}), "search.space.r", "low must be <= high"),
    (lambda r: r["search"]["space"].update(learning_rate={"type": "log_uniform", "low": 0, "high": 1}),
     "search.space.learning_rate", "0 < low"),
    (lambda r: r["search"]["space"].update(r={"type": "categorical", "choices": []}), "search.space.r.choices", "at least 1"),
    (lambda r: r["search"]["space"].update(r={"type": "gaussian"}), "search.space.r", "gene types are"),
    (lambda r: r["search"]["space"].update(lr={"type": "uniform", "low": 0, "high": 1}), "space.lr", "unknown gene"),
    (lambda r: r["model"].update(name_or_path="x"), "model", "exactly one of"),
    (lambda r: r["model"]["build"].update(n_head=3), "model.build", "divisible"),
    (lambda r: r["stages"].append(dict(r["stages"][0])), "stage names must be unique", "code"),
    (lambda r: r["search"].update(crossover_prob=0.8, mutation_prob=0.5), "search", "<= 1"),
])
def test_config_errors_name_the_field(corpora, tmp_path, mutate, field, hint):
    raw = tiny_experiment(corpora, tmp_path)
    mutate(raw)
    message = error_of(raw, tmp_path)
    assert field in message and hint in message, message


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: malformed YAML"):
        load_config(path)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_against_the_experiment(corpora, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "code.txt").write_text((corpora / "code.txt").read_text())
    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"][0]["train"] = "data/code.txt"
    config = load_config(write_experiment(tmp_path / "x.yaml", raw), {"seed": 3})
    assert config.stages[0].train == (tmp_path / "data" / "code.txt").resolve()
    assert config.seed == 3


def test_resolved_space_merges_defaults_and_yaml(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["space"]["weight_decay"] = None
    space = resolve_space(parse_config(raw), "gpt2", n_layers=2)
    assert "weight_decay" not in space
    assert space["max_steps"].high == 6
    assert space["layers"].n_layers == 2
    assert ["c_attn"] in space["target_modules"].choices


def test_layer_mask_size_must_match_the_model(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["space"]["layers"] = {"type": "layer_mask", "n_layers": 5}
    with pytest.raises(ConfigError, match="search.space.layers.n_layers is 5 but the model has 2"):
        resolve_space(parse_config(raw), "gpt2", n_layers=2)


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\x07"])
def test_error_message_stays_one_line_whatever_the_user_typed(char):
    """Found by the hypothesis fuzzing: NEL (\\x85) is a line break for str.splitlines."""
    with pytest.raises(ConfigError) as info:
        parse_config({"name": "x", "model": {"build": {}}, "stages": [{"name": "a", "train": __file__}],
                      "search": {"space": {"max_steps": {"type": char}}}})
    assert len(str(info.value).splitlines()) == 1


def test_a_model_folder_beside_the_experiment_is_found_from_anywhere(corpora, tmp_path):
    """model.name_or_path, like the data paths, is relative to the experiment file when that folder exists."""
    raw = tiny_experiment(corpora, tmp_path)
    raw["model"] = {"name_or_path": "models/mine"}
    (tmp_path / "exp" / "models" / "mine").mkdir(parents=True)
    path = tmp_path / "exp" / "x.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).model.name_or_path == str((tmp_path / "exp" / "models" / "mine").resolve())
    raw["model"] = {"name_or_path": "HuggingFaceTB/SmolLM2-135M"}  # not a folder there: a hub id, as written
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).model.name_or_path == "HuggingFaceTB/SmolLM2-135M"
