"""Who hears about a run's progress: the ``Reporter`` hooks and the reporters that ship with evolm.

A reporter is any object with these five methods (subclass ``Reporter`` to get no-op defaults):

    message(text)                              a line for people
    generation_start(stage, generation, todo)  ``todo`` evaluations are about to run
    evaluation_done(record)                    an ``EvaluationRecord``, as written to evaluations.jsonl
    generation_end(record)                     a ``GenerationRecord``
    stage_end(summary)                         a ``StageSummary``, after the stage's merge

``log`` logs one line per generation and stage; ``console`` (the CLI's) prints them with a progress
bar in a terminal; TensorBoard and MLflow wrap either (``evolm.tracking``).
"""
from __future__ import annotations

import logging
import sys
import time

from evolm.records import EvaluationRecord, GenerationRecord, StageSummary, utilisation
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


@REPORTERS.register("console")
class ConsoleReporter(Reporter):
    """Progress for people: a bar of evaluations in a terminal, plain lines in logs."""

    def __init__(self, stream=sys.stdout, workers: int = 1):
        # A bar only when both streams are terminals: logs and pipes get plain lines, no control characters.
        self.stream, self.bar, self.tty = stream, None, stream.isatty() and sys.stderr.isatty()
        self.workers, self.busy = max(1, workers), 0.0

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        self._line(text)

    def generation_start(self, stage: int, generation: int, todo: int) -> None:
        self.started, self.busy = time.perf_counter(), 0.0
        if self.tty and todo:
            from tqdm import tqdm

            self.bar = tqdm(total=todo, desc=f"stage {stage} gen {generation}", leave=False, file=sys.stderr,
                            unit="eval")

    def evaluation_done(self, record: EvaluationRecord) -> None:
        if not record.cached:
            self.busy += record.seconds or 0.0
        if self.bar is not None and not record.cached:
            self.bar.update(1)

    def generation_end(self, r: GenerationRecord) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        fmt = lambda x: "  n/a " if x is None else f"{x:.4f}"  # noqa: E731
        busy = utilisation(self.busy, r.seconds, self.workers)
        self._line(f"stage {r.stage} {r.stage_name} gen {r.generation}: best {fmt(r.best)} "
                   f"median {fmt(r.median)} worst {fmt(r.worst)} | {r.evaluations} evals, "
                   f"{r.failed} failed, {r.seconds:.1f}s" + ("" if busy is None else f", workers busy {100 * busy:.0f}%"))

    def stage_end(self, s: StageSummary) -> None:
        self._line(f"stage {s.stage} {s.name} merged {s.winner_id}: test loss "
                   f"{s.start_loss:.4f} -> {s.end_loss:.4f} ({s.evaluations} evals, {s.seconds:.0f}s)")


