"""evolm as a library: ``run``, ``resume`` and ``load_run``; the CLI is a thin layer over them.

    import evolm
    summaries = evolm.run("experiments/quickstart.yaml")             # or a dict, or an ExperimentConfig
    summaries = evolm.resume("results/quickstart-20261203-101500")
    run = evolm.load_run("results/quickstart-20261203-101500")       # typed records of a run directory

``executor`` names a registered executor (``local``: in this process; ``ray``: Ray workers).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from evolm.config import ExperimentConfig
from evolm.configfile import load_config, parse_config, resume_differences
from evolm.errors import EvolmError, RunDirError
from evolm.records import StageSummary
from evolm.registry import EXECUTORS


def as_config(config: ExperimentConfig | dict | str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """An ``ExperimentConfig`` from itself, a dict (paths relative to the current folder) or a YAML path."""
    if isinstance(config, ExperimentConfig):
        return config if not overrides else parse_config(_with_overrides(config.model_dump(mode="json"), overrides))
    if isinstance(config, dict):
        return parse_config(_with_overrides(config, overrides or {}))
    return load_config(config, overrides)


def new_run_dir(config: ExperimentConfig, name: str | None = None) -> Path:
    """``<output_dir>/<name>``, by default ``<experiment>-<yyyymmdd-hhmmss>``; refused if it holds anything.
    ``name`` is one folder name: the run never lands outside ``output_dir``."""
    from evolm.rundir import holds_a_run
    from evolm.runlock import LOCK_FILE, refuse_if_in_use
    from evolm.safenames import folder_name

    run_dir = config.output_dir / (folder_name(name) if name is not None else
                                   f"{config.name}-{datetime.now():%Y%m%d-%H%M%S}")
    refuse_if_in_use(run_dir)
    if holds_a_run(run_dir):
        raise RunDirError(f"{run_dir} already holds a run; resume it (evolm resume {run_dir}) or choose another --name")
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):  # a lock left by a killed start
        raise RunDirError(f"{run_dir} already exists and is not empty; choose another --name, or continue "
                          f"it with `evolm resume {run_dir}`")
    return run_dir


def run(config: ExperimentConfig | dict | str | Path, run_dir: str | Path | None = None, *,
        executor: str = "ray", reporter=None, ray_address: str | None = None) -> list[StageSummary]:
    """Run an experiment from the beginning; returns one ``StageSummary`` per stage.
    ``run_dir``: where the run writes (default: a new folder under ``config.output_dir``)."""
    from evolm.continual import ContinualRun
    from evolm.diskfull import stop_when_disk_full
    from evolm.runlock import run_lock

    config = as_config(config)
    run_dir = new_run_dir(config) if run_dir is None else Path(run_dir)
    make_executor = _executor_factory(config, executor, ray_address)
    with run_lock(run_dir), stop_when_disk_full(run_dir):  # the lock: a second run or resume here is refused
        return ContinualRun(config, run_dir, make_executor, reporter).run()


def resume(run_dir: str | Path, *, experiment: ExperimentConfig | dict | str | Path | None = None,
           executor: str = "ray", reporter=None, ray_address: str | None = None,
           workers: int | None = None) -> list[StageSummary]:
    """Continue a run from its newest checkpoint. ``experiment``: an extended version of the run's
    experiment (more generations, stages appended); any other change is refused."""
    from evolm.continual import ContinualRun
    from evolm.diskfull import stop_when_disk_full
    from evolm.runlock import run_lock

    config = resume_config(run_dir, experiment)
    if workers is not None:
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"num_workers": workers})})
    make_executor = _executor_factory(config, executor, ray_address)
    with run_lock(run_dir), stop_when_disk_full(run_dir):  # the lock: a second run or resume here is refused
        return ContinualRun(config, Path(run_dir), make_executor, reporter).resume()


def resume_config(run_dir: str | Path, experiment=None) -> ExperimentConfig:
    """The run's own experiment, or ``experiment`` if it only extends it."""
    from evolm.rundir import open_run_dir
    from evolm.runlock import refuse_if_in_use

    raw = open_run_dir(Path(run_dir))
    refuse_if_in_use(run_dir)  # first: a live run's files are its own, and may be mid-rewrite
    saved = parse_config(raw, base_dir=_experiment_dir(Path(run_dir)), source=str(Path(run_dir) / "experiment.json"))
    if experiment is None:
        return saved
    new = as_config(experiment).keep_search_of(saved)
    # the parsed config, not the raw file: fields added to evolm since the run began take their defaults
    refused = resume_differences(saved.model_dump(mode="json"), new.model_dump(mode="json"))
    if refused:
        raise EvolmError(f"{experiment} differs from the run's experiment in {', '.join(refused)}; "
                         f"a resumed run may only add generations or append stages (start a new run instead)")
    return new  # ContinualRun.resume records it once the extended data has been read


def load_run(run_dir: str | Path):
    """Everything a run directory holds, as typed records (``evolm.rundir.RunRecords``)."""
    from evolm.rundir import load_run as _load

    return _load(run_dir)


def _experiment_dir(run_dir: Path) -> Path:
    """The folder of the experiment file the run began from (run.json): its own objective modules are
    found there again, whatever the current folder; else the current folder."""
    import json

    try:
        folder = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("experiment_dir")
    except (OSError, ValueError, AttributeError):
        folder = None
    return Path(folder) if isinstance(folder, str) and Path(folder).is_dir() else Path(".")


def _executor_factory(config: ExperimentConfig, name: str, ray_address: str | None):
    """The executor's maker, checked now: a request no machine here can meet stops before anything is written."""
    from evolm.executor import require_local_gpus  # (importing it registers the built-in executors)

    if name not in EXECUTORS:
        raise EvolmError(f"unknown executor '{name}'; use one of {', '.join(EXECUTORS.names())}")
    if name == "local" or not (ray_address or config.ray.address):
        require_local_gpus(config.ray)
    return lambda: EXECUTORS.get(name)(config.ray, ray_address)


def _with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    import copy

    from evolm.configfile import _set_dotted

    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        _set_dotted(raw, dotted, value)
    return raw
