"""evolm's command line: ``evolm run EXPERIMENT`` and friends.

User mistakes (``EvolmError``) end with one ``error: ...`` line and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from evolm.errors import EvolmError, RunDirError
from evolm.genome import genome_text
from evolm.records import EvaluationRecord, GenerationRecord, StageSummary, utilisation
from evolm.registry import REPORTERS
from evolm.reporting import Reporter

EXIT_USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.func(args)
    except EvolmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolm", description="Continual evolutionary LoRA search: for each stage of data, evolve "
        "LoRA genomes (DEAP), evaluate them with real fine-tunes (Ray), merge the winner into the model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run an experiment YAML; results land in <output_dir>/<run name>/",
                         description="Run an experiment: every stage's search, merge and evaluation. "
                         "Writes config.yaml, evaluations.jsonl, generations.jsonl, loss_matrix.json, "
                         "summary.json and models/stage-<k>/ (Hugging Face checkpoints) into the run directory.")
    run.add_argument("experiment", type=Path, help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--name", help="run directory name (default: <experiment name>-<yyyymmdd-hhmmss>)")
    _execution_flags(run)
    run.add_argument("--seed", type=int, help="run seed (overrides seed)")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a killed or finished run from its newest checkpoint",
                            description="Continue a run exactly where it stopped: finished evaluations are not "
                            "run again. With --experiment, the run may be extended (more generations, stages "
                            "appended at the end); any other change is refused with the list of fields.")
    resume.add_argument("run_dir", type=Path, help="the run directory, e.g. results/quickstart-20261129-150000")
    resume.add_argument("--experiment", type=Path, help="an extended version of the run's experiment YAML")
    _execution_flags(resume)
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="stage, generation, evaluations, best so far, time spent and left",
                            description="Print where a run stands (also while it is running).")
    status.add_argument("run_dir", type=Path)
    status.set_defaults(func=cmd_status)
    _see_the_search(sub)
    return parser


def _see_the_search(sub) -> None:
    """evolm plot | report | generate: read a run directory (finished, running or crashed)."""
    plot = sub.add_parser("plot", help="draw the run's figures into RUN_DIR/plots/",
                          description="Fitness, genes, loss matrix, lineage of each winner, gene importance "
                          "(PNG), from the run's files only; works while the run is going.")
    plot.add_argument("run_dir", type=Path, help="the run directory, e.g. results/quickstart-20261129-150000")
    plot.set_defaults(func=cmd_plot)
    report = sub.add_parser("report", help="write RUN_DIR/report.html, one self-contained page",
                            description="One HTML file with the experiment, stages, winners, every figure, "
                            "the loss matrix, the best genomes, failures, generation samples and time spent.")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=cmd_report)
    gen = sub.add_parser("generate", help="sample text from the model after a stage",
                         description="Load models/stage-K of a run and continue a prompt.")
    gen.add_argument("run_dir", type=Path)
    gen.add_argument("--stage", type=int, help="which stage's model (0: the base; default: the last one saved)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--top-k", type=int, default=20, help="sample from the k likeliest tokens; 0: greedy (default 20)")
    gen.set_defaults(func=cmd_generate)
    predict = sub.add_parser("predict", help="classify texts with the model after a stage (classification runs)",
                             description="Load models/stage-K of a classification run and print the class of "
                             "each text with its probability, one line per text.")
    predict.add_argument("run_dir", type=Path)
    predict.add_argument("texts", nargs="*", help="texts to classify")
    predict.add_argument("--file", type=Path, help="also classify every non-empty line of this UTF-8 file")
    predict.add_argument("--stage", type=int, help="which stage's model (0: the base; default: the last one saved)")
    predict.set_defaults(func=cmd_predict)
    replay = sub.add_parser("replay", help="train a stage winner's schedule again and compare the adapter",
                            description="Retrain the chain of evaluations that made stage K's winner "
                            "(adapters/stage-K/schedule.json: each ancestor's genes, seed and steps, oldest first) "
                            "from models/stage-(K-1), and say how far the result is from the adapter the run kept.")
    replay.add_argument("run_dir", type=Path)
    replay.add_argument("--stage", type=int, required=True, help="which stage's winner")
    replay.add_argument("--out", type=Path, help="also write the replayed adapter here (.safetensors)")
    replay.set_defaults(func=cmd_replay)


def cmd_plot(args) -> int:
    from evolm.plots import plot_run

    for plot in plot_run(args.run_dir).values():
        print(plot.path)
    return 0


def cmd_report(args) -> int:
    from evolm.report import write_report

    print(write_report(args.run_dir))
    return 0


def _stage_model_dir(run_dir: Path, stage: int | None, classifier: bool) -> Path:
    """models/stage-K of a run (default: the last saved), refusing a model of the other kind."""
    from evolm.models import is_classifier
    from evolm.rundir import load_run

    run = load_run(run_dir)
    stages = run.model_stages()
    if not stages:
        raise RunDirError(f"{run.path}: no saved model yet (models/stage-<k>/ appears once the base is built)")
    stage = stages[-1] if stage is None else stage
    if stage not in stages:
        raise RunDirError(f"{run.path}: no model for stage {stage}; stages available: "
                          f"{', '.join(map(str, stages))}")
    where = run.path / "models" / f"stage-{stage}"
    try:
        saved = json.loads((where / "config.json").read_text())
    except (OSError, ValueError):
        raise RunDirError(f"{where}/config.json is missing or not JSON; the saved model is damaged") from None
    if is_classifier(saved) != classifier:
        raise EvolmError(f"{run.path} is a {'classification' if is_classifier(saved) else 'text'} run: use "
                         f"`evolm {'predict' if is_classifier(saved) else 'generate'}` with it")
    return where


def cmd_predict(args) -> int:
    where = _stage_model_dir(args.run_dir, args.stage, classifier=True)
    texts = list(args.texts)
    if args.file is not None:
        try:
            texts += [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise EvolmError(f"--file {args.file}: cannot read it as UTF-8 text ({type(exc).__name__}); "
                             f"give a text file, one example per line") from None
    if not texts:
        raise EvolmError("nothing to classify: give texts as arguments or --file with one text per line")
    _quiet_libraries()
    from evolm.models import load_model
    from evolm.predict import predict_texts

    model, tokenizer = load_model(str(where))
    for p in predict_texts(model, tokenizer, texts):
        print(f"{p['label']}\t{p['probability']:.3f}\t{p['text']}")
    return 0


def cmd_generate(args) -> int:
    where = _stage_model_dir(args.run_dir, args.stage, classifier=False)
    if args.max_new_tokens < 1:
        raise EvolmError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    _quiet_libraries()
    from evolm.generate import generate_text
    from evolm.models import load_model

    model, tokenizer = load_model(str(where))
    print(args.prompt + generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                      seed=args.seed, top_k=args.top_k))
    return 0


def cmd_replay(args) -> int:
    _quiet_libraries()
    from evolm.schedule import replay

    adapter, diff = replay(args.run_dir, args.stage)
    if args.out:
        from safetensors.numpy import save_file

        save_file(adapter, str(args.out))
    if diff is None:
        print("replayed; the run kept no adapter of this winner to compare with")
        return 0
    print(f"replayed: largest difference from the kept adapter {diff:.3g}" + (" (identical)" if diff == 0 else ""))
    return 0 if diff == 0 else 1


def _reporter(config, run_dir: Path, args):
    """The console, wrapped by experiment tracking when the config turns it on."""
    from evolm.tracking import with_tracking

    from evolm.objectives import resolve_objective

    workers = 1 if args.no_ray else config.ray.num_workers
    first = config.search.objectives[0]
    console = REPORTERS.get("console")(workers=workers, objective=first,
                                       maximize=resolve_objective(first).direction == "maximize")
    return with_tracking(console, config, run_dir)


def _execution_flags(parser) -> None:
    parser.add_argument("--ray-address", help="join this Ray cluster (auto or host:port) instead of starting one")
    parser.add_argument("--workers", type=int, help="evaluations at once (overrides ray.num_workers)")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process, one at a time (debugging)")


def _execution_overrides(args) -> dict:
    if args.workers is not None and args.workers < 1:
        raise EvolmError(f"--workers must be at least 1 (got {args.workers})")
    return {} if args.workers is None else {"ray.num_workers": args.workers}


def cmd_run(args) -> int:
    import evolm

    overrides = _execution_overrides(args)
    if args.seed is not None:
        overrides["seed"] = args.seed
    from evolm.diskfull import stop_when_disk_full
    from evolm.runlock import run_lock

    config = evolm.api.as_config(args.experiment, overrides)
    run_dir = evolm.api.new_run_dir(config, args.name)
    with stop_when_disk_full(run_dir), run_lock(run_dir):  # before the reporter: tracking writes into the run dir
        print(f"run {run_dir.name}: {len(config.stages)} stages, population {config.search.population_size}, "
              f"{config.search.generations} generations, results in {run_dir}", flush=True)
        _quiet_libraries()
        summaries = evolm.run(config, run_dir, executor="local" if args.no_ray else "ray",
                              reporter=_reporter(config, run_dir, args), ray_address=args.ray_address)
    print(stage_table(summaries))
    print(f"models: {run_dir / 'models'}")
    return 0


def cmd_resume(args) -> int:
    import evolm
    from evolm.diskfull import stop_when_disk_full
    from evolm.runlock import run_lock

    config = evolm.api.resume_config(args.run_dir, args.experiment)
    with stop_when_disk_full(args.run_dir), run_lock(args.run_dir):  # before the reporter: tracking writes there
        print(f"resuming {args.run_dir}", flush=True)
        _quiet_libraries()
        summaries = evolm.resume(args.run_dir, experiment=config, executor="local" if args.no_ray else "ray",
                                 reporter=_reporter(config, args.run_dir, args), ray_address=args.ray_address,
                                 workers=_execution_overrides(args).get("ray.num_workers"))
    print(stage_table(summaries))
    return 0


def cmd_status(args) -> int:
    from evolm.status import format_status, run_status

    print(format_status(run_status(args.run_dir)))
    return 0


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stage_table(summaries: list) -> str:
    rows = [("stage", "test loss start -> end", "winner", "genome")]
    for s in summaries:
        rows.append((f"{s.stage} {s.name}", f"{s.start_loss:.4f} -> {s.end_loss:.4f}",
                     s.winner_id, genome_text(s.winner.get("values"))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


@REPORTERS.register("console")
class ConsoleReporter(Reporter):
    """Progress for people: a bar of evaluations in a terminal, plain lines in logs."""

    def __init__(self, stream=None, workers: int = 1, objective: str = "val_loss", maximize: bool = False):
        stream = stream or sys.stdout  # looked up now, not when the module was imported (it may be replaced)
        # A bar only when both streams are terminals: logs and pipes get plain lines, no control characters.
        self.stream, self.bar, self.tty = stream, None, stream.isatty() and sys.stderr.isatty()
        self.workers, self.busy = max(1, workers), 0.0
        self.objective, self.maximize = objective, maximize
        """The first objective, shown as measured (a maximised one is stored negated)."""

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
        fmt = lambda x: "  n/a " if x is None else f"{-x if self.maximize else x:.4f}"  # noqa: E731
        busy = utilisation(self.busy, r.seconds, self.workers)
        name = "" if self.objective == "val_loss" else f"{self.objective} "
        self._line(f"stage {r.stage} {r.stage_name} gen {r.generation}: {name}best {fmt(r.best)} "
                   f"median {fmt(r.median)} worst {fmt(r.worst)} | {r.evaluations} evals, "
                   f"{r.failed} failed, {r.seconds:.1f}s" + ("" if busy is None else f", workers busy {100 * busy:.0f}%")
                   + ("" if r.diversity is None else f", diversity {r.diversity:.2f}"))

    def stage_end(self, s: StageSummary) -> None:
        self._line(f"stage {s.stage} {s.name} merged {s.winner_id}: test loss "
                   f"{s.start_loss:.4f} -> {s.end_loss:.4f} ({s.evaluations} evals, {s.seconds:.0f}s)")




if __name__ == "__main__":
    sys.exit(main())
