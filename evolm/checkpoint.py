"""Checkpoints: the run's state after every generation and merge, whole or refused.

A checkpoint is checkpoints/<tag>.json: {"sha256": ..., "state": {...}} plus <tag>.rng.safetensors
(torch's RNG state). The checksum catches a truncated or garbled file; resume then falls back to
the newest checkpoint that is whole, and says so. JSON and safetensors only, no pickle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from evolm.errors import RunDirError
from evolm.jsonfiles import jsonable, write_atomic
from evolm.safenames import genome_id

CHECKPOINT_DIR = "checkpoints"
_TAG = re.compile(r"s\d{3,}-(end|g\d{4,})")
_BASE_MODEL = re.compile(r"models/stage-\d{1,6}")
_SHAPES = {"population": list, "hall_of_fame": list, "evolution_rng": list, "global_rng": dict,
           "loss_matrix": list, "summaries": list}


class CorruptCheckpoint(Exception):
    pass


def checkpoint_tag(stage: int, generation: int | None) -> str:
    """Tags sort in run order: ``s001-g0003`` after a generation, ``s001-end`` after a merge."""
    return f"s{stage:03d}-" + ("end" if generation is None else f"g{generation:04d}")


def tag_order(tag: str) -> tuple[int, int]:
    """Run order of a tag: a stage's end comes after all of its generations."""
    stage, _, gen = tag.partition("-")
    return int(stage[1:]), (10**9 if gen == "end" else int(gen[1:]))


def save_checkpoint(run_dir: Path, tag: str, state: dict, keep_last: int) -> Path:
    import hashlib
    import random

    import numpy as np
    import torch
    from safetensors.torch import save

    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    np_state = np.random.get_state()
    state = dict(state, global_rng={"python": tuples_to_lists(random.getstate()),
                                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})
    write_atomic(folder / f"{tag}.rng.safetensors", save({"torch": torch.get_rng_state()}))
    body = json.dumps(jsonable(state), sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    path = folder / f"{tag}.json"
    write_atomic(path, json.dumps({"sha256": digest, "state": json.loads(body)}, sort_keys=True))
    prune_checkpoints(folder, keep_last)
    return path


def load_checkpoint(path: Path) -> dict:
    import hashlib

    try:
        wrapper = json.loads(Path(path).read_text(encoding="utf-8"))
        body = json.dumps(wrapper["state"], sort_keys=True)
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:  # ValueError: not UTF-8 or JSON
        raise CorruptCheckpoint(f"{path.name}: unreadable ({type(exc).__name__})") from None
    if not isinstance(wrapper, dict) or hashlib.sha256(body.encode()).hexdigest() != wrapper.get("sha256"):
        raise CorruptCheckpoint(f"{path.name}: checksum mismatch")
    _check_state(Path(path), wrapper["state"])
    rng_path = Path(path).with_name(Path(path).name.replace(".json", ".rng.safetensors"))
    try:
        from safetensors.torch import load_file

        wrapper["state"]["torch_rng"] = load_file(str(rng_path))["torch"]
    except Exception as exc:  # noqa: BLE001 - any failure to read it means the checkpoint is not whole
        raise CorruptCheckpoint(f"{rng_path.name}: unreadable ({type(exc).__name__})") from None
    return wrapper["state"]


def _check_state(path: Path, state) -> None:
    """A state whose checksum matches may still have been written by hand: what the run and its
    readers rely on must have its type, and nothing in it may lead out of the run directory."""
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path.name}: the state is not an object")
    base = state.get("base_model")
    if not isinstance(base, str) or not _BASE_MODEL.fullmatch(base):
        raise RunDirError(f"{path}: base_model {base!r} is not models/stage-<k> of this run directory; the "
                          f"checkpoint was edited, and evolm will not load a model from elsewhere")
    for key, kind in _SHAPES.items():
        if not isinstance(state.get(key), kind):
            raise CorruptCheckpoint(f"{path.name}: {key} is missing or not a {kind.__name__}")
    steady = state.get("steady")
    if steady is not None and not (isinstance(steady, dict) and isinstance(steady.get("in_flight"), list)
                                   and all(_count(steady.get(k)) for k in ("taken", "born", "spent"))):
        raise CorruptCheckpoint(f"{path.name}: steady has the wrong shape")
    for genome in state["population"] + state["hall_of_fame"] + (steady or {}).get("in_flight", []):
        genome_id(genome.get("id") if isinstance(genome, dict) else genome, path)  # ids become adapter paths
    generation, elapsed = state.get("generation"), state.get("elapsed")
    if not (_count(state.get("stage")) and isinstance(state.get("stage_done"), bool)
            and (generation is None or _count(generation))
            and (elapsed is None or (_number(elapsed) and 0 <= elapsed < 1e12))):  # nan fails too
        raise CorruptCheckpoint(f"{path.name}: stage, generation, stage_done or elapsed has the wrong type")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint JSON files of ``folder`` in run order; a file whose name is not a tag is not one."""
    return sorted((p for p in Path(folder).glob("s*.json") if _TAG.fullmatch(p.stem)), key=lambda p: tag_order(p.stem))


def latest_checkpoint(run_dir: Path) -> tuple[dict | None, list[str]]:
    """The newest whole checkpoint and a warning for each newer one that was corrupt; RunDirError for
    one that was edited to lead out of the run directory."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    warnings = []
    for path in reversed(checkpoint_files(folder)):
        try:
            state = load_checkpoint(path)
        except CorruptCheckpoint as exc:
            warnings.append(f"checkpoint {exc}; falling back to the previous one")
            continue
        state["tag"] = path.stem
        return state, warnings
    return None, warnings


def restore_global_rng(state: dict) -> None:
    import random

    import numpy as np
    import torch

    g = state["global_rng"]
    random.setstate(lists_to_tuples(g["python"]))
    np.random.set_state((g["numpy"][0], np.array(g["numpy"][1], dtype=np.uint32), *g["numpy"][2:]))
    torch.set_rng_state(state["torch_rng"])


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and every stage end, so disk use stays bounded."""
    tags = [p.stem for p in checkpoint_files(folder)]
    for tag in tags[:-keep_last] if keep_last else tags:
        if not tag.endswith("-end"):
            for suffix in (".json", ".rng.safetensors"):
                (folder / f"{tag}{suffix}").unlink(missing_ok=True)


def tuples_to_lists(obj):
    """An RNG state (nested tuples) as JSON-able lists."""
    return [tuples_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def lists_to_tuples(obj):
    """The inverse of ``tuples_to_lists``: what ``random.Random.setstate`` takes."""
    return tuple(lists_to_tuples(x) for x in obj) if isinstance(obj, list) else obj
