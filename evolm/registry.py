"""Named, pluggable parts: one registry per extension point, each name written once.

    from evolm.registry import OBJECTIVES
    @OBJECTIVES.register("bleu")
    def bleu(ctx): ...

The config's allowed names come from these registries, so a part registered before the config is
loaded is as valid as a built-in one. Registries (and who fills them):

    OBJECTIVES          evolm.objectives   what an evaluation measures (lower is better internally)
    WINNER_RULES        evolm.evolution    how a stage's winner is picked from the hall of fame
    MERGE_STRATEGIES    evolm.merge        how winners' adapters become the next base
    GENE_TYPES          evolm.space        the types a search-space gene may have
    SCHEDULERS          evolm.schedulers   how a generation's training budget is spent (fifo, halving)
    EXECUTORS           evolm.executor     where evaluations run (local, ray)
    REPORTERS           evolm.reporting    who hears about progress (log; console from evolm.cli); TensorBoard and
                                           MLflow wrap one of them (evolm.tracking)
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind, self._entries = kind, {}

    def register(self, name: str, entry: T | None = None):
        """``register(name, entry)``, or ``@register(name)`` above a function or class."""
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered already; choose another name")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; known: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


OBJECTIVES: Registry = Registry("objective")
WINNER_RULES: Registry[Callable] = Registry("winner rule")
MERGE_STRATEGIES: Registry[Callable] = Registry("merge strategy")
GENE_TYPES: Registry = Registry("gene type")
SCHEDULERS: Registry = Registry("scheduler")
EXECUTORS: Registry = Registry("executor")
REPORTERS: Registry = Registry("reporter")
