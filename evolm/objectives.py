"""What an evaluation measures: built-in objectives and the user's own.

An objective is a function of an ``EvalContext`` (the trained model, the stage's validation blocks,
the evaluation settings) that returns a number. evolm minimises every objective; one declared
``maximize`` is stored negated. Objectives run where the evaluation runs (a Ray worker): the
driver resolves the names once and ships the objects with the stage.

    search:
      objectives: [val_loss, mypkg.metrics:distinct_tokens]   # a registered name, or module:function

A function registered in ``OBJECTIVES`` or named as ``module:function`` may set
``function.direction = "maximize"``. It is code the user
chose to run, imported in the driver and on every worker.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from evolm.registry import OBJECTIVES

DIRECTIONS = ("minimize", "maximize")


@dataclass
class EvalContext:
    model: object
    """The trained PEFT model (eval mode)."""
    blocks: dict[str, np.ndarray]
    """``validation``, and ``retention`` (earlier domains' validation blocks) when the stage has one."""
    training: dict
    device: object
    adapter_params: int
    trained_ok: bool
    """False when training stopped on a non-finite loss: loss objectives are then NaN."""
    _answers: list | None = None

    def has(self, needs: str) -> bool:
        """Whether this evaluation has what an objective needs: ``retention`` blocks, ``answers``
        (answer-only Q&A validation rows) or ``classes`` (classification validation rows)."""
        if needs == "retention":
            return needs in self.blocks
        names = self.blocks["validation"].dtype.names or ()
        return {"answers": "labels", "classes": "label"}.get(needs) in names

    def classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, true) classes of the validation rows, within ``training.eval_max_batches``."""
        from evolm.classify import predictions

        return predictions(self.model, self.blocks["validation"], self.training["eval_batch_size"],
                           self.training["eval_max_batches"], self.device)

    def answers(self) -> list:
        """(generated, reference) answer tokens of the first ``training.eval_answer_examples`` validation rows."""
        from evolm.answers import greedy_answers

        if self._answers is None:
            self._answers = greedy_answers(self.model, self.blocks["validation"],
                                           self.training["eval_answer_examples"], self.device)
        return self._answers

    def loss(self, split: str) -> float:
        """Mean next-token loss on ``blocks[split]``, within ``training.eval_max_batches``."""
        from evolm.train import evaluate

        if not self.trained_ok:
            return float("nan")
        return evaluate(self.model, self.blocks[split], self.training["eval_batch_size"],
                        self.training["eval_max_batches"], self.device)


@dataclass(frozen=True)
class Objective:
    name: str
    measure: Callable[[EvalContext], float]
    direction: str = "minimize"
    needs: str | None = None
    """What the objective needs (``EvalContext.has``: retention, answers, classes); an evaluation without
    it does not measure it, and the search counts it as 0 there."""

    def __reduce__(self):
        # A user's function travels by value: a Ray worker need not be able to import its module
        # (a test file, a notebook, a script). Ray's wire, never a file on disk.
        return _objective_from_wire, (self.name, _function_bytes(self.measure), self.direction, self.needs)

    def value(self, ctx: EvalContext) -> float:
        """The measured number in evolm's direction (lower is better); refuses a non-number."""
        raw = self.measure(ctx)
        if isinstance(raw, bool) or not isinstance(raw, (int, float, np.floating, np.integer)):
            raise TypeError(f"objective '{self.name}' returned {raw!r} ({type(raw).__name__}), not a number")
        raw = float(raw)
        return -raw if self.direction == "maximize" else raw


OBJECTIVES.register("val_loss", Objective("val_loss", lambda ctx: ctx.loss("validation")))
OBJECTIVES.register("retention_loss", Objective("retention_loss", lambda ctx: ctx.loss("retention"),
                                                needs="retention"))
OBJECTIVES.register("adapter_params", Objective("adapter_params", lambda ctx: float(ctx.adapter_params)))
def _accuracy(ctx: EvalContext) -> float:
    predicted, true = ctx.classes()
    return float((predicted == true).mean())


def _macro_f1(ctx: EvalContext) -> float:
    from evolm.classify import macro_f1

    return macro_f1(*ctx.classes())


def _answer_score(score_name: str):
    def measure(ctx: EvalContext) -> float:
        from evolm import answers

        return getattr(answers, score_name)(ctx.answers()) if ctx.trained_ok else float("nan")
    return measure


OBJECTIVES.register("accuracy", Objective("accuracy", _accuracy, "maximize", needs="classes"))
OBJECTIVES.register("macro_f1", Objective("macro_f1", _macro_f1, "maximize", needs="classes"))
OBJECTIVES.register("exact_match", Objective("exact_match", _answer_score("exact_match"), "maximize", needs="answers"))
OBJECTIVES.register("token_f1", Objective("token_f1", _answer_score("token_f1"), "maximize", needs="answers"))
ALWAYS_MEASURED = ("val_loss", "adapter_params", "retention_loss", "accuracy", "macro_f1", "exact_match", "token_f1")
"""Recorded for every evaluation where it applies (``Objective.needs``), whatever the search uses."""


def fitness_value(measured: dict[str, float], name: str) -> float:
    """An evaluation's value of objective ``name`` for the search: 0 where it does not apply (an
    objective that needs what this stage lacks), so it does not rank that stage's genomes."""
    entry = OBJECTIVES.get(name) if name in OBJECTIVES else None
    if isinstance(entry, Objective) and entry.needs is not None:
        return measured.get(name, 0.0)
    return measured[name]


def resolve_objective(name: str) -> Objective:
    """A registered objective, or ``module:function`` imported; ValueError says what is wrong."""
    if name in OBJECTIVES:
        entry = OBJECTIVES.get(name)
        return entry if isinstance(entry, Objective) else _wrap(name, entry)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown objective '{name}'; use one of {', '.join(OBJECTIVES.names())} "
                         f"or an importable module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while it is imported
        raise ValueError(f"objective '{name}' cannot be imported ({type(exc).__name__}: {exc}); check the "
                         f"module is installed or on PYTHONPATH and defines {attr}") from None
    return _wrap(name, fn)


def _wrap(name: str, fn) -> Objective:
    """A plain function as an objective; ``fn.direction`` (default ``minimize``) says which way is better."""
    if not callable(fn):
        raise ValueError(f"objective '{name}' is not a function")
    direction = getattr(fn, "direction", "minimize")
    if direction not in DIRECTIONS:
        raise ValueError(f"objective '{name}': direction must be one of {DIRECTIONS}, not {direction!r}")
    return Objective(name, fn, direction)


def measure_all(requested: list[Objective], ctx: EvalContext) -> dict[str, float]:
    """The always-measured objectives, then the requested ones, by name."""
    import torch

    wanted = [OBJECTIVES.get(n) for n in ALWAYS_MEASURED] + [o for o in requested if o.name not in ALWAYS_MEASURED]
    with torch.no_grad():
        return {o.name: o.value(ctx) for o in wanted if o.needs is None or ctx.has(o.needs)}



def _function_bytes(fn) -> bytes:
    from ray import cloudpickle  # pickling happens on the way to Ray workers only

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    by_value = module is not None and module.__name__ != "__main__" and not module.__name__.startswith("evolm")
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(fn)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def _objective_from_wire(name: str, function: bytes, direction: str, needs: str | None) -> Objective:
    from ray import cloudpickle  # pickling happens on the way to Ray workers only

    return Objective(name, cloudpickle.loads(function), direction, needs)
