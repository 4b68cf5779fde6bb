"""Experiment tracking: every evaluation and generation, also in TensorBoard and MLflow.

``with_tracking(reporter, config, run_dir)`` wraps the reporter the run already has (the console)
in a ``TrackingReporter`` when the experiment's ``tracking`` section turns a tool on, and returns it
unchanged otherwise. Both tools are optional packages, imported only when switched on:

    TensorBoard   <dir>/tensorboard   scalars per evaluation and generation, one HParams row per evaluation
    MLflow        <dir>/mlruns        a local file store: one parent run, one child run per evaluation
                                      (gene values as params), generation statistics on the parent
"""
from __future__ import annotations

import atexit
import importlib
import logging
import os
import time
from pathlib import Path

from evolm.errors import EvolmError
from evolm.genome import value_text
from evolm.records import EvaluationRecord, GenerationRecord, StageSummary

log = logging.getLogger(__name__)


def with_tracking(reporter, config, run_dir: Path):
    """``reporter`` itself, or a TrackingReporter around it when ``config.tracking`` asks for one."""
    t = config.tracking
    if not (t.tensorboard or t.mlflow):
        return reporter
    directory = Path(t.dir) if t.dir is not None else Path(run_dir)
    sinks = []
    if t.tensorboard:
        sinks.append(TensorBoardSink(directory / "tensorboard"))
    if t.mlflow:
        sinks.append(MlflowSink(directory / "mlruns", config.name, Path(run_dir).name, _run_params(config)))
    return TrackingReporter(reporter, sinks, n_stages=len(config.stages))


def require(module: str, package: str, setting: str):
    """Import an optional package, or say how to install it (or turn the setting off)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EvolmError(f"{setting} is on but the package '{package}' is not installed: "
                         f"pip install {package} (or set {setting}: false)") from None


def gene_params(values: dict) -> dict[str, str | int | float | bool]:
    """Gene values as flat scalars for tracking tools (lists become text, masks bits)."""
    return {name: value_text(v) if isinstance(v, list) else v for name, v in (values or {}).items()}


def _run_params(config) -> dict:
    s = config.search
    return {"seed": config.seed, "stages": ",".join(st.name for st in config.stages),
            "population_size": s.population_size, "offspring_size": s.offspring_size,
            "generations": s.generations, "workers": config.ray.num_workers}


class TrackingReporter:
    """Passes every hook to ``inner`` (the console), then logs it to each sink."""

    def __init__(self, inner, sinks: list, n_stages: int):
        self.inner, self.sinks, self.n_stages = inner, sinks, n_stages
        self.evaluations, self.generations, self.closed = 0, 0, False
        atexit.register(self.close, "FAILED")  # a run that dies still leaves a closed, readable log

    def message(self, text: str) -> None:
        self.inner.message(text)

    def generation_start(self, stage: int, generation: int, todo: int) -> None:
        self.inner.generation_start(stage, generation, todo)

    def evaluation_done(self, record: dict) -> None:
        self.inner.evaluation_done(record)
        if not record.cached:
            for sink in self.sinks:
                sink.evaluation(record, self.evaluations)
            self.evaluations += 1

    def generation_end(self, record: dict) -> None:
        self.inner.generation_end(record)
        for sink in self.sinks:
            sink.generation(record, self.generations)
        self.generations += 1

    def stage_end(self, summary: dict) -> None:
        self.inner.stage_end(summary)
        for sink in self.sinks:
            sink.stage(summary)
        if summary.stage == self.n_stages:
            self.close("FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed:
            self.closed = True
            for sink in self.sinks:
                sink.close(status)


class TensorBoardSink:
    def __init__(self, directory: Path):
        require("tensorboard", "tensorboard", "tracking.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(log_dir=str(directory))

    def evaluation(self, r: EvaluationRecord, step: int) -> None:
        loss, w = r.val_loss, self.writer
        if loss is not None:
            w.add_scalar(f"evaluation/{r.stage_name}/val_loss", loss, step)
        w.add_scalar("evaluation/seconds", r.seconds or 0.0, step)
        w.add_scalar("evaluation/failed", float(not r.ok), step)
        if r.curve:
            w.add_scalar("evaluation/steps", r.curve.get("steps") or 0, step)
        hparams = {"stage": r.stage, "generation": r.generation, "genome_id": r.genome_id, **gene_params(r.values)}
        metrics = {"hparam/val_loss": float("nan") if loss is None else loss, "hparam/seconds": r.seconds or 0.0}
        w.add_hparams(hparams, metrics, run_name=f"evaluations/{step:05d}-{r.genome_id}", global_step=step)

    def generation(self, r: GenerationRecord, step: int) -> None:
        for key in ("best", "median", "worst"):
            if getattr(r, key) is not None:
                self.writer.add_scalar(f"generation/{r.stage_name}/{key}_val_loss", getattr(r, key), step)
        self.writer.add_scalar("generation/seconds", r.seconds or 0.0, step)
        self.writer.flush()

    def stage(self, s: StageSummary) -> None:
        self.writer.add_scalar("stage/test_loss_start", s.start_loss, s.stage)
        self.writer.add_scalar("stage/test_loss_end", s.end_loss, s.stage)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowSink:
    """Through ``MlflowClient`` with an explicit file-store URI: no global MLflow state is touched."""

    def __init__(self, directory: Path, experiment: str, run_name: str, params: dict):
        require("mlflow", "mlflow", "tracking.mlflow")
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        # MLflow 3.x keeps the file store only on request; it is what needs no server and no database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=directory.resolve().as_uri())
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        self._log(self.run_id, params=params)

    def _log(self, run_id: str, metrics: dict | None = None, params: dict | None = None, step: int = 0) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()
                                               if v is not None],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])

    def evaluation(self, r: EvaluationRecord, step: int) -> None:
        child = self.client.create_run(self.experiment_id, run_name=f"stage{r.stage}-gen{r.generation}-{r.genome_id}",
                                       tags={"mlflow.parentRunId": self.run_id, "stage": r.stage_name,
                                             "status": r.status})
        metrics = {"val_loss": r.val_loss, "seconds": r.seconds, "steps": (r.curve or {}).get("steps")}
        self._log(child.info.run_id, metrics, {"stage": r.stage, "generation": r.generation, **gene_params(r.values)})
        if not r.ok:
            self.client.set_tag(child.info.run_id, "error", str(r.error)[:5000])
        self.client.set_terminated(child.info.run_id, "FINISHED" if r.ok else "FAILED")

    def generation(self, r: GenerationRecord, step: int) -> None:
        self._log(self.run_id, {f"{r.stage_name}/{k}_val_loss": getattr(r, k) for k in ("best", "median", "worst")}
                  | {"generation_seconds": r.seconds}, step=step)

    def stage(self, s: StageSummary) -> None:
        self._log(self.run_id, {"test_loss_start": s.start_loss, "test_loss_end": s.end_loss}, step=s.stage)

    def close(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001 - closing a log must never hide the run's own outcome
            log.warning("mlflow: could not close run %s: %s", self.run_id, exc)
