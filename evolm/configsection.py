"""The base of every config section, and the check that a name is one of the known ones."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A YAML section: an unknown key is an error; each field is documented by the docstring under it."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def one_of(name: str, known: tuple[str, ...], what: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {what} '{name}'; use one of {', '.join(known)}")
    return name
