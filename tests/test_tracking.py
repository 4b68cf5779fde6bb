"""Progress for people (ConsoleReporter) and for tools (TensorBoard, MLflow), fed with run records."""
import io
import math

import pytest

import evolm.tracking as tracking
from evolm.records import EvaluationRecord, GenerationRecord, StageSummary
from evolm.cli import ConsoleReporter
from evolm.configfile import parse_config
from evolm.errors import ConfigError, EvolmError
from evolm.tracking import TrackingReporter, gene_params, with_tracking
from tests.conftest import tiny_experiment


def evaluation(i, status="ok", cached=False, seconds=2.0):
    return EvaluationRecord.from_json({"stage": 1, "stage_name": "code", "generation": 0, "genome_id": f"g{i:07d}", "status": status,
            "objectives": {"val_loss": 3.0 + i} if status == "ok" else None,
            "error": None if status == "ok" else "boom",
            "seconds": seconds, "train_seconds": 1.5, "cached": cached, "curve": {"steps": 4},
            "values": {"r": 4, "learning_rate": 1e-3, "layers": [True, False], "target_modules": ["c_attn", "c_fc"]}})


GENERATION_JSON = {"stage": 1, "stage_name": "code", "generation": 0, "best": 3.0, "median": 3.5, "worst": 4.0,
              "evaluations": 2, "failed": 0, "seconds": 2.0, "population": ["g0000000", "g0000001"]}
STAGE_JSON = {"stage": 1, "name": "code", "start_loss": 5.0, "end_loss": 4.0, "winner": {"id": "g0000000"},
         "evaluations": 2, "seconds": 3.0}



def gen(**changes) -> GenerationRecord:
    return GenerationRecord.from_json(GENERATION_JSON | changes)


def stage(**changes) -> StageSummary:
    return StageSummary.from_json(STAGE_JSON | changes)


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
    reporter.generation_end(gen())
    reporter.stage_end(stage())
    text = out.getvalue()
    assert reporter.bar is None and "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("stage 1 code gen 0: best 3.0000") and lines[0].endswith("workers busy 100%")
    assert lines[1] == "stage 1 code merged g0000000: test loss 5.0000 -> 4.0000 (2 evals, 3s)"


def test_console_shows_a_maximised_first_objective_as_measured():
    out = io.StringIO()
    reporter = ConsoleReporter(out, workers=1, objective="accuracy", maximize=True)
    reporter.generation_end(gen(best=-0.9, median=-0.5, worst=-0.1))  # stored negated: evolm minimises
    assert out.getvalue().startswith("stage 1 code gen 0: accuracy best 0.9000 median 0.5000 worst 0.1000")


def test_workers_busy_is_evaluation_time_over_wall_time_times_workers():
    out = io.StringIO()
    reporter = ConsoleReporter(out, workers=4)
    reporter.generation_start(1, 0, 1)
    reporter.evaluation_done(evaluation(0, seconds=3.0))
    reporter.generation_end(gen(**{"seconds": 2.0}))
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


def scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path))
    events.Reload()
    return events


def hparams_row(path):
    """The hyperparameters and metrics of one HParams row (one evaluation's run directory)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = read_events(path)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return values, {tag: scalars(events, tag) for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_evaluation_and_generation(corpora, tmp_path):
    pytest.importorskip("tensorboard")

    tb = {"tensorboard": True, "dir": str(tmp_path / "tb")}
    config = parse_config(tiny_experiment(corpora, tmp_path, tracking=tb))
    inner = Recorder()
    reporter = with_tracking(inner, config, tmp_path / "run")
    assert isinstance(reporter, TrackingReporter)
    records = [evaluation(0, seconds=1.0), evaluation(1, seconds=2.0), evaluation(2, status="failed", seconds=3.0),
               evaluation(0, cached=True, seconds=9.0)]  # a twin served from the cache: not logged again
    reporter.generation_start(1, 0, 3)
    for record in records:
        reporter.evaluation_done(record)
    reporter.generation_end(gen())
    reporter.generation_end(gen(**{"generation": 1, "best": 2.5, "median": 3.0, "worst": 3.5, "seconds": 4.0}))
    reporter.stage_end(stage())
    assert not reporter.closed  # stage 1 of 2: the writers stay open
    reporter.stage_end(stage(**{"stage": 2, "name": "qa", "start_loss": 4.5, "end_loss": 3.5}))
    assert reporter.closed  # the last stage closes the writers
    # the console behind it saw every hook, with the very same records, in order
    assert inner.calls == [("generation_start", (1, 0, 3))] + [("evaluation_done", (r,)) for r in records] + [
        ("generation_end", (gen(),)), ("generation_end", (gen(**{"generation": 1, "best": 2.5,
                                                                            "median": 3.0, "worst": 3.5,
                                                                            "seconds": 4.0}),)),
        ("stage_end", (stage(),)), ("stage_end", (stage(**{"stage": 2, "name": "qa", "start_loss": 4.5,
                                                        "end_loss": 3.5}),))]

    events = read_events(tmp_path / "tb" / "tensorboard")
    # (step, value): one step per evaluation that trained, failed ones included, the cached twin left out
    assert scalars(events, "evaluation/code/val_loss") == [(0, 3.0), (1, 4.0)]
    assert scalars(events, "evaluation/failed") == [(0, 0.0), (1, 0.0), (2, 1.0)]
    assert scalars(events, "evaluation/seconds") == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert scalars(events, "evaluation/steps") == [(0, 4.0), (1, 4.0), (2, 4.0)]
    # one step per generation
    assert scalars(events, "generation/code/best_val_loss") == [(0, 3.0), (1, 2.5)]
    assert scalars(events, "generation/code/median_val_loss") == [(0, 3.5), (1, 3.0)]
    assert scalars(events, "generation/code/worst_val_loss") == [(0, 4.0), (1, 3.5)]
    assert scalars(events, "generation/seconds") == [(0, 2.0), (1, 4.0)]
    # the stage's number is the step
    assert scalars(events, "stage/test_loss_start") == [(1, 5.0), (2, 4.5)]
    assert scalars(events, "stage/test_loss_end") == [(1, 4.0), (2, 3.5)]
    assert sorted(events.Tags()["scalars"]) == sorted(
        ["evaluation/code/val_loss", "evaluation/failed", "evaluation/seconds", "evaluation/steps",
         "generation/code/best_val_loss", "generation/code/median_val_loss", "generation/code/worst_val_loss",
         "generation/seconds", "stage/test_loss_start", "stage/test_loss_end"])

    # one HParams row per evaluation that trained: its gene values flattened, its loss (NaN when it failed)
    rows = tmp_path / "tb" / "tensorboard" / "evaluations"
    assert sorted(p.name for p in rows.iterdir()) == ["00000-g0000000", "00001-g0000001", "00002-g0000002"]
    genes = {"r": 4.0, "learning_rate": 1e-3, "layers": "10", "target_modules": "c_attn+c_fc"}
    for step, name in enumerate(sorted(p.name for p in rows.iterdir())):
        values, metrics = hparams_row(rows / name)
        assert values == {"stage": 1.0, "generation": 0.0, "genome_id": f"g{step:07d}", **genes}
        assert metrics["hparam/seconds"] == [(step, 1.0 + step)]
        [(logged_step, loss)] = metrics["hparam/val_loss"]
        assert logged_step == step
        assert (math.isnan(loss) if step == 2 else loss == 3.0 + step)


def test_tensorboard_logs_into_the_run_directory_by_default(corpora, tmp_path):
    pytest.importorskip("tensorboard")
    config = parse_config(tiny_experiment(corpora, tmp_path, tracking={"tensorboard": True}, stages=[
        tiny_experiment(corpora, tmp_path)["stages"][0]]))
    reporter = with_tracking(Recorder(), config, tmp_path / "run")
    reporter.evaluation_done(evaluation(3))
    reporter.stage_end(stage())
    assert reporter.closed  # one stage: its end is the run's end
    assert scalars(read_events(tmp_path / "run" / "tensorboard"), "evaluation/code/val_loss") == [(0, 6.0)]


def test_mlflow_gets_a_child_run_per_evaluation(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    sink = tracking.MlflowSink(tmp_path / "mlruns", "tiny", "run1", {"seed": 7, "stages": "code,qa"})
    reporter = TrackingReporter(Recorder(), [sink], n_stages=2)
    reporter.evaluation_done(evaluation(0))
    reporter.evaluation_done(evaluation(1, status="failed"))
    reporter.evaluation_done(evaluation(0, cached=True))  # a twin served from the cache: no child run
    reporter.generation_end(gen())
    reporter.generation_end(gen(**{"generation": 1, "best": 2.5, "median": 3.0, "worst": 3.5}))
    reporter.stage_end(stage())
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment_id = client.get_experiment_by_name("tiny").experiment_id

    def runs():
        return {r.info.run_name: r for r in client.search_runs([experiment_id])}

    assert runs()["run1"].info.status == "RUNNING"  # stage 1 of 2
    reporter.stage_end(stage(**{"stage": 2, "start_loss": 4.5, "end_loss": 3.5}))
    by_name = runs()
    assert sorted(by_name) == ["run1", "stage1-gen0-g0000000", "stage1-gen0-g0000001"]
    parent = by_name["run1"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"seed": "7", "stages": "code,qa"}
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, key)]  # noqa: E731
    assert sorted(history("code/best_val_loss")) == [(0, 3.0), (1, 2.5)]
    assert sorted(history("code/median_val_loss")) == [(0, 3.5), (1, 3.0)]
    assert sorted(history("code/worst_val_loss")) == [(0, 4.0), (1, 3.5)]
    assert sorted(history("generation_seconds")) == [(0, 2.0), (1, 2.0)]
    assert sorted(history("test_loss_start")) == [(1, 5.0), (2, 4.5)]
    assert sorted(history("test_loss_end")) == [(1, 4.0), (2, 3.5)]

    child = by_name["stage1-gen0-g0000000"]
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["stage"] == "code" and child.data.tags["status"] == "ok"
    assert child.data.params == {"stage": "1", "generation": "0", "r": "4", "learning_rate": "0.001",
                                 "layers": "10", "target_modules": "c_attn+c_fc"}
    assert child.data.metrics == {"val_loss": 3.0, "seconds": 2.0, "steps": 4.0}
    failed = by_name["stage1-gen0-g0000001"]
    assert failed.info.status == "FAILED" and failed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert failed.data.tags["status"] == "failed" and failed.data.tags["error"] == "boom"
    assert failed.data.metrics == {"seconds": 2.0, "steps": 4.0}  # no loss for an evaluation that failed


def test_mlflow_run_params_come_from_the_experiment(corpora, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    config = parse_config(tiny_experiment(corpora, tmp_path, tracking={"mlflow": True, "dir": str(tmp_path / "t")}))
    reporter = with_tracking(Recorder(), config, tmp_path / "run-7")
    reporter.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "t" / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "run-7" and run.info.status == "FINISHED"
    assert run.data.params == {"seed": "7", "stages": "code,qa", "population_size": "3", "offspring_size": "3",
                               "generations": "1", "workers": "2"}


def test_a_real_run_with_tensorboard_logs_what_the_ledger_holds(corpora, tmp_path):
    """The run's own records reach TensorBoard: one val_loss point per trained evaluation, in order."""
    pytest.importorskip("tensorboard")
    from evolm.continual import ContinualRun
    from evolm.executor import LocalExecutor
    from evolm.rundir import load_run

    raw = tiny_experiment(corpora, tmp_path, tracking={"tensorboard": True})
    raw["stages"] = raw["stages"][:1]
    config = parse_config(raw)
    run_dir = tmp_path / "run"
    reporter = with_tracking(Recorder(), config, run_dir)
    ContinualRun(config, run_dir, lambda: LocalExecutor(threads=1), reporter).run()
    assert reporter.closed
    trained = load_run(run_dir).evaluated()
    events = read_events(run_dir / "tensorboard")
    logged = scalars(events, "evaluation/code/val_loss")
    assert [v for _, v in logged] == pytest.approx([e.val_loss for e in trained if e.val_loss is not None])
    assert [s for s, _ in scalars(events, "stage/test_loss_end")] == [1]
