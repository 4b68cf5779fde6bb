"""Shared fixtures: offline settings, tiny corpora prepared from the stdlib, one Ray session."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def _load_prepare():
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "experiments" / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> Path:
    """Small real corpora (prose, code, docstrings, API Q&A) prepared from this Python's stdlib."""
    out = tmp_path_factory.mktemp("corpora")
    _load_prepare().prepare(out, max_bytes=60_000, seed=0)
    return out


def tiny_experiment(corpora: Path, out_dir: Path, **overrides) -> dict:
    """A seconds-long experiment: a 2-block GPT-2, a short pretraining, two LoRA stages."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "block_size": 32,
        "output_dir": str(out_dir),
        "model": {"build": {"family": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 400},
                  "pretrain": {"train": str(corpora / "general.txt"), "max_steps": 20,
                               "per_device_train_batch_size": 8}},
        "stages": [
            {"name": "code", "format": "text", "train": str(corpora / "code.txt"), "max_documents": 300},
            {"name": "qa", "format": "qa", "train": str(corpora / "api_qa.jsonl"), "max_documents": 300},
        ],
        "search": {"population_size": 3, "offspring_size": 3, "generations": 1,
                   "space": {"max_steps": {"type": "int", "low": 2, "high": 6}}},
        "training": {"per_device_train_batch_size": 4, "eval_batch_size": 8, "eval_max_batches": 2},
        "ray": {"num_workers": 2},
    }
    for key, value in overrides.items():
        raw[key] = value
    # These tests were written for the generational search without halving (deterministic on any
    # number of workers); test_steady.py and test_halving.py exercise the library's defaults.
    raw["search"].setdefault("mode", "generational")
    raw["search"].setdefault("halving", {"rungs": 1})
    return raw


def tree_paths(node, prefix=()):
    """Every path (keys and list indices) into a nested dict / list, the root's () first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from tree_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from tree_paths(v, prefix + (i,))


def write_experiment(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    # address="local": a cluster of its own, even when another Ray runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def shut_down_cluster(cluster) -> None:
    """``Cluster.shutdown`` resets Ray's process-wide key-value client, which the session's Ray (the
    ``ray_session`` fixture) still needs (runtime_env uploads use it): give it back its own client."""
    import ray

    cluster.shutdown()
    if ray.is_initialized():
        from ray.experimental import internal_kv

        internal_kv._initialize_internal_kv(ray._private.worker.global_worker.gcs_client)


@pytest.fixture
def ray_init_calls(monkeypatch) -> list[dict]:
    """``ray.init`` replaced by a stand-in that records its arguments and refuses to start Ray."""
    import ray

    asked = []

    def init(**kwargs):
        asked.append(kwargs)
        raise RuntimeError("not starting Ray in this test")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return asked


def write_labelled(corpora: Path, out: Path, stages: dict[str, list[str]], per_class: int = 120) -> dict[str, Path]:
    """Classification stages from the stdlib corpora: a text's class is the corpus it came from
    (prose, code, docstring, qa); each stage gets the classes listed for it."""
    def texts(name):
        path = corpora / name
        if name.endswith(".jsonl"):
            import json
            return [" ".join(str(v) for v in json.loads(line).values()) for line in path.read_text().splitlines()]
        return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]

    kinds = {"prose": "general.txt", "code": "code.txt", "docstring": "docstrings.jsonl", "qa": "api_qa.jsonl"}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for stage, labels in stages.items():
        import json
        lines = [json.dumps({"text": t[:300], "label": label}) for label in labels for t in texts(kinds[label])[:per_class]]
        files[stage] = out / f"{stage}.jsonl"
        files[stage].write_text("\n".join(lines) + "\n")
    return files
