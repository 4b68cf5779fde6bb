"""Reading an experiment: a YAML file (or a dict) into an ``ExperimentConfig``, or one line saying
what is wrong and where (``stages[1].train: file not found: ...``); what a resumed run may change.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evolm.config import ExperimentConfig
from evolm.errors import ConfigError
from evolm.registry import GENE_TYPES


def resume_differences(old: dict, new: dict) -> list[str]:
    """Fields of ``new`` that a resumed run cannot accept: anything but more generations, stages
    appended at the end, where / how wide the evaluations run (``ray``) and what is only observed
    or kept on disk (tracking, sample prompts, checkpoint pruning)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key in ("ray", "output_dir", "tracking", "prompts", "sample_max_new_tokens", "checkpoint") or a == b:
            continue
        if key == "stages" and isinstance(a, list) and isinstance(b, list) and b[: len(a)] == a:
            continue
        if key == "search" and isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub) and not (sub == "generations" and (b.get(sub) or 0) >= (a.get(sub) or 0)):
                    diffs.append(f"search.{sub}")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{sub}" for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        else:
            diffs.append(key)
    return diffs


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; ``overrides`` are dotted keys (``{"seed": 3}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found (give the path of a YAML file, e.g. "
                          f"experiments/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the experiment as UTF-8") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{line}: malformed YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the experiment must be a YAML mapping (name:, model:, stages:, ...)")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return parse_config(raw, base_dir=path.parent, source=str(path))


def parse_config(raw: dict, base_dir: Path = Path("."), source: str = "config") -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(raw, context={"base_dir": base_dir})
        config._source_dir = Path(base_dir).resolve()
        return config
    except ValidationError as exc:
        message = "; ".join(_describe(e) for e in exc.errors())
    except OSError as exc:  # a path the OS will not even look up (a name too long): no field to name
        message = f"{str(exc.filename)[:200]}: {exc.strerror}; fix that path"
    # User text may hold control characters or Unicode line breaks; the message stays one printable line.
    message = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: ascii(m.group())[1:-1], message)
    raise ConfigError(f"{source}: {message}") from None


def _describe(error: dict) -> str:
    where = _field_path(error["loc"]) or "(top level)"
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind.startswith("union_tag") or kind == "union_tag_invalid":
        return f"{where}: {msg}; gene types are {', '.join(GENE_TYPES.names())}"
    msg = msg.removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error"):
        return f"{where}: {msg}"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}: {msg}{shown}"


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in GENE_TYPES:
            continue  # the discriminator's branch name is noise in a path the user reads
        else:
            out += ("." if out else "") + str(part)
    return out


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {dotted}: {part} is not a section")
    node[last] = value
