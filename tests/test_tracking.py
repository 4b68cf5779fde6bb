"""Progress for people (ConsoleReporter) and for tools (TensorBoard, MLflow), fed with run records."""
import io
import json

import pytest

import evolm.tracking as tracking
from evolm.cli import ConsoleReporter
from evolm.config import parse_config
from evolm.errors import ConfigError, EvolmError
from evolm.tracking import TrackingReporter, gene_params, with_tracking
from tests.conftest import tiny_experiment


def evaluation(i, status="ok", cached=False, seconds=2.0):
    return {"stage": 1, "stage_name": "code", "generation": 0, "genome_id": f"g{i:07d}", "status": status,
            "objectives": {"val_loss": 3.0 + i} if status == "ok" else None,
            "error": None if status == "ok" else "boom",
            "seconds": seconds, "train_seconds": 1.5, "cached": cached, "curve": {"steps": 4},
            "values": {"r": 4, "learning_rate": 1e-3, "layers": [True, False], "target_modules": ["c_attn", "c_fc"]}}


GENERATION = {"stage": 1, "stage_name": "code", "generation": 0, "best": 3.0, "median": 3.5, "worst": 4.0,
              "evaluations": 2, "failed": 0, "seconds": 2.0, "population": ["g0000000", "g0000001"]}
STAGE = {"stage": 1, "name": "code", "start_loss": 5.0, "end_loss": 4.0, "winner": {"id": "g0000000"},
         "evaluations": 2, "seconds": 3.0}


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_console_in_a_pipe_writes_plain_lines_with_workers_busy():
    out = io.StringIO()
    reporter = ConsoleReporter(out, workers=2)
    reporter.generation_start(1, 0, 2)
    for i in range(2):
        reporter.evaluation_done(evaluation(i, seconds=2.0))
    reporter.evaluation_done(evaluation(5, cached=True, seconds=9.0))  # a twin served from the cache: no work
    reporter.generation_end(GENERATION)
    reporter.stage_end(STAGE)
    text = out.getvalue()
    assert reporter.bar is None and "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("stage 1 code gen 0: best 3.0000") and lines[0].endswith("workers busy 100%")
    assert lines[1] == "stage 1 code merged g0000000: test loss 5.0000 -> 4.0000 (2 evals, 3s)"


def test_workers_busy_is_evaluation_time_over_wall_time_times_workers():
    out = io.StringIO()
    reporter = ConsoleReporter(out, workers=4)
    reporter.generation_start(1, 0, 1)
    reporter.evaluation_done(evaluation(0, seconds=3.0))
    reporter.generation_end(GENERATION | {"seconds": 2.0})
    assert "workers busy 38%" in out.getvalue()


def test_tracking_is_off_by_default_and_validated(corpora, tmp_path):
    config = parse_config(tiny_experiment(corpora, tmp_path))
    console = ConsoleReporter(io.StringIO())
    assert config.tracking.tensorboard is False and config.tracking.mlflow is False and config.prompts == []
    assert with_tracking(console, config, tmp_path) is console
    with pytest.raises(ConfigError, match="tracking.wandb: unknown key"):
        parse_config(tiny_experiment(corpora, tmp_path, tracking={"wandb": True}))


def test_a_missing_tracking_package_says_what_to_install(corpora, tmp_path, monkeypatch):
    real = tracking.importlib.import_module

    def without_mlflow(name, *args):
        if name.split(".")[0] == "mlflow":
            raise ImportError(f"No module named '{name}'")
        return real(name, *args)

    monkeypatch.setattr(tracking.importlib, "import_module", without_mlflow)
    config = parse_config(tiny_experiment(corpora, tmp_path, tracking={"mlflow": True}))
    with pytest.raises(EvolmError, match=r"tracking.mlflow is on but the package 'mlflow' is not installed: "
                                         r"pip install mlflow \(or set tracking.mlflow: false\)"):
        with_tracking(Recorder(), config, tmp_path)


def test_gene_values_become_flat_params():
    assert gene_params({"r": 4, "layers": [True, False, True], "target_modules": ["c_attn", "c_fc"]}) == {
        "r": 4, "layers": "101", "target_modules": "c_attn+c_fc"}


def test_tensorboard_gets_every_evaluation_and_generation(corpora, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = {"tensorboard": True, "dir": str(tmp_path / "tb")}
    config = parse_config(tiny_experiment(corpora, tmp_path, tracking=tb))
    inner = Recorder()
    reporter = with_tracking(inner, config, tmp_path / "run")
    assert isinstance(reporter, TrackingReporter)
    reporter.generation_start(1, 0, 3)
    for record in (evaluation(0), evaluation(1), evaluation(2, status="failed"), evaluation(0, cached=True)):
        reporter.evaluation_done(record)
    reporter.generation_end(GENERATION)
    reporter.stage_end(STAGE)
    reporter.stage_end(STAGE | {"stage": 2})  # the last stage closes the writers
    assert reporter.closed
    assert [c[0] for c in inner.calls] == ["generation_start"] + ["evaluation_done"] * 4 + [
        "generation_end", "stage_end", "stage_end"]

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("evaluation/code/val_loss")] == [3.0, 4.0]
    assert [e.value for e in events.Scalars("evaluation/failed")] == [0.0, 0.0, 1.0]
    assert [e.value for e in events.Scalars("generation/code/best_val_loss")] == [3.0]
    assert "stage/test_loss_end" in scalars
    runs = sorted(p.name for p in (tmp_path / "tb" / "tensorboard" / "evaluations").iterdir())
    assert runs == ["00000-g0000000", "00001-g0000001", "00002-g0000002"]  # one HParams row per evaluation


def test_mlflow_gets_a_child_run_per_evaluation(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    sink = tracking.MlflowSink(tmp_path / "mlruns", "tiny", "run1", {"seed": 7})
    reporter = TrackingReporter(Recorder(), [sink], n_stages=1)
    reporter.evaluation_done(evaluation(0))
    reporter.evaluation_done(evaluation(1, status="failed"))
    reporter.generation_end(GENERATION)
    reporter.stage_end(STAGE)
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["run1"].info.status == "FINISHED" and by_name["run1"].data.metrics["code/best_val_loss"] == 3.0
    child = by_name["stage1-gen0-g0000000"]
    assert child.data.params["layers"] == "10" and child.data.metrics["val_loss"] == 3.0
    assert by_name["stage1-gen0-g0000001"].info.status == "FAILED"
    assert json.dumps(sorted(by_name))  # names are plain text
