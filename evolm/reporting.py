"""Who hears about a run's progress: the ``Reporter`` hooks and the reporters that ship with evolm.

A reporter is any object with these five methods (subclass ``Reporter`` to get no-op defaults):

    message(text)                              a line for people
    generation_start(stage, generation, todo)  ``todo`` evaluations are about to run
    evaluation_done(record)                    an ``EvaluationRecord``, as written to evaluations.jsonl
    generation_end(record)                     a ``GenerationRecord``
    stage_end(summary)                         a ``StageSummary``, after the stage's merge

``log`` logs one line per generation and stage; ``console`` (registered by ``evolm.cli``, which owns
the terminal) prints them with a progress bar; TensorBoard and MLflow wrap either (``evolm.tracking``).
"""
from __future__ import annotations

import logging

from evolm.records import EvaluationRecord, GenerationRecord, StageSummary
from evolm.registry import REPORTERS

log = logging.getLogger(__name__)


class Reporter:
    """No-op hooks: override what you need."""

    def message(self, text: str) -> None:
        pass

    def generation_start(self, stage: int, generation: int, todo: int) -> None:
        pass

    def evaluation_done(self, record: EvaluationRecord) -> None:
        pass

    def generation_end(self, record: GenerationRecord) -> None:
        pass

    def stage_end(self, summary: StageSummary) -> None:
        pass


@REPORTERS.register("log")
class LogReporter(Reporter):
    """One ``logging`` line per message, generation and stage (the library's default)."""

    def message(self, text: str) -> None:
        log.info(text)

    def generation_end(self, r: GenerationRecord) -> None:
        log.info("stage %s gen %s: best %s median %s worst %s", r.stage, r.generation, r.best, r.median, r.worst)

    def stage_end(self, s: StageSummary) -> None:
        log.info("stage %s done: %.4f -> %.4f", s.stage, s.start_loss, s.end_loss)
