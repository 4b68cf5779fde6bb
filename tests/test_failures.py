"""Failures are data: evaluations that raise or diverge, workers that die, configs that are wrong."""
import json
import re
import shutil

import numpy as np
import psutil
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolm.jsonfiles import read_jsonl
from evolm.configfile import parse_config
from evolm.continual import ContinualRun, Reporter
from evolm.errors import ConfigError
from evolm.executor import LocalExecutor, RayExecutor
from tests.conftest import tiny_experiment, tree_paths


def fails_with_c_proj(ctx):
    """An objective that raises for adapters on c_proj: an evaluation that fails inside the worker."""
    if "c_proj" in ctx.model.peft_config["default"].target_modules:
        raise RuntimeError("no_such_module c_proj")
    return 0.0


def test_raising_and_diverging_evaluations_are_recorded_and_penalized(corpora, tmp_path):
    import evolm

    raw = tiny_experiment(corpora, tmp_path)
    raw["search"].update(population_size=6, generations=1, objectives=["val_loss", "fails_with_c_proj"])
    raw["search"]["space"].update(
        target_modules={"type": "categorical", "choices": [["c_attn"], ["c_attn", "c_proj"]]},  # raises
        learning_rate={"type": "categorical", "choices": [1e-3, 1e30]})                       # diverges to NaN
    raw["training"]["max_grad_norm"] = 1e30
    evolm.OBJECTIVES.register("fails_with_c_proj", fails_with_c_proj)
    try:
        summaries = [s.to_json() for s in ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor()).run()]
    finally:
        evolm.OBJECTIVES._entries.pop("fails_with_c_proj")
    records = read_jsonl(tmp_path / "run" / "evaluations.jsonl")
    failed = [r for r in records if r["status"] == "failed"]
    assert any("no_such_module" in r["error"] and "Traceback" in r["traceback"] for r in failed)
    assert any("non-finite validation loss" in r["error"] for r in failed)
    assert all(r["objectives"] is None and r["values"] for r in failed)
    gens = read_jsonl(tmp_path / "run" / "generations.jsonl")
    assert sum(g["failed"] for g in gens) >= 2 and all(g["best"] is not None for g in gens)
    for s in summaries:  # the winners are genomes that trained fine
        assert s["winner"]["values"]["target_modules"] == ["c_attn"] and s["winner"]["values"]["learning_rate"] == 1e-3
        assert np.isfinite(s["end_loss"])


class KillAWorker(Reporter):
    """When the first evaluation of stage 1, generation 1 comes back, kills the run's other Ray
    worker (known from earlier records), which is then in the middle of its own evaluation."""

    def __init__(self):
        self.pids, self.killed = set(), []

    def evaluation_done(self, record):
        pid = int(record.worker.split(":")[1])
        if (record.stage, record.generation) == (1, 1) and not self.killed:
            for victim in sorted(self.pids - {pid}):
                psutil.Process(victim).kill()
                self.killed.append(victim)
        self.pids.add(pid)


def test_a_killed_ray_worker_is_retried_with_identical_results(corpora, tmp_path, ray_session):
    raw = tiny_experiment(corpora, tmp_path)
    raw["search"]["space"]["max_steps"] = {"type": "int", "low": 60, "high": 80}  # long enough to be hit
    raw["search"]["offspring_size"] = 4
    config = parse_config(raw)
    reporter = KillAWorker()
    ContinualRun(config, tmp_path / "ray", lambda: RayExecutor(config.ray), reporter).run()
    ContinualRun(config, tmp_path / "local", lambda: LocalExecutor(threads=1)).run()
    assert reporter.killed, "no worker process was found to kill"

    def outcome(d):
        return sorted((r["stage"], r["genome_id"], r["status"], (r["objectives"] or {}).get("val_loss"))
                      for r in read_jsonl(d / "evaluations.jsonl"))
    assert outcome(tmp_path / "ray") == outcome(tmp_path / "local")
    assert all(r["status"] == "ok" for r in read_jsonl(tmp_path / "ray" / "evaluations.jsonl"))
    workers = {r["worker"] for r in read_jsonl(tmp_path / "ray" / "evaluations.jsonl") if not r["cached"]}
    assert len(workers) >= 3  # the killed worker was replaced by a new process


# ----- bad input: every mutated config is accepted or rejected with a ConfigError naming a field -----

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3), st.just({}),
                   st.dictionaries(st.sampled_from(["type", "low", "high", "choices", "x"]),
                                   st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3))


def _mutate(raw, path, action, value):
    if not path:
        return value if action == "replace" else raw
    parent = raw
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if action == "delete" and isinstance(parent, dict):
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent["unexpected_" + str(key)] = value
    else:
        parent[key] = value
    return raw


@pytest.fixture(scope="module")
def base_raw(corpora, tmp_path_factory):
    raw = tiny_experiment(corpora, tmp_path_factory.mktemp("fuzz"))
    raw["search"]["space"]["learning_rate"] = {"type": "log_uniform", "low": 1e-4, "high": 1e-2}
    return raw


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_configs_are_accepted_or_rejected_with_a_field(base_raw, data):
    raw = json.loads(json.dumps(base_raw))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(tree_paths(raw)) if isinstance(raw, dict) else [()]
        path = data.draw(st.sampled_from(paths))
        raw = _mutate(raw, path, data.draw(st.sampled_from(["replace", "delete", "add"])), data.draw(VALUES))
    try:
        parse_config(raw)
    except ConfigError as exc:
        message = str(exc)
        assert re.match(r"config: \S", message) and len(message.splitlines()) == 1
        tree = raw if isinstance(raw, dict) else {}
        fields = {str(p) for path in tree_paths(tree) for p in path if isinstance(p, str)}
        assert any(f in message for f in fields | {"(top level)", "search", "model", "stages"}), message


def test_a_top_level_that_is_not_a_mapping_is_a_config_error(tmp_path):
    from evolm.configfile import load_config

    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(path)


# ----- safety: nothing on a load path can execute code from a results directory -----

PICKLE_PROTOCOL = re.compile(rb"\A\x80[\x02-\x05]")  # what pickle protocols 2-5 start with
ZIP = b"PK\x03\x04"  # torch.save's format: a zip around a pickle


@pytest.fixture(scope="module")
def tiny_run(corpora, tmp_path_factory):
    """A real two-stage run, with its plots and report."""
    from evolm.cli import main
    from tests.tiny_runs import make_tiny_run

    run_dir = make_tiny_run(corpora, tmp_path_factory.mktemp("safety") / "tiny")
    assert main(["plot", str(run_dir)]) == 0 and main(["report", str(run_dir)]) == 0
    return run_dir


def _readable_without_code(path):
    """Open ``path`` with the parser its kind asks for; return the kind."""
    from safetensors import safe_open

    data = path.read_bytes()
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as f:  # an 8-byte header size, a JSON header, raw arrays
            assert list(f.keys()) and all(f.get_tensor(k) is not None for k in f.keys())
        return "safetensors"
    assert not PICKLE_PROTOCOL.match(data) and not data.startswith(ZIP), path
    if path.suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        return "png"
    text = data.decode("utf-8")
    if path.suffix == ".json":
        json.loads(text)
    elif path.suffix == ".jsonl":
        for line in text.splitlines():
            json.loads(line)
    elif path.suffix in (".yaml", ".yml"):
        yaml.safe_load(text)
    elif path.suffix not in (".txt", ".html", ".md", ".csv"):
        raise AssertionError(f"{path}: a file of unknown kind in a run directory")
    return path.suffix.lstrip(".")


def test_a_run_directory_holds_only_data_formats(tiny_run):
    """Every file is JSON, JSON lines, YAML, safetensors, text or PNG, and each opens with its parser."""
    kinds = {}
    for path in sorted(p for p in tiny_run.rglob("*") if p.is_file()):
        kinds.setdefault(_readable_without_code(path), []).append(path.relative_to(tiny_run).as_posix())
    assert set(kinds) <= {"json", "jsonl", "yaml", "safetensors", "png", "html", "txt"}
    # the weights, adapters and RNG states that a library would otherwise pickle are all safetensors
    assert {"models/stage-0/model.safetensors", "models/stage-2/model.safetensors",
            "checkpoints/s001-end.rng.safetensors"} <= set(kinds["safetensors"])
    assert any(p.startswith("adapters/stage-1/") for p in kinds["safetensors"])
    assert "checkpoints/s001-end.json" in kinds["json"] and "evaluations.jsonl" in kinds["jsonl"]
    assert kinds["png"] and kinds["html"] == ["report.html"]


def test_resume_never_unpickles(tiny_run, tmp_path, monkeypatch):
    """A run that died in stage 2 resumes from its stage-1 checkpoint, its models and its adapters with every
    unpickling entry point made to fail, and ends exactly where the uninterrupted run did."""
    import pickle

    import torch
    from safetensors.numpy import load_file

    from evolm.cli import main

    crashed = tmp_path / "crashed"
    shutil.copytree(tiny_run, crashed, ignore=shutil.ignore_patterns("plots", "report.html"))
    for path in (crashed / "checkpoints").glob("s002-*"):
        path.unlink()
    shutil.rmtree(crashed / "models" / "stage-2")
    (crashed / "summary.json").unlink()

    calls = []

    def refuse(name):
        def unpickle(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called while resuming")
        return unpickle

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse("pickle.Unpickler")()

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    for optional in ("cloudpickle", "dill"):
        try:
            mod = __import__(optional)
        except ImportError:
            continue
        for name in ("load", "loads"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse(f"{optional}.{name}"))

    def identity(stage):  # a model written again is a new file
        st = (crashed / "models" / f"stage-{stage}" / "model.safetensors").stat()
        return st.st_ino, st.st_mtime_ns

    before = [identity(0), identity(1)]
    assert main(["resume", str(crashed), "--no-ray"]) == 0
    assert calls == []  # also those a broad except would have hidden
    # the checkpoint itself was read, whole (its JSON state and its RNG state): the run went on from stage 2,
    # it did not start again from scratch (which would have built and written the base and stage 1 again)
    assert [identity(0), identity(1)] == before
    assert json.loads((crashed / "loss_matrix.json").read_text()) == json.loads(
        (tiny_run / "loss_matrix.json").read_text())
    resumed = load_file(str(crashed / "models" / "stage-2" / "model.safetensors"))
    original = load_file(str(tiny_run / "models" / "stage-2" / "model.safetensors"))
    assert resumed.keys() == original.keys() and all(np.array_equal(resumed[k], original[k]) for k in original)
    winners = lambda d: [s["winner"]["id"] for s in json.loads((d / "summary.json").read_text())["stages"]]  # noqa: E731
    assert winners(crashed) == winners(tiny_run)


def test_ray_dashboard_is_off_by_default_and_local_only(ray_init_calls):
    """What evolm asks of ray.init, seen by a stand-in for it: no dashboard, and a local-only one when asked."""
    from evolm.rayconfig import RayConfig
    from evolm.errors import ClusterError

    asked = ray_init_calls
    assert RayConfig().dashboard is False
    for cfg in (RayConfig(), RayConfig(dashboard=True)):
        with pytest.raises(ClusterError, match="cannot start or join Ray"):
            RayExecutor(cfg)
    assert [a["include_dashboard"] for a in asked] == [False, True]
    assert all(a["dashboard_host"] == "127.0.0.1" and a["address"] == "local" for a in asked)


def test_data_errors_name_the_file_and_the_fix(corpora, tmp_path):
    from evolm.data import load_splits, pack
    from evolm.errors import DataError

    cases = {"latin1.txt": ("caf\xe9\n\nmore".encode("latin-1"), "text", "not UTF-8"),
             "bad.jsonl": (b'{"text": "ok"}\n{not json\n', "jsonl", "line 2: not valid JSON"),
             "nofield.jsonl": (b'{"body": "x"}\n', "jsonl", "no field 'text'"),
             "noanswer.jsonl": (b'{"question": "q"}\n', "qa", "template field 'answer'"),
             "array.jsonl": (b'[1, 2]\n', "jsonl", "expected a JSON object")}
    for name, (content, fmt, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        source = parse_config(tiny_experiment(corpora, tmp_path) | {"stages": [
            {"name": "s", "format": fmt, "train": str(tmp_path / name)}]}).stages[0]
        with pytest.raises(DataError, match=re.escape(name) + ".*" + re.escape(expected)):
            load_splits(source)
    with pytest.raises(DataError, match="fewer than one block of block_size=64"):
        pack([[1, 2, 3]], eos_id=0, block_size=64, where="stage 's' (validation split)")


def test_a_new_run_refuses_a_directory_that_holds_one(corpora, tmp_path):
    """Its ledger would silently stand in for the new run's evaluations."""
    from evolm.errors import RunDirError

    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"], raw["search"]["generations"] = raw["stages"][:1], 0
    ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor()).run()
    before = (tmp_path / "run" / "evaluations.jsonl").read_text()
    with pytest.raises(RunDirError, match="already holds a run; resume it"):
        ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor()).run()
    assert (tmp_path / "run" / "evaluations.jsonl").read_text() == before  # nothing lost or rewritten
