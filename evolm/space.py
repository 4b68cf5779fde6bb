"""Gene types of the search space: each one samples, mutates and validates its own values.

A gene is declared in the experiment YAML by its ``type`` plus range fields; the same pydantic
model is the declaration and the operator set, so a gene can never be mutated out of its range.
Mutation operators return the new value and a short description (``"learning_rate * 1.31"``)
that becomes part of a genome's provenance.
"""
from __future__ import annotations

import functools
import math
import random
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WrapValidator, model_validator

from evolm.registry import GENE_TYPES


class GeneType(BaseModel):
    """Base of gene types: subclass it with a literal ``type`` field and register it in ``GENE_TYPES``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def sample(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def mutate(self, value: Any, rng: random.Random) -> tuple[Any, str]:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        raise NotImplementedError

    def cross(self, a: Any, b: Any, rng: random.Random) -> tuple[Any, Any]:
        """Uniform crossover at gene level: swap the two values half of the time."""
        return (b, a) if rng.random() < 0.5 else (a, b)

    def distance(self, a: Any, b: Any) -> float:
        """How far apart two values are, in [0, 1] (the population's diversity is built from it)."""
        return 0.0 if a == b else 1.0


class Categorical(GeneType):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)
    """The allowed values (any YAML value: numbers, strings, lists of module names)."""

    def sample(self, rng):
        return rng.choice(self.choices)

    def mutate(self, value, rng):
        others = [c for c in self.choices if c != value]
        new = rng.choice(others) if others else value
        return new, f"{_short(value)} -> {_short(new)}"

    def contains(self, value):
        return value in self.choices


class Integer(GeneType):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    """Sample and mutate on a log scale (for step counts spanning decades)."""

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low must be <= high (low={self.low}, high={self.high})")
        if self.log and self.low < 1:
            raise ValueError(f"log scale needs low >= 1 (low={self.low})")
        return self

    def sample(self, rng):
        if self.log:
            return _clip(round(math.exp(rng.uniform(math.log(self.low), math.log(self.high)))), self.low, self.high)
        return rng.randint(self.low, self.high)

    def mutate(self, value, rng):
        if self.log:  # reflected on the log scale it mutates on
            log_new = _reflect(math.log(value) + rng.gauss(0.0, 0.4), math.log(self.low), math.log(self.high))
            new = int(min(max(round(math.exp(log_new)), self.low), self.high))
        else:
            step = max(1.0, 0.2 * (self.high - self.low))
            new = int(round(_reflect(round(value + rng.gauss(0.0, step)), self.low, self.high)))
        if new == value and self.low < self.high:  # an integer gene must move when mutated
            up = value < self.high and (value == self.low or rng.random() < 0.5)
            new = value + 1 if up else value - 1
        return new, f"{value} -> {new}"

    def contains(self, value):
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def distance(self, a, b):
        if self.log:
            return _span_distance(math.log(a), math.log(b), math.log(self.low), math.log(self.high))
        return _span_distance(a, b, self.low, self.high)


class Uniform(GeneType):
    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"need finite low <= high (low={self.low}, high={self.high})")
        return self

    def sample(self, rng):
        return rng.uniform(self.low, self.high)

    def mutate(self, value, rng):
        new = _reflect(value + rng.gauss(0.0, 0.2 * (self.high - self.low)), self.low, self.high)
        return new, f"{value:.3g} -> {new:.3g}"

    def contains(self, value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def distance(self, a, b):
        return _span_distance(a, b, self.low, self.high)


class LogUniform(GeneType):
    type: Literal["log_uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        if not (0 < self.low <= self.high) or not math.isfinite(self.high):
            raise ValueError(f"need 0 < low <= high (low={self.low}, high={self.high})")
        return self

    def sample(self, rng):
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))

    def mutate(self, value, rng):
        log_new = _reflect(math.log(value) + rng.gauss(0.0, 0.5), math.log(self.low), math.log(self.high))
        new = min(max(math.exp(log_new), self.low), self.high)  # exp(log(x)) may round past a bound
        return new, f"* {new / value:.3g}"

    def contains(self, value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def distance(self, a, b):
        return _span_distance(math.log(a), math.log(b), math.log(self.low), math.log(self.high))


class Boolean(GeneType):
    type: Literal["bool"]

    def sample(self, rng):
        return rng.random() < 0.5

    def mutate(self, value, rng):
        return (not value), f"{value} -> {not value}"

    def contains(self, value):
        return isinstance(value, bool)


class LayerMask(GeneType):
    """Which transformer blocks get LoRA: one bool per block, at least one True."""

    type: Literal["layer_mask"]
    n_layers: int | None = Field(default=None, ge=1)
    """Number of transformer blocks; filled in from the model when left out."""
    p_on: float = Field(default=0.6, gt=0, le=1)
    """Chance that a block is on in a sampled mask."""

    def _n(self) -> int:
        if self.n_layers is None:
            raise ValueError("layer_mask gene is not bound to a model (n_layers unknown)")
        return self.n_layers

    def sample(self, rng):
        mask = [rng.random() < self.p_on for _ in range(self._n())]
        if not any(mask):
            mask[rng.randrange(len(mask))] = True
        return mask

    def mutate(self, value, rng):
        mask = list(value)
        i = rng.randrange(len(mask))
        mask[i] = not mask[i]
        if not any(mask):  # flipping the last active block off would leave no adapter: move it
            j = rng.choice([k for k in range(len(mask)) if k != i] or [i])
            mask[j] = True
        return mask, f"flip {i}"

    def cross(self, a, b, rng):
        child_a, child_b = [], []
        for x, y in zip(a, b):
            x, y = (y, x) if rng.random() < 0.5 else (x, y)
            child_a.append(x)
            child_b.append(y)
        return (child_a if any(child_a) else list(a)), (child_b if any(child_b) else list(b))

    def contains(self, value):
        return (isinstance(value, list) and len(value) == self._n()
                and all(isinstance(v, bool) for v in value) and any(value))

    def distance(self, a, b):
        return sum(x != y for x, y in zip(a, b)) / max(1, len(a))


for _cls in (Categorical, Integer, Uniform, LogUniform, Boolean, LayerMask):
    GENE_TYPES.register(_cls.model_fields["type"].annotation.__args__[0], _cls)


@functools.lru_cache(maxsize=8)
def _gene_adapter(names: tuple[str, ...]) -> TypeAdapter:
    return TypeAdapter(Annotated[Union[tuple(GENE_TYPES.get(n) for n in names)], Field(discriminator="type")])


def _validate_gene(value: Any, handler) -> Any:
    """A gene declaration, by the registered type its ``type`` names (registered genes included)."""
    if isinstance(value, GeneType):
        return value
    return _gene_adapter(GENE_TYPES.names()).validate_python(value)


Gene = Annotated[Any, WrapValidator(_validate_gene)]
"""A search-space gene: any class registered in ``GENE_TYPES`` (a pydantic model with a literal
``type`` and the operators ``sample``, ``mutate``, ``cross`` and ``contains``)."""


def bind_layers(space: dict[str, Gene], n_layers: int) -> dict[str, Gene]:
    """Fill in ``n_layers`` of layer-mask genes that did not set it; refuse a mismatching one."""
    bound = {}
    for name, gene in space.items():
        if isinstance(gene, LayerMask):
            if gene.n_layers is None:
                gene = gene.model_copy(update={"n_layers": n_layers})
            elif gene.n_layers != n_layers:
                raise ValueError(f"search.space.{name}.n_layers is {gene.n_layers} but the model has "
                                 f"{n_layers} blocks; remove n_layers or set it to {n_layers}")
        bound[name] = gene
    return bound


def _clip(x, low, high):
    return min(max(x, low), high)


def _reflect(x: float, low: float, high: float) -> float:
    """``x`` folded back into [low, high] at the bounds (a step past a bound comes back by the same
    amount), so mutated values do not pile up on the bounds as clipping makes them."""
    width = high - low
    if width <= 0:
        return low
    y = (x - low) % (2 * width)
    return low + (y if y <= width else 2 * width - y)


def _span_distance(a: float, b: float, low: float, high: float) -> float:
    return 0.0 if high <= low else min(1.0, abs(a - b) / (high - low))


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
