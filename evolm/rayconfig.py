"""The ``ray`` section: where evaluations run, and what Ray brings to the nodes (``runtime_env``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from evolm.configsection import Section

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_RAY_URI_SCHEMES = ("s3", "gs", "https", "http", "file", "azure", "abfss", "gcs", "local")
"""URI schemes Ray fetches ``working_dir`` / ``py_modules`` from; gcs and local:// need no archive."""
_ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar.xz")


def _ray_package(value: str, info: ValidationInfo, field: str) -> str:
    """A ``working_dir`` / ``py_modules`` entry: a URI Ray can fetch, or an existing local path
    (relative to the experiment file's folder) of a kind Ray can ship, made absolute."""
    archives = _ARCHIVES + ((".whl",) if field == "py_modules" else ())
    uri = _URI.match(value)
    if uri:
        scheme = uri.group(1).lower()
        if scheme not in _RAY_URI_SCHEMES:
            raise ValueError(f"{value}: Ray cannot fetch {scheme}:// URIs; give a local path or one of "
                             f"{', '.join(s + '://' for s in _RAY_URI_SCHEMES)}")
        if scheme not in ("gcs", "local") and not value.split("?", 1)[0].lower().endswith(archives):
            raise ValueError(f"{value}: a remote {field} must be an archive ({', '.join(archives)})")
        return value
    path = Path(value).expanduser()
    full = path if path.is_absolute() else Path((info.context or {}).get("base_dir", ".")) / path
    full = full.resolve()
    if not full.exists():
        raise ValueError(f"not found: {full} (fix the path; a relative path starts at the experiment file's folder)")
    kinds = archives if field == "working_dir" else (".py", ".whl")
    if not full.is_dir() and not full.name.lower().endswith(kinds):
        raise ValueError(f"{full}: Ray ships a directory or a {' / '.join(kinds)} file here, not this file")
    return str(full)


class RuntimeEnvConfig(Section):
    """Ray's ``runtime_env`` for the workers: code, packages and environment variables brought to
    every node when the run starts, so a node needs no more than Ray and torch. Local paths are
    relative to the experiment file's folder; they are uploaded from the driver."""

    working_dir: str | None = None
    """A local directory (or .zip / .tar.gz archive) uploaded to every node, where it becomes the
    workers' current directory and is importable (your own objective module, for instance); or a
    remote archive URI (``s3://``, ``gs://``, ``https://`` ... ``.zip``). Default: none."""
    py_modules: list[str] = Field(default_factory=list)
    """Python packages the workers can import: local package directories, .py or .whl files
    (uploaded), or remote archive URIs."""
    pip: list[str] = Field(default_factory=list)
    """pip requirements (``peft==0.17.1``, ``git+https://...``) installed on every node, in a
    virtualenv on top of the node's Python, before a worker starts there; the nodes need the index."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables set in every worker (strings: quote numbers in YAML)."""
    ship_evolm: bool = False
    """Ship the driver's own evolm package (its directory, added to ``py_modules``): workers import
    exactly the driver's evolm, also on nodes where evolm is not installed. evolm's other
    requirements (transformers, peft) must be on the nodes or in ``pip``."""

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _ray_package(value, info, "working_dir")

    @field_validator("py_modules")
    @classmethod
    def _py_modules(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return [_ray_package(value, info, "py_modules") for value in values]

    @field_validator("pip")
    @classmethod
    def _requirements(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.strip() or any(c in value for c in "\r\n\0"):
                raise ValueError(f"{value!r}: give one non-empty requirement per entry")
        return [value.strip() for value in values]

    @field_validator("env_vars", mode="before")
    @classmethod
    def _strings(cls, values: Any) -> Any:
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise ValueError(f"{key!r} is not an environment variable name")
            if not isinstance(value, str):  # Ray refuses anything but strings
                raise ValueError(f"{key}: values must be strings; quote it in YAML ({key}: \"{value}\")")
        return values

    @model_validator(mode="after")
    def _one_evolm(self):
        if self.ship_evolm and any(Path(m).name == "evolm" and m != str(Path(__file__).resolve().parent)
                                   for m in self.py_modules):
            raise ValueError("py_modules ships another evolm package and ship_evolm ships the driver's; keep one")
        return self

    def as_ray(self) -> dict | None:
        """The ``runtime_env`` dict Ray takes (``ray.init`` / ``.options``); None when nothing is set."""
        modules = list(self.py_modules)
        own = str(Path(__file__).resolve().parent)
        if self.ship_evolm and own not in modules:
            modules.append(own)
        env = {"working_dir": self.working_dir, "py_modules": modules, "pip": list(self.pip),
               "env_vars": dict(self.env_vars)}
        return {key: value for key, value in env.items() if value} or None


class RayConfig(Section):
    address: str | None = None
    """Join an existing cluster (``auto`` or ``host:port``); default: start a local Ray."""
    num_workers: int = Field(default=2, ge=1)
    """Evaluations running at once."""
    num_cpus_per_trial: float = Field(default=1, gt=0)
    """CPUs per evaluation; torch threads follow it."""
    num_gpus_per_trial: float = Field(default=0, ge=0)
    """GPUs per evaluation (fractions allowed); a trial with a GPU trains on it, in bf16 where supported."""
    dashboard: bool = False
    """Start Ray's dashboard (bound to 127.0.0.1) with a local cluster."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of an evaluation whose worker process died."""
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)
    """Ray's runtime_env for the workers (code, pip packages, environment variables shipped to the
    nodes); given to ``ray.init`` when evolm starts or joins Ray, else to every worker it creates."""
