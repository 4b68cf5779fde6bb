"""What an evaluation measures: built-in objectives and the user's own.

An objective is a function that returns a number. evolm minimises every objective; one declared
``maximize`` is stored negated (readers of a run show it un-negated: ``search.directions`` in
config.yaml). Objectives run where the evaluation runs (a Ray worker): the driver resolves the
names once and ships the objects with the stage.

    search:
      objectives: [val_loss, mypkg.metrics:distinct_tokens]   # a registered name, or module:function

A function registered in ``OBJECTIVES`` or named as ``module:function`` takes one of two forms,
told apart by its signature (the number of arguments without a default):

    def score(model, tokenizer, validation) -> float   # the trained model (eval mode, no gradients),
                                                        # the run's tokenizer, the stage's validation
                                                        # examples as read from its files
    def score(ctx) -> float                             # an ``EvalContext``: all of that, plus the
                                                        # token blocks, the device, the training settings

``validation`` holds the first ``training.eval_max_examples`` examples of the validation split (text
documents; records for formats that read records). The function may set
``score.direction = "maximize"`` (default ``minimize``). A module next to the experiment file is
importable by its name (``answer_metrics:answer_f1`` beside ``experiments/x.yaml``); anything else
must be installed or on PYTHONPATH. It is code the user chose to run, imported in the driver and on
every worker (which receive it by value). A returned NaN, inf or non-number, or an exception, fails
that one evaluation (recorded with the error; the run goes on); an import that fails stops the run
before it starts.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from evolm.registry import OBJECTIVES

DIRECTIONS = ("minimize", "maximize")
FORMS = ("ctx", "model, tokenizer, validation")
"""What a function takes: an ``EvalContext``, or the model, the tokenizer and the validation examples."""


class ObjectiveFailed(RuntimeError):
    """A user's objective raised, or returned something that is not a finite number: that evaluation fails."""


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
    """False when training stopped on a non-finite loss: every objective but adapter_params is then NaN."""
    tokenizer: object = None
    """The run's tokenizer (as saved with every stage model)."""
    validation: list = field(default_factory=list)
    """The stage's validation examples as read from its files (documents, or records), at most
    ``training.eval_max_examples`` of them."""
    curve: dict | None = None
    """The training curve's summary (``epsilon`` there when it trained with ``training.privacy``)."""
    _answers: list | None = None
    _classes: tuple | None = None

    def has(self, needs: str) -> bool:
        """Whether this evaluation has what an objective needs: ``retention`` blocks, ``epsilon`` (a private training's), ``answers``
        (answer-only Q&A validation rows) or ``classes`` (classification validation rows)."""
        if needs == "retention":
            return needs in self.blocks
        if needs == "epsilon":  # a measure of the training itself (``training.privacy``)
            return needs in (self.curve or {})
        names = self.blocks["validation"].dtype.names or ()
        return {"answers": "labels", "classes": "label"}.get(needs) in names

    def classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, true) classes of the validation rows, within ``training.eval_max_batches``."""
        from evolm.classify import predictions

        if self._classes is None:  # accuracy and macro_f1 share one pass
            self._classes = predictions(self.model, self.blocks["validation"], self.training["eval_batch_size"],
                                        self.training["eval_max_batches"], self.device)
        return self._classes

    def answers(self) -> list:
        """(generated, reference) answer tokens of the first ``training.eval_max_examples`` validation rows."""
        from evolm.answers import greedy_answers

        if self._answers is None:
            self._answers = greedy_answers(self.model, self.blocks["validation"],
                                           self.training["eval_max_examples"], self.device)
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
    measure: Callable
    direction: str = "minimize"
    needs: str | None = None
    """What the objective needs (``EvalContext.has``: retention, epsilon, answers, classes); an evaluation without
    it does not measure it, and the search counts it as 0 there."""
    form: str = "ctx"
    """What ``measure`` takes (``FORMS``)."""

    def __reduce__(self):
        # A user's function travels by value: a Ray worker need not be able to import its module
        # (a test file, a notebook, a script). Ray's wire, never a file on disk.
        return _objective_from_wire, (self.name, _function_bytes(self.measure), self.direction, self.needs, self.form)

    @property
    def builtin(self) -> bool:
        return self.name in ALWAYS_MEASURED

    def value(self, ctx: EvalContext) -> float:
        """The measured number in evolm's direction (lower is better); a user's objective that raises
        or returns a non-number raises ``ObjectiveFailed`` naming it and the fix."""
        if self.builtin:  # evolm's own: its exceptions (a GPU out of memory) reach the executor as they are
            raw = float(self.measure(ctx))
            return -raw if self.direction == "maximize" else raw
        if not ctx.trained_ok:  # a diverged model: the loss says why the evaluation failed
            return float("nan")
        try:
            raw = (self.measure(ctx) if self.form == "ctx" else
                   self.measure(ctx.model, ctx.tokenizer, ctx.validation))
        except Exception as exc:  # noqa: BLE001 - the user's code may fail in any way; the record keeps its traceback
            raise ObjectiveFailed(f"objective '{self.name}' raised; fix the function or drop it from "
                                  f"search.objectives") from exc
        if isinstance(raw, bool) or not isinstance(raw, (int, float, np.floating, np.integer)):
            shown = repr(raw) if len(repr(raw)) <= 80 else repr(raw)[:80] + " ..."
            raise ObjectiveFailed(f"objective '{self.name}' returned {shown} ({type(raw).__name__}), not a number; "
                                  f"make it return an int or float (a tensor: .item())")
        raw = float(raw)
        return -raw if self.direction == "maximize" else raw


def non_finite_error(values: dict[str, float]) -> str | None:
    """Why an evaluation whose objectives include NaN or inf failed (None: all are finite)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return None
    losses = {k: v for k, v in bad.items() if k in ALWAYS_MEASURED}
    if losses:  # training diverged: the user's objectives were not even measured
        return f"non-finite validation loss ({', '.join(f'{k}={v}' for k, v in losses.items())})"
    name, v = next(iter(bad.items()))
    return (f"objective '{name}' returned {'nan' if math.isnan(v) else 'inf'}, not a finite number; make the "
            f"function return a finite number for every model (a NaN or inf fails the evaluation)")


OBJECTIVES.register("val_loss", Objective("val_loss", lambda ctx: ctx.loss("validation")))
OBJECTIVES.register("retention_loss", Objective("retention_loss", lambda ctx: ctx.loss("retention"),
                                                needs="retention"))
OBJECTIVES.register("adapter_params", Objective("adapter_params", lambda ctx: float(ctx.adapter_params)))
# the differential-privacy ε the adapter's training spent (``training.privacy``, ``evolm.privacy``)
OBJECTIVES.register("epsilon", Objective("epsilon", lambda ctx: float(ctx.curve["epsilon"]), needs="epsilon"))
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
ALWAYS_MEASURED = ("val_loss", "adapter_params", "retention_loss", "epsilon", "accuracy", "macro_f1", "exact_match",
                   "token_f1")
"""Recorded for every evaluation where it applies (``Objective.needs``), whatever the search uses."""


def fitness_value(measured: dict[str, float], name: str) -> float:
    """An evaluation's value of objective ``name`` for the search: 0 where it does not apply (an
    objective that needs what this stage lacks), so it does not rank that stage's genomes."""
    entry = OBJECTIVES.get(name) if name in OBJECTIVES else None
    if isinstance(entry, Objective) and entry.needs is not None:
        return measured.get(name, 0.0)
    return measured[name]


def resolve_objective(name: str, search_dir: Path | None = None) -> Objective:
    """A registered objective, or ``module:function`` imported (looked for in ``search_dir``, the
    experiment file's folder, first); ValueError says what is wrong."""
    if name in OBJECTIVES:
        entry = OBJECTIVES.get(name)
        return entry if isinstance(entry, Objective) else _wrap(name, entry)
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown objective '{name}'; use one of {', '.join(OBJECTIVES.names())} "
                         f"or an importable module:function")
    try:
        with _importable_from(search_dir):
            fn = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way while it is imported
        where = f" or in {Path(search_dir).resolve()}" if search_dir is not None else ""
        raise ValueError(f"objective '{name}' cannot be imported ({type(exc).__name__}: {exc}); check the "
                         f"module is installed, on PYTHONPATH{where} and defines {attr}") from None
    return _wrap(name, fn)


@contextlib.contextmanager
def _importable_from(folder: Path | None):
    """``folder`` first on ``sys.path`` while a module is imported; the module, once imported, stays in
    ``sys.modules`` (later look-ups find it) and travels to the workers by value."""
    if folder is None:
        yield
        return
    entry = str(Path(folder).resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        sys.path.remove(entry)


def _wrap(name: str, fn) -> Objective:
    """A plain function as an objective; ``fn.direction`` (default ``minimize``) says which way is better."""
    if not callable(fn):
        raise ValueError(f"objective '{name}' is not a function")
    direction = getattr(fn, "direction", "minimize")
    if direction not in DIRECTIONS:
        raise ValueError(f"objective '{name}': direction must be one of {DIRECTIONS}, not {direction!r}")
    return Objective(name, fn, direction, form=_form(name, fn))


def _form(name: str, fn) -> str:
    """``ctx`` for a function of one argument, the other form for one of three (arguments with a
    default not counted); anything else is refused."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: the form of old
        return "ctx"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    if len(required) == 1:
        return "ctx"
    if len(required) == 3:
        return FORMS[1]
    raise ValueError(f"objective '{name}' takes ({', '.join(p.name for p in required)}); it must take "
                     f"(model, tokenizer, validation) or (ctx)")


def measure_all(requested: list[Objective], ctx: EvalContext) -> dict[str, float]:
    """The always-measured objectives, then the requested ones, by name."""
    import torch

    wanted = [OBJECTIVES.get(n) for n in ALWAYS_MEASURED] + [o for o in requested if o.name not in ALWAYS_MEASURED]
    with torch.no_grad():
        return {o.name: o.value(ctx) for o in wanted if o.needs is None or ctx.has(o.needs)}


def validation_examples(examples: list, training: dict) -> list:
    """The validation examples user objectives see: the first ``training.eval_max_examples`` (all when
    None), so a large validation file does not travel to every worker."""
    cap = training.get("eval_max_examples")
    return list(examples if cap is None else examples[:cap])


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


def _objective_from_wire(name: str, function: bytes, direction: str, needs: str | None,
                         form: str = "ctx") -> Objective:
    from ray import cloudpickle  # pickling happens on the way to Ray workers only

    return Objective(name, cloudpickle.loads(function), direction, needs, form)
