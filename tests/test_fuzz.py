"""Fuzz, seeded and deterministic: garbage in, evolm's own one-line errors out, never another exception.

(a) 10,000 random mutations of experiments/quickstart.yaml (wrong types, missing and unknown keys,
    negative, huge and non-finite numbers, None, nested garbage) through ``parse_config``: each parses
    or raises ConfigError with one line.
(b) 1,000 corruptions of one real finished run (files truncated, bytes flipped, replaced by binary,
    by a folder or by valid JSON of the wrong shape, checkpoints edited with a fixed checksum, files
    deleted or added): the run-directory readers (``open_run_dir``, ``load_run`` and its records,
    ``evolm status``'s ``run_status`` / ``format_status``, ``latest_checkpoint``, the ledger a resume
    reads) work or raise an EvolmError with one line.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import random
import shutil
import traceback
from pathlib import Path

import pytest
import yaml

from evolm.checkpoint import latest_checkpoint
from evolm.configfile import parse_config
from evolm.errors import ConfigError, EvolmError
from evolm.ledger import StageLedger
from evolm.rundir import load_run, open_run_dir
from evolm.status import format_status, run_status
from tests.conftest import ROOT, tree_paths

CONFIGS, RUN_DIRS = 10_000, 1_000
GARBAGE = [None, True, False, 0, -1, -(10**9), 10**30, 2**63, 10**400, 0.5, -0.5, 1e308, -1e308, float("nan"), float("inf"),
           float("-inf"), "", "x", "-1", "1e3", "nan", "../../etc/passwd", "/", "a\x00b", "line\nbreak", "\u2028",
           "no_such_module_zz:fn", "x" * 5000, [], [None], [1, "a", None], {}, {"x": 1}, {"type": "int"},
           {"type": "choice", "choices": []}, {"low": 5, "high": 1}, [[[[[]]]]], {"a": {"b": {"c": [None]}}},
           datetime.date(2026, 1, 1), b"\x00\xff", {1, 2}, {"": None}, {None: 1}, {1: "x"}]
"""What YAML can hold (dates, bytes, sets and non-string keys included), and then some."""


def garbage(rng: random.Random):
    value = rng.choice(GARBAGE)
    if rng.random() < 0.1:  # nested garbage of some depth
        for _ in range(rng.randint(1, 30)):
            value = rng.choice([[value], {"k": value}, [value, rng.choice(GARBAGE)]])
    return copy.deepcopy(value)


def mutate(tree, rng: random.Random):
    """One random change at one random place: replace, delete, add an unknown key, wrap, empty."""
    by_depth: dict[int, list] = {}
    for p in tree_paths(tree):
        by_depth.setdefault(len(p), []).append(p)
    path = rng.choice(by_depth[rng.choice(list(by_depth))])  # each depth as likely: top-level sections too
    action = rng.choice(["replace", "replace", "delete", "add", "wrap", "empty"])
    if not path:
        return garbage(rng) if action == "replace" else tree
    parent = tree
    for p in path[:-1]:
        parent = parent[p]
    key, value = path[-1], parent[path[-1]]
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["unexpected", "name", "x", str(key) + "_"])] = garbage(rng)
    elif action == "wrap":
        parent[key] = [value]
    elif action == "empty":
        parent[key] = type(value)() if isinstance(value, (dict, list, str)) else None
    else:
        parent[key] = garbage(rng)
    return tree


def _one_line_error(exc: BaseException) -> bool:
    return isinstance(exc, EvolmError) and "\n" not in str(exc) and str(exc).strip() != ""


def _crash(exc: BaseException, case: str) -> tuple[str, str]:
    """(where it was raised, what happened): crashes are grouped by the line that raised them."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno} {type(exc).__name__}"
    return where, f"{case}: {type(exc).__name__}: {exc!s:.300}\n{''.join(traceback.format_exc(limit=-4))}"


def _report(failures: list[tuple[str, str]], total: int) -> str:
    first: dict[str, str] = {}
    for where, text in failures:
        first.setdefault(where, text)
    return (f"{len(failures)} of {total} cases crashed, at {len(first)} places; one case of each:\n"
            + "\n\n".join(first.values()))


# ----- (a) configs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experiments_dir(corpora, tmp_path_factory) -> Path:
    """A folder where quickstart.yaml's relative data paths (data/prepared/...) resolve: the test corpora."""
    folder = tmp_path_factory.mktemp("experiments")
    (folder / "data").mkdir()
    (folder / "data" / "prepared").symlink_to(corpora, target_is_directory=True)
    return folder


def test_10000_mutated_configs_parse_or_raise_one_config_error(experiments_dir):
    base = yaml.safe_load((ROOT / "experiments" / "quickstart.yaml").read_text())
    parse_config(base, base_dir=experiments_dir)  # the unmutated experiment is valid
    rng, failures, parsed = random.Random(15), [], 0
    for case in range(CONFIGS):
        raw = copy.deepcopy(base)
        for _ in range(rng.randint(1, 4)):
            raw = mutate(raw, rng)
        try:
            parse_config(raw, base_dir=experiments_dir)
            parsed += 1
        except ConfigError as exc:
            if not _one_line_error(exc):
                failures.append(("ConfigError of several lines", f"case {case}: {exc!s:.300}"))
        except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
            failures.append(_crash(exc, f"case {case}, config {raw!r:.500}"))
    assert not failures, _report(failures, CONFIGS)
    assert 100 < parsed < CONFIGS - 1000  # both outcomes are exercised


# ----- (b) run directories ----------------------------------------------------------------------

READ_FILES = ["experiment.json", "config.yaml", "run.json", "evaluations.jsonl", "generations.jsonl", "summary.json",
              "loss_matrix.json", "metrics.json", "samples.jsonl", "rungs.jsonl"]


@pytest.fixture(scope="module")
def pristine(corpora, tmp_path_factory) -> Path:
    """One real finished two-stage run, without its weights (the readers only look for models/*/config.json)."""
    from tests.tiny_runs import make_tiny_run

    tmp = tmp_path_factory.mktemp("fuzz-run")
    run_dir = make_tiny_run(corpora, tmp / "tiny")
    light = shutil.copytree(run_dir, tmp / "light", ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    for rng_state in (run_dir / "checkpoints").glob("*.rng.safetensors"):
        shutil.copy(rng_state, light / "checkpoints")
    (light / "rungs.jsonl").write_text(json.dumps({"genome_id": "abcd0123", "stage": 1, "generation": 1,
                                                   "rung": 0, "status": "ok"}) + "\n")
    return light


def _corrupt(path: Path, rng: random.Random) -> str:
    """Damage one file (or put something in its place); returns what was done."""
    if path.is_dir():  # made a folder earlier in this case
        shutil.rmtree(path)
    data = path.read_bytes() if path.is_file() else b""
    kind = rng.choice(["truncate", "flip", "binary", "empty", "delete", "folder", "deep", "huge number",
                       "wrong shape", "wrong shape", "wrong shape", "wrong shape"])
    if kind in ("folder", "delete"):
        path.unlink(missing_ok=True)
        if kind == "folder":
            path.mkdir()
        return kind
    if kind == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == "flip" and data:
        data = bytearray(data)
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "binary":
        data = rng.randbytes(rng.randint(1, 4096))
    elif kind == "empty":
        data = b""
    elif kind == "deep":
        data = b"[" * 100_000 + b"]" * 100_000
    elif kind == "huge number":
        data = b"1" * 5000
    else:
        data = _reshaped(path, data, rng)
    path.write_bytes(data)
    return kind


def _reshaped(path: Path, data: bytes, rng: random.Random) -> bytes:
    """Valid JSON / YAML of the wrong shape: the file's own content with a few random changes; a
    checkpoint gets its checksum fixed, as if edited on purpose."""
    text = data.decode("utf-8", "replace")
    if path.suffix == ".jsonl":
        lines = text.splitlines() or ["{}"]
        i = rng.randrange(len(lines))
        try:
            lines[i] = json.dumps(_mutated(json.loads(lines[i]), rng))
        except (ValueError, RecursionError):
            lines[i] = json.dumps(garbage(rng), default=str)
        return ("\n".join(lines) + "\n").encode()
    try:
        tree = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (ValueError, RecursionError, yaml.YAMLError):
        tree = {}
    if path.parent.name == "checkpoints" and isinstance(tree, dict) and "state" in tree and rng.random() < 0.7:
        tree["state"] = _mutated(tree["state"], rng)
        body = json.dumps(tree["state"], sort_keys=True, default=str)
        tree["sha256"] = hashlib.sha256(body.encode()).hexdigest()
        return json.dumps(tree, default=str).encode()
    tree = _mutated(tree, rng)
    return (yaml.safe_dump(tree) if path.suffix == ".yaml" else json.dumps(tree, default=str)).encode()


def _mutated(tree, rng: random.Random):
    for _ in range(rng.randint(1, 4)):
        tree = mutate(tree, rng)
    return json.loads(json.dumps(tree, default=str))  # what a JSON file can hold (NaN and Infinity included)


def read_everything(run_dir: Path) -> None:
    """Every reader of a run directory, and every derived view status, plots and the report use."""
    open_run_dir(run_dir)
    run = load_run(run_dir)
    run.finished, run.stage_names(), run.finished_stages(), run.learned_at(), run.model_stages()
    run.workers(), run.evaluated(), run.checkpoint
    format_status(run_status(run_dir))
    latest_checkpoint(run_dir)
    for stage in (1, 2):
        StageLedger.read(run_dir, stage)


def test_1000_corrupted_run_directories_read_or_raise_one_evolm_error(pristine, tmp_path):
    run_dir = shutil.copytree(pristine, tmp_path / "run")
    read_everything(run_dir)  # the undamaged run reads
    candidates = READ_FILES + [f"checkpoints/{p.name}" for p in sorted((run_dir / "checkpoints").iterdir())] + \
        ["checkpoints/s1-end.json", "checkpoints/s003-g0001.json", "checkpoints/sxyz.json"]  # stray names
    rng, failures, outcomes = random.Random(15), [], {"read": 0, "refused": 0}
    for case in range(RUN_DIRS):
        damaged = [candidates[rng.randrange(len(candidates))] for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        done = [f"{name}: {_corrupt(run_dir / name, rng)}" for name in damaged]
        try:
            read_everything(run_dir)
            outcomes["read"] += 1
        except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
            if _one_line_error(exc):
                outcomes["refused"] += 1
            else:
                failures.append(_crash(exc, f"case {case} ({'; '.join(done)})"))
        for name in set(damaged):
            _restore(run_dir / name, pristine / name)
    assert outcomes["read"] > RUN_DIRS // 2 and outcomes["refused"] > 10, outcomes
    assert not failures, _report(failures, RUN_DIRS)


def _restore(path: Path, original: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    if original.exists():
        shutil.copy(original, path)
    else:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("search", [{"population_size": "6"}, ["x"], {"generations": None}])
def test_status_reads_a_run_whose_experiment_has_a_damaged_search_section(pristine, tmp_path, search):
    run_dir = shutil.copytree(pristine, tmp_path / "run")
    experiment = json.loads((run_dir / "experiment.json").read_text())
    experiment["search"] = search
    (run_dir / "experiment.json").write_text(json.dumps(experiment))
    assert "finished" in format_status(run_status(run_dir))
