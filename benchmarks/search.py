"""Search: evolm against random search, Optuna TPE, a plain DEAP GA, Ray Tune ASHA and PBT, at an equal
budget of training steps, on the same task, the same search space and the same evaluation function.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/search.py --experiment experiments/quickstart.yaml \\
        --stage code --seeds 0 1 2 --methods evolm,evolm-inherit,evolm-halving-inherit,evolm-async,random,tpe,deap,asha,pbt

The task: LoRA fine-tuning of one base model on one stage (``--stage``, default the experiment's first);
a genome's score is ``evolm.train.evaluate_genome``'s ``val_loss`` on the stage's validation split, and
the search space is evolm's own (``evolm.searchspace.resolve_space``). The base is the experiment's model,
built and pretrained once (``model.pretrain``, ``--pretrain-steps``) and saved to <out>/base; every
method starts from that directory (or from ``--base DIR``).

Per seed, plain ``evolm`` runs first, through its real path (``ContinualRun`` on a one-stage config,
a run directory under <out>); the steps it trained (from its ``evaluations.jsonl``) are the budget S of
every baseline for that seed (``--budget`` sets S instead). A baseline starts no new trial once the
steps spent plus those of its running trials reach S; the steps each method really trained are
recorded. Every method runs ``--workers`` evaluations at once (Ray), one torch thread each.

A method's best validation loss is the lowest val_loss among its evaluations that started within S
steps (for ASHA, any report of any trial: a partly trained adapter is one you hold). The evolm
variants with successive halving and / or weight inheritance get S as their ``search.step_budget``
(up to ``--variant-generations`` generations); the script also reports the share of S each needs to
reach plain evolm's best.

Writes <out>/seed-<s>/<method>/ (an evolm run directory, or the Ray Tune experiment of asha) and
<out>/search.json (every number per seed), and prints a table: median best val loss, min-max over
seeds, median steps, evaluations, failures, seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from evolm import data as stage_data  # noqa: E402
from evolm.configfile import parse_config  # noqa: E402
from evolm.searchspace import resolve_space, training_defaults  # noqa: E402
from evolm.base import prepare_base as prepare_evolm_base  # noqa: E402
from evolm.continual import ContinualRun, Reporter  # noqa: E402
from evolm.errors import EvolmError  # noqa: E402
from evolm.executor import EvalRequest, RayExecutor, StagePayload  # noqa: E402
from evolm.genome import evaluation_seed, genome_text, hyperparameters  # noqa: E402
from evolm.jsonfiles import read_jsonl  # noqa: E402
from evolm.models import ModelPayload, family_and_layers, load_model, save_model  # noqa: E402
from evolm.space import Boolean, Categorical, Integer, LayerMask, LogUniform, Uniform  # noqa: E402
from evolm.train import evaluate_genome, pick_device  # noqa: E402

METHODS = ("evolm", "evolm-halving", "evolm-inherit", "evolm-halving-inherit", "evolm-async", "evolm-async-halving",
           "random", "tpe", "deap", "asha", "pbt")
EVOLM_VARIANTS = {  # every setting explicit, so a change of evolm's defaults does not rename a variant
    "evolm": {"inherit_weights": False},  # the plain GA: (mu + lambda), fresh adapters, full budgets
    "evolm-halving": {"halving": {"rungs": 3, "reduction_factor": 3}, "inherit_weights": False},
    "evolm-inherit": {"inherit_weights": True},
    "evolm-halving-inherit": {"halving": {"rungs": 3, "reduction_factor": 3}, "inherit_weights": True},
    "evolm-async": {"mode": "steady_state", "inherit_weights": True},  # asynchronous steady state
    "evolm-async-halving": {"mode": "steady_state", "halving": {"rungs": 3, "reduction_factor": 3},
                            "inherit_weights": True},  # and asynchronous promotion (ASHA's rule)
}
PBT_MUTABLE = ("learning_rate", "weight_decay", "warmup_ratio", "lora_dropout")
"""Genes PBT may perturb in a running trial (the others shape the adapter or its schedule)."""
INF = float("inf")


# ----- the task -----------------------------------------------------------------------------------
class Task:
    """What every method shares: the base model, the stage's token blocks, the space, the defaults."""

    def __init__(self, config, base_dir: Path, workers: int):
        self.config, self.base_dir, self.workers = config, base_dir, workers
        self.base, tokenizer = load_model(str(base_dir))
        self.base.eval()
        stage = config.stages[0]
        splits = stage_data.tokenize_splits(stage_data.load_splits(stage), tokenizer, config.block_size, stage.name)
        self.blocks = {"train": splits["train"], "validation": splits["validation"]}
        family, n_layers = family_and_layers(self.base)
        self.space = resolve_space(config, family, n_layers)
        self.training = training_defaults(config, family)  # as evolm's stage loop fills them in

    def hp(self, values: dict) -> dict:
        return hyperparameters(values, self.training)

    def stage_payload(self, key: str) -> StagePayload:
        return StagePayload(key, ModelPayload.of(self.base), self.blocks, self.training)


class BudgetSpent(Exception):
    """Raised inside a baseline's loop when its step budget is spent."""


class Trials:
    """One baseline's evaluations in completion order, and its step budget.

    A trial may start while the steps spent plus those planned for running trials are below the
    budget, so the last trial may overshoot it by less than one trial; the steps really trained count.
    """

    def __init__(self, budget: int):
        self.budget, self.committed, self.rows = budget, 0, []

    def admit(self, hp: dict) -> bool:
        if self.committed >= self.budget:
            return False
        self.committed += int(hp.max_steps)
        return True

    def record(self, hp: dict, result: dict, values: dict) -> None:
        ok = result["status"] == "ok"
        steps = int((result.get("curve") or {}).get("steps", 0))
        self.committed += steps - int(hp.max_steps)
        self.rows.append({"values": values, "val_loss": result["objectives"]["val_loss"] if ok else INF,
                          "steps": steps, "status": result["status"], "error": result.get("error")})


def run_requests(executor: RayExecutor, task: Task, trials: Trials, batch: list[tuple[str, dict, int]]) -> list[dict]:
    """Evaluate (tag, values, seed) items on the Ray workers; returns their rows in the order given."""
    by_tag = {tag: values for tag, values, _ in batch}
    rows = {}

    def on_result(result: dict) -> None:
        values = by_tag[result["genome_id"]]
        trials.record(task.hp(values), result, values)
        rows[result["genome_id"]] = trials.rows[-1]

    executor.map([EvalRequest(tag, task.hp(values), seed) for tag, values, seed in batch], on_result)
    return [rows[tag] for tag, _, _ in batch]


def with_ray_executor(task: Task, key: str, body):
    executor = RayExecutor(task.config.ray, workers=task.workers)
    try:
        executor.set_stage(task.stage_payload(key))
        return body(executor)
    finally:
        executor.close()


# ----- evolm ----------------------------------------------------------------------------------------
class QuietReporter(Reporter):
    def __init__(self, label: str):
        self.label = label

    def message(self, text: str) -> None:
        pass

    def generation_end(self, record) -> None:
        print(f"  {self.label} gen {record.generation}: best {record.best} | {record.evaluations} evals, "
              f"{record.failed} failed, {record.seconds:.0f}s", flush=True)

    def stage_end(self, summary) -> None:
        pass


def evolm_config(base_raw: dict, method: str, seed: int, args, base_dir: Path, budget: int | None):
    raw = json.loads(json.dumps(base_raw))
    raw.update(seed=seed, prompts=[], name=f"bench-search-{method}")
    raw["model"] = {"name_or_path": str(base_dir.resolve()), "build": None, "pretrain": None}
    raw["search"].update(EVOLM_VARIANTS[method])
    if method != "evolm" and budget is not None:
        # the other variants spend the same budget S: as many generations as it pays for
        raw["search"].update(generations=args.variant_generations, step_budget=budget)
    return parse_config(raw)


def run_evolm(task: Task, method: str, seed: int, args, base_raw: dict, out: Path, budget: int | None) -> dict:
    config = evolm_config(base_raw, method, seed, args, task.base_dir, budget)
    shutil.rmtree(out, ignore_errors=True)  # a leftover ledger would be taken as finished evaluations
    ContinualRun(config, out, lambda: RayExecutor(config.ray, workers=task.workers),
                 QuietReporter(f"{method} seed {seed}")).run()
    return {"rows": evolm_rows(out)}


def evolm_rows(out: Path) -> list[dict]:
    """One row per trained evaluation of an evolm run directory, in the order they were written. In a
    steady-state run a row taken after generation 0 also carries ``at_steps``: the steps the run had
    trained when it was taken (see ``steady_state_steps``)."""
    rows, records = [], read_jsonl(out / "evaluations.jsonl")
    at_steps = steady_state_steps(out, records)
    for i, r in enumerate(records):
        if r["cached"]:  # a twin was trained earlier in the run: no steps, same loss
            continue
        ok = r["status"] == "ok"
        rows.append({"values": r["values"], "val_loss": r["objectives"]["val_loss"] if ok else INF,
                     "steps": record_steps(r), "status": r["status"], "error": r.get("error"),
                     "genome_id": r["genome_id"], "generation": r["generation"]} | (
                        {"at_steps": at_steps[i]} if i in at_steps else {}))
    return rows


def record_steps(r: dict) -> int:
    return int(r["steps"] if r.get("steps") is not None else (r.get("curve") or {}).get("steps", 0))


def steady_state_steps(out: Path, records: list[dict]) -> dict[int, int]:
    """{index in evaluations.jsonl: steps trained when that record was taken}, for the takes after
    generation 0 of a steady-state run. Its records are written in the order results were taken, and
    each rung result (rungs.jsonl) says how many takes came before it, so the steps spent up to a take
    are known exactly: generation 0's, then each rung result's and each take's new steps in arrival
    order (a child's steps are cumulative over its rungs)."""
    config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else {}
    if ((config or {}).get("search") or {}).get("mode") != "steady_state":
        return {}
    rungs, seen = [], set()
    for r in read_jsonl(out / "rungs.jsonl"):
        key = (r["generation"], r["genome_id"], r["rung"])
        if isinstance(r.get("takes_before"), int) and key not in seen:  # a steady-state rung, first record
            seen.add(key)
            rungs.append(r)
    spent = sum(record_steps(r) for r in records if r["generation"] == 0 and not r["cached"])
    counted: dict[str, int] = {}  # steps of each child already charged (its earlier rungs)

    def charge(r: dict) -> None:  # a cached twin's record says 0 steps
        nonlocal spent
        steps = record_steps(r)
        spent += max(0, steps - counted.get(r["genome_id"], 0))
        counted[r["genome_id"]] = max(steps, counted.get(r["genome_id"], 0))

    at, taken = {}, 0
    for i, r in enumerate(records):
        if r["generation"] == 0:
            continue
        while rungs and rungs[0]["takes_before"] <= taken:
            charge(rungs.pop(0))
        charge(r)
        taken += 1
        at[i] = spent
    return at


# ----- random search --------------------------------------------------------------------------------
def run_random(task: Task, seed: int, budget: int, args) -> dict:
    """Independent genomes from evolm's own samplers; since a genome's steps are known before it
    trains, the genomes that fit the budget are drawn first and handed to the workers in one go."""
    rng = random.Random(evaluation_seed(seed, 0, "random-search"))
    trials, batch = Trials(budget), []
    while True:
        values = {name: gene.sample(rng) for name, gene in task.space.items()}
        if not trials.admit(task.hp(values)):
            break
        batch.append((f"random-{len(batch)}", values, evaluation_seed(seed, 1, f"random-{len(batch)}")))
    with_ray_executor(task, f"random-{seed}", lambda ex: run_requests(ex, task, trials, batch))
    return {"rows": trials.rows}


# ----- Optuna TPE -----------------------------------------------------------------------------------
def optuna_distributions(space: dict) -> dict:
    """One Optuna distribution per gene; a layer mask becomes one bool per block; categorical choices
    that are not plain values (lists of module names) are searched by their index."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for name, gene in space.items():
        if isinstance(gene, Categorical):
            plain = all(isinstance(c, (bool, int, float, str)) for c in gene.choices)
            dists[name] = CategoricalDistribution(gene.choices if plain else list(range(len(gene.choices))))
        elif isinstance(gene, Integer):
            dists[name] = IntDistribution(gene.low, gene.high, log=gene.log)
        elif isinstance(gene, (Uniform, LogUniform)):
            dists[name] = FloatDistribution(gene.low, gene.high, log=isinstance(gene, LogUniform))
        elif isinstance(gene, Boolean):
            dists[name] = CategoricalDistribution([False, True])
        elif isinstance(gene, LayerMask):
            for i in range(gene.n_layers):
                dists[f"{name}[{i}]"] = CategoricalDistribution([False, True])
        else:
            raise TypeError(f"gene {name}: no Optuna distribution for {type(gene).__name__}")
    return dists


def from_optuna(space: dict, params: dict) -> dict:
    values = {}
    for name, gene in space.items():
        if isinstance(gene, LayerMask):
            mask = [bool(params[f"{name}[{i}]"]) for i in range(gene.n_layers)]
            values[name] = mask if any(mask) else mask[:-1] + [True]  # no block at all: adapt the last one
        elif isinstance(gene, Categorical) and not all(isinstance(c, (bool, int, float, str)) for c in gene.choices):
            values[name] = gene.choices[params[name]]
        else:
            values[name] = params[name]
    return values


def run_tpe(task: Task, seed: int, budget: int, args) -> dict:
    """Optuna's TPE, asked and told in batches of ``workers`` (constant liar: the second genome of a
    batch is not drawn as if the first were not running)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.tpe_startup_trials, constant_liar=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    dists, trials = optuna_distributions(task.space), Trials(budget)

    def loop(executor):
        while True:
            batch = []
            for _ in range(task.workers):
                trial = study.ask(dists)
                values = from_optuna(task.space, trial.params)
                if not trials.admit(task.hp(values)):
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # asked, never trained
                    break
                batch.append((trial, values))
            if not batch:
                return
            tagged = [(f"tpe-{t.number}", v, evaluation_seed(seed, 1, f"tpe-{t.number}")) for t, v in batch]
            for (trial, _), row in zip(batch, run_requests(executor, task, trials, tagged)):
                if math.isfinite(row["val_loss"]):
                    study.tell(trial, row["val_loss"])
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)

    with_ray_executor(task, f"tpe-{seed}", loop)
    return {"rows": trials.rows}


# ----- plain DEAP -----------------------------------------------------------------------------------
def unit_length(space: dict) -> int:
    return sum(gene.n_layers if isinstance(gene, LayerMask) else 1 for gene in space.values())


def from_unit(space: dict, u: list[float]) -> dict:
    """A genome from floats in [0, 1], one per gene (one per block for a layer mask)."""
    values, i = {}, 0
    for name, gene in space.items():
        if isinstance(gene, LayerMask):
            part = u[i:i + gene.n_layers]
            i += gene.n_layers
            mask = [x >= 0.5 for x in part]
            if not any(mask):  # no block at all: adapt the one closest to being on
                mask[int(np.argmax(part))] = True
            values[name] = mask
            continue
        x = min(max(float(u[i]), 0.0), 1.0)
        i += 1
        if isinstance(gene, Categorical):
            values[name] = gene.choices[min(int(x * len(gene.choices)), len(gene.choices) - 1)]
        elif isinstance(gene, Integer) and gene.log:
            v = round(math.exp(math.log(gene.low) + x * (math.log(gene.high) - math.log(gene.low))))
            values[name] = min(max(int(v), gene.low), gene.high)
        elif isinstance(gene, Integer):
            values[name] = gene.low + min(int(x * (gene.high - gene.low + 1)), gene.high - gene.low)
        elif isinstance(gene, Uniform):
            values[name] = gene.low + x * (gene.high - gene.low)
        elif isinstance(gene, LogUniform):
            values[name] = math.exp(math.log(gene.low) + x * (math.log(gene.high) - math.log(gene.low)))
        elif isinstance(gene, Boolean):
            values[name] = x >= 0.5
        else:
            raise TypeError(f"gene {name}: cannot decode {type(gene).__name__}")
    return values


def run_deap(task: Task, seed: int, budget: int, args) -> dict:
    """What a DEAP user writes by hand: individuals of floats in [0, 1], ``eaSimple`` with two-point
    crossover, bounded polynomial mutation and tournaments of 3; ``toolbox.map`` evaluates a
    generation on the Ray workers and raises ``BudgetSpent`` once the budget is used up."""
    from deap import algorithms, base, creator, tools

    if not hasattr(creator, "BenchFitnessMin"):
        creator.create("BenchFitnessMin", base.Fitness, weights=(-1.0,))
        creator.create("BenchIndividual", list, fitness=creator.BenchFitnessMin)
    n = unit_length(task.space)
    trials, counter = Trials(budget), iter(range(10**9))

    def parallel_map(evaluate, individuals):
        batch = []
        for ind in individuals:
            values = from_unit(task.space, ind)
            if not trials.admit(task.hp(values)):
                break
            i = next(counter)
            batch.append((f"deap-{i}", values, evaluation_seed(seed, 1, f"deap-{i}")))
        state = random.getstate()  # the GA's random stream must not depend on what Ray draws meanwhile
        rows = run_requests(executor, task, trials, batch) if batch else []
        random.setstate(state)
        if len(batch) < len(individuals):
            raise BudgetSpent
        return [(row["val_loss"],) for row in rows]

    toolbox = base.Toolbox()
    toolbox.register("attr", random.random)
    toolbox.register("individual", tools.initRepeat, creator.BenchIndividual, toolbox.attr, n=n)
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    toolbox.register("evaluate", lambda ind: None)  # the work happens in parallel_map
    toolbox.register("mate", tools.cxTwoPoint)
    toolbox.register("mutate", tools.mutPolynomialBounded, eta=args.deap_eta, low=0.0, up=1.0, indpb=1.0 / n)
    toolbox.register("select", tools.selTournament, tournsize=3)
    toolbox.register("map", parallel_map)

    def loop(ex):
        nonlocal executor
        executor = ex
        random.seed(seed)  # eaSimple and DEAP's operators draw from the global generator
        try:
            algorithms.eaSimple(toolbox.population(n=args.population), toolbox, cxpb=args.deap_cxpb,
                                mutpb=args.deap_mutpb, ngen=10**6, verbose=False)
        except BudgetSpent:
            pass

    executor = None
    with_ray_executor(task, f"deap-{seed}", loop)
    return {"rows": trials.rows}


# ----- Ray Tune ASHA --------------------------------------------------------------------------------
def tune_trainable(trial, task: Task, key: str, args, out: Path, **params):
    """``trial`` as a Ray Tune trainable with the stage, threads and resources of one evaluation; ``out``
    emptied for the Tune experiment."""
    from ray import tune

    cpus, gpus = task.config.ray.num_cpus_per_trial, task.config.ray.num_gpus_per_trial
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return tune.with_resources(
        tune.with_parameters(trial, stage=task.stage_payload(key), threads=max(1, int(cpus)), chunk=args.asha_chunk,
                             use_gpu=gpus > 0, **params),
        {"cpu": cpus, "gpu": gpus})


def step_budget_stopper(budget: int):
    """A Tune stopper that records every report (its steps, loss, the perturbable genes PBT may have
    changed) and ends the experiment once the reported steps reach ``budget``."""
    from ray import tune

    class StepBudget(tune.Stopper):
        def __init__(self):
            self.spent, self.reports = 0, []

        def __call__(self, trial_id, result):
            config = result["config"]
            self.spent += int(result["chunk_steps"])
            self.reports.append({"trial": trial_id, "index": config["index"], "val_loss": result["val_loss"],
                                 "steps": int(result["chunk_steps"]), "trial_steps": int(result["steps"]),
                                 "failed": bool(result["failed"]),
                                 "values": {k: config[k] for k in PBT_MUTABLE if k in config}})
            return False

        def stop_all(self):
            return self.spent >= budget

    return StepBudget()


def asha_trial(config: dict, stage: StagePayload, genomes: list, seeds: list, threads: int, chunk: int,
               use_gpu: bool) -> None:
    """One Ray Tune trial: train genome ``config["index"]`` chunk by chunk with evolm's pausable
    training (``evaluate_genome`` with ``stop_at`` / ``resume``: trained to the end it gives the same
    adapter as one call), reporting the validation loss after each chunk."""
    from ray import tune

    torch.set_num_threads(threads)
    i, device = config["index"], pick_device(use_gpu)
    hp = hyperparameters(genomes[i], stage.training)
    base, blocks = stage.model.build(), {s: stage.blocks[s] for s in ("train", "validation")}
    state, done = None, 0
    while True:
        result = evaluate_genome(base, blocks, hp, seeds[i], stage.training, device, resume=state, stop_at=done + chunk)
        val = result["objectives"]["val_loss"]
        ok = math.isfinite(val)
        tune.report({"val_loss": val if ok else INF, "steps": result["steps"], "chunk_steps": result["steps"] - done,
                     "failed": not ok})
        done, state = result["steps"], result["state"]
        if not ok or state is None:  # failed, or trained to its max_steps
            return


def run_asha(task: Task, seed: int, budget: int, args, out: Path) -> dict:
    """Ray Tune: random genomes (evolm's samplers, as ``random``) as trials, ASHA stopping the weak ones
    at rungs of steps, ``workers`` trials at once, and a stopper that ends the experiment once the
    reported steps reach the budget."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    rng = random.Random(evaluation_seed(seed, 0, "asha-search"))
    step_gene = task.space.get("max_steps")
    max_t = step_gene.high if isinstance(step_gene, Integer) else int(task.training["max_steps"])
    shortest = step_gene.low if isinstance(step_gene, Integer) else max_t
    fewest = max(1, min(args.asha_grace, args.asha_chunk, shortest))  # steps of a trial stopped at once
    n_trials = math.ceil(budget / fewest) + 2 * task.workers  # the budget runs out before the trials do
    genomes = [{name: gene.sample(rng) for name, gene in task.space.items()} for _ in range(n_trials)]
    seeds = [evaluation_seed(seed, 1, f"asha-{i}") for i in range(n_trials)]
    stopper = step_budget_stopper(budget)
    trainable = tune_trainable(asha_trial, task, f"asha-{seed}", args, out, genomes=genomes, seeds=seeds)
    scheduler = ASHAScheduler(time_attr="steps", max_t=max_t, grace_period=min(args.asha_grace, max_t),
                              reduction_factor=args.asha_reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(n_trials)))},  # in order: a seeded random search
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                    max_concurrent_trials=task.workers, reuse_actors=True,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name="tune", storage_path=str(out.resolve()), stop=stopper, verbose=0))
    grid = tuner.fit()
    errors = [str(e).splitlines()[0] for e in grid.errors]
    rows = [{"values": genomes[r["index"]], "val_loss": r["val_loss"], "steps": r["steps"],
             "status": "failed" if r["failed"] else "ok", "trial": r["trial"], "trial_steps": r["trial_steps"]}
            for r in stopper.reports]
    rows += [{"val_loss": INF, "steps": 0, "status": "failed", "error": e} for e in errors]
    return {"rows": rows, "trials": len({r["trial"] for r in stopper.reports}) + len(errors)}


# ----- Ray Tune PBT ---------------------------------------------------------------------------------
def pbt_trial(config: dict, stage: StagePayload, genomes: list, seed: int, threads: int, chunk: int,
              use_gpu: bool) -> None:
    """One PBT trial: genome ``config["index"]`` with the perturbable genes taken from ``config``,
    trained chunk by chunk with evolm's pausable training, a checkpoint (the paused state: adapter,
    AdamW moments, random streams, step) with every report. A trial PBT restarts from another's
    checkpoint goes on from that state with its own (perturbed) learning rate and the rest."""
    import tempfile

    from ray import tune
    from safetensors.numpy import load_file, save_file

    torch.set_num_threads(threads)
    values = dict(genomes[config["index"]]) | {k: config[k] for k in PBT_MUTABLE if k in config}
    hp, device = hyperparameters(values, stage.training), pick_device(use_gpu)
    base, blocks = stage.model.build(), {s: stage.blocks[s] for s in ("train", "validation")}
    state, done = None, 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_file(str(Path(folder) / "state.safetensors"))
        done = int(state["step"][0])
    trial_seed = evaluation_seed(seed, 1, f"pbt-{config['index']}")
    while True:
        result = evaluate_genome(base, blocks, hp, trial_seed, stage.training, device, resume=state,
                                 stop_at=done + chunk)
        val = result["objectives"].get("val_loss", INF)
        ok = result.get("steps") is not None and math.isfinite(val)
        metrics = {"val_loss": val if ok else INF, "steps": result.get("steps") or done,
                   "chunk_steps": (result.get("steps") or done) - done, "failed": not ok}
        state = result.get("state")
        if not ok or state is None:  # failed, or trained to its max_steps
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_file(state, str(Path(folder) / "state.safetensors"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        done = result["steps"]


def run_pbt(task: Task, seed: int, budget: int, args, out: Path) -> dict:
    """Ray Tune's Population Based Training, the closest peer: ``--population`` trials of evolm's random
    genomes, ``workers`` at a time (PBT pauses trials so that all progress alike), each trained for
    budget / population steps (its schedule's length), the bottom quarter restarting every
    ``--pbt-interval`` steps from a top trial's checkpoint with the perturbable genes resampled or
    scaled (PBT's explore), until the reported steps reach the budget."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    rng = random.Random(evaluation_seed(seed, 0, "pbt-search"))
    trial_steps = math.ceil(budget / args.population)
    genomes = [{name: gene.sample(rng) for name, gene in task.space.items()} | {"max_steps": trial_steps}
               for _ in range(args.population)]
    mutable = [k for k in PBT_MUTABLE if k in task.space]
    sampler = random.Random(evaluation_seed(seed, 0, "pbt-explore"))
    mutations = {k: (lambda gene=task.space[k]: gene.sample(sampler)) for k in mutable}
    param_space = {"index": tune.grid_search(list(range(args.population)))}
    param_space |= {k: tune.sample_from(lambda spec, k=k: genomes[spec.config["index"]][k]) for k in mutable}
    stopper = step_budget_stopper(budget)
    trainable = tune_trainable(pbt_trial, task, f"pbt-{seed}", args, out, genomes=genomes, seed=seed)
    scheduler = PopulationBasedTraining(time_attr="steps", perturbation_interval=args.pbt_interval,
                                        hyperparam_mutations=mutations, quantile_fraction=0.25,
                                        resample_probability=0.25, synch=False)
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler,
                                    max_concurrent_trials=task.workers, reuse_actors=False,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        # every checkpoint kept: PBT may restart a trial from any top trial's latest (a few hundred KB each)
        run_config=tune.RunConfig(name="tune", storage_path=str(out.resolve()), stop=stopper, verbose=0))
    grid = tuner.fit()
    errors = [str(e).splitlines()[0] for e in grid.errors]
    rows = [{"values": genomes[r["index"]] | r["values"], "val_loss": r["val_loss"], "steps": r["steps"],
             "status": "failed" if r["failed"] else "ok", "trial": r["trial"]} for r in stopper.reports]
    rows += [{"val_loss": INF, "steps": 0, "status": "failed", "error": e} for e in errors]
    return {"rows": rows, "trials": len({r["trial"] for r in stopper.reports}) + len(errors)}


# ----- scoring --------------------------------------------------------------------------------------
def score(rows: list[dict], budget: int | None) -> dict:
    """Best val loss among the rows that started within ``budget`` steps, and the best-so-far curve."""
    spent, best, curve, counted = 0, INF, [], 0
    for r in rows:
        if budget is not None and spent >= budget:
            break
        spent += r["steps"]
        best = min(best, r["val_loss"])
        counted += 1
        curve.append([spent, best])
    # evolm's generational search writes a generation's records as genomes stop, while successive
    # halving has already spent the earlier rungs of the genomes still running: charge each point the
    # steps of its whole generation. A steady-state take knows its own (at_steps).
    generation_end, spent_so_far = {}, 0
    for r in rows[:counted]:
        spent_so_far += r["steps"]
        if "generation" in r:
            generation_end[r["generation"]] = spent_so_far
    curve = [[r.get("at_steps", generation_end.get(r.get("generation"), point[0])), point[1]]
             for r, point in zip(rows, curve)]
    # an ASHA trial reports several times: it is one evaluation
    evaluations = len({r.get("trial", i) for i, r in enumerate(rows[:counted])})
    return {"best_val_loss": best if math.isfinite(best) else None, "steps": spent,
            "steps_total": sum(r["steps"] for r in rows), "evaluations": evaluations,
            "failures": sum(1 for r in rows if r["status"] != "ok"), "curve": curve}


def steps_to_reach(curve: list, target: float | None) -> int | None:
    if target is None:
        return None
    return next((steps for steps, best in curve if best <= target), None)


# ----- base model -----------------------------------------------------------------------------------
def prepare_base(config, args) -> Path:
    """The experiment's model, built and pretrained once, saved to <out>/base (reused when it was
    made from the same settings)."""
    if args.base is not None:
        return args.base
    if config.model.build is None and config.model.pretrain is None:
        return Path(config.model.name_or_path)
    where = args.out / "base"
    made_from = {"model": config.model.model_dump(mode="json"), "block_size": config.block_size,
                 "seed": config.seed, "pretrain_steps": args.pretrain_steps}
    stamp = where / "bench-base.json"
    if stamp.exists() and json.loads(stamp.read_text()) == made_from:
        print(f"base model: {where} (made earlier from the same settings)", flush=True)
        return where
    start = time.perf_counter()
    say = lambda text: print(f"base model: {text}", flush=True)  # noqa: E731
    base = prepare_evolm_base(config, say, pretrain_steps=args.pretrain_steps)
    model, tokenizer = base.model, base.tokenizer
    shutil.rmtree(where, ignore_errors=True)
    save_model(model.eval(), tokenizer, where)
    stamp.write_text(json.dumps(made_from, indent=2))
    print(f"base model: {where} ({time.perf_counter() - start:.0f}s)", flush=True)
    return where


def benchmark_config(args):
    """The experiment reduced to the benchmark's task: one stage, one objective, no replay, no prompts."""
    raw = yaml.safe_load(args.experiment.read_text(encoding="utf-8"))
    config = parse_config(raw, base_dir=args.experiment.parent, source=str(args.experiment))
    names = [s.name for s in config.stages]
    stage = args.stage or names[0]
    if stage not in names:
        raise EvolmError(f"--stage {stage}: not a stage of {args.experiment} (stages: {', '.join(names)})")
    raw = json.loads(json.dumps(config.model_dump(mode="json")))  # data paths now absolute
    raw["stages"] = [s for s in raw["stages"] if s["name"] == stage]
    search = raw["search"]
    search.update(objectives=["val_loss"], winner={"rule": "min_first", "epsilon": 0.05})
    # how the experiment searches is what the methods compare: each variant sets its own
    search.update(mode="generational", halving={"rungs": 1, "reduction_factor": 3}, step_budget=None,
                  time_budget=None, run_time_budget=None, scheduler=None)
    for key, value in (("population_size", args.population), ("offspring_size", args.offspring),
                       ("generations", args.generations)):
        if value is not None:
            search[key] = value
    search["space"]["replay_ratio"] = None  # one stage, nothing earlier to replay: the gene would do nothing
    raw["merge"] = {"method": "best", "top_k": 1}
    raw["tracking"] = {"tensorboard": False, "mlflow": False, "dir": None}
    raw["ray"]["num_workers"] = args.workers
    return parse_config(raw), raw


# ----- main -----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", type=Path, default=Path("experiments/quickstart.yaml"))
    p.add_argument("--stage", help="the stage to fine-tune on (default: the experiment's first)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--out", type=Path, default=Path("results/bench-search"))
    p.add_argument("--base", type=Path, help="a saved model directory to fine-tune instead of building one")
    p.add_argument("--pretrain-steps", type=int, help="pretraining steps of the base (default: the experiment's)")
    p.add_argument("--workers", type=int, default=2, help="evaluations at once, for every method")
    p.add_argument("--budget", type=int, help="steps per seed for the baselines (default: what evolm trained)")
    # Sized so 3 seeds x 7 methods take about half an hour on a 2-core CPU machine.
    p.add_argument("--population", type=int, default=6, help="evolm mu and DEAP population")
    p.add_argument("--offspring", type=int, default=6, help="evolm lambda")
    p.add_argument("--generations", type=int, default=2, help="evolm generations after the first evaluation")
    p.add_argument("--variant-generations", type=int,
                   help="generation cap of the evolm variants other than plain evolm, which stop once they have "
                        "spent the budget S (search.step_budget); default 6x --generations")
    p.add_argument("--tpe-startup-trials", type=int, default=10, help="TPE's random trials before modelling")
    p.add_argument("--deap-cxpb", type=float, default=0.5)
    p.add_argument("--deap-mutpb", type=float, default=0.2)
    p.add_argument("--deap-eta", type=float, default=20.0, help="crowding degree of mutPolynomialBounded")
    p.add_argument("--asha-chunk", type=int, default=10, help="steps between two reports of a trial (ASHA, PBT)")
    p.add_argument("--asha-grace", type=int, default=10, help="ASHA grace period, in steps")
    p.add_argument("--asha-reduction-factor", type=float, default=3)
    p.add_argument("--pbt-interval", type=int, default=20, help="PBT's perturbation interval, in steps")
    p.add_argument("--report-from", type=Path, nargs="+", metavar="SEARCH_JSON",
                   help="print the report of earlier runs' search.json files (methods and seeds merged, the "
                        "first file's winning; evolm curves re-derived from run directories beside them), run nothing")
    args = p.parse_args(argv)
    if args.report_from:
        return print_merged_report(args.report_from)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods: {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    methods.sort(key=lambda m: m != "evolm")  # evolm first: its steps are the others' budget
    if "evolm" not in methods and args.budget is None:
        p.error("without the evolm method there is no budget to match: give --budget STEPS")

    prepare = args.experiment.parent / "data" / "prepare.py"
    if prepare.is_file() and not (prepare.parent / "prepared" / "manifest.json").is_file():
        subprocess.run([sys.executable, str(prepare)], check=True)
    config, raw = benchmark_config(args)
    if args.pretrain_steps is None:
        args.pretrain_steps = config.model.pretrain.max_steps if config.model.pretrain else 0
    args.population = config.search.population_size
    if args.variant_generations is None:
        args.variant_generations = 6 * config.search.generations
    for m in methods:  # a variant evolm does not know yet fails now, not after an hour
        if m in EVOLM_VARIANTS:
            evolm_config(raw, m, 0, args, Path("."), 1)

    args.out.mkdir(parents=True, exist_ok=True)
    base_dir = prepare_base(config, args)
    task = Task(config, base_dir, args.workers)
    print(f"task: stage '{config.stages[0].name}', {len(task.blocks['train'])} train / "
          f"{len(task.blocks['validation'])} validation blocks, genes {', '.join(task.space)}", flush=True)
    # One local Ray for the whole benchmark (evolm's RayExecutor and Ray Tune both use it), so no
    # method pays Ray's start-up; each method still starts its own worker processes.
    import ray

    cfg = config.ray
    local = cfg.address is None
    ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             num_cpus=math.ceil(args.workers * cfg.num_cpus_per_trial) if local else None,
             num_gpus=(math.ceil(args.workers * cfg.num_gpus_per_trial) or None) if local else None)
    try:
        summary = run_all(task, methods, raw, args, base_dir)
    finally:
        ray.shutdown()
    print(format_report(summary["report"]))
    return 0


def run_all(task: Task, methods: list[str], raw: dict, args, base_dir: Path) -> dict:
    config = task.config
    results = {m: {} for m in methods}
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "stage": config.stages[0].name,
               "base": str(base_dir), "results": results}
    for seed in args.seeds:
        budget, reference = args.budget, None
        for method in methods:
            start = time.perf_counter()
            out = args.out / f"seed-{seed}" / method
            print(f"seed {seed} {method} ...", flush=True)
            if method in EVOLM_VARIANTS:
                run = run_evolm(task, method, seed, args, raw, out, budget)
            elif method == "asha":
                run = run_asha(task, seed, budget, args, out)
            elif method == "pbt":
                run = run_pbt(task, seed, budget, args, out)
            else:
                run = {"random": run_random, "tpe": run_tpe, "deap": run_deap}[method](task, seed, budget, args)
            seconds = time.perf_counter() - start
            if method == "evolm":
                plain = score(run["rows"], None)
                budget = budget if args.budget is not None else plain["steps"]
                reference = plain
            entry = score(run["rows"], budget) | {"seconds": seconds, "budget": budget}
            entry["steps_to_reach_evolm_best"] = steps_to_reach(
                score(run["rows"], None)["curve"], reference and reference["best_val_loss"])
            if "trials" in run:
                entry["trials"] = run["trials"]
            entry["errors"] = sorted({r["error"] for r in run["rows"] if r.get("error")})[:5]
            entry["best_genome"] = next((genome_text(r.get("values")) for r in run["rows"]
                                         if r["val_loss"] == entry["best_val_loss"] and r.get("values")), None)
            results[method][str(seed)] = entry
            best = entry["best_val_loss"]
            print(f"seed {seed} {method}: best val loss {best if best is None else round(best, 4)}, "
                  f"{entry['steps']} steps (budget {budget}), {entry['evaluations']} evaluations, "
                  f"{entry['failures']} failed, {seconds:.0f}s", flush=True)
            (args.out / "search.json").write_text(json.dumps(summary, indent=2))
    summary["report"] = report(results, args.seeds)
    (args.out / "search.json").write_text(json.dumps(summary, indent=2))
    return summary


def report(results: dict, seeds: list[int]) -> dict:
    out = {"methods": {}}
    for method, per_seed in results.items():
        runs = [per_seed[str(s)] for s in seeds if str(s) in per_seed]
        losses = [r["best_val_loss"] if r["best_val_loss"] is not None else INF for r in runs]
        out["methods"][method] = {
            "median_best_val_loss": statistics.median(losses), "min_best_val_loss": min(losses),
            "max_best_val_loss": max(losses), "median_steps": statistics.median(r["steps"] for r in runs),
            "median_evaluations": statistics.median(r["evaluations"] for r in runs),
            "failures": sum(r["failures"] for r in runs),
            "median_seconds": statistics.median(r["seconds"] for r in runs)}
    medians = {m: r["median_best_val_loss"] for m, r in out["methods"].items()}
    baselines = [medians[m] for m in medians if m not in EVOLM_VARIANTS]
    if baselines:  # target: evolm's median best below every baseline's
        out["lowest_median_vs_baselines"] = {m: medians[m] < min(baselines) for m in medians if m in EVOLM_VARIANTS}
    best_peer = {}
    for s in seeds:  # the baseline with the lowest best loss at this seed, and the steps it took to get there
        peers = [(r[str(s)]["best_val_loss"], m) for m, r in results.items()
                 if m not in EVOLM_VARIANTS and str(s) in r and r[str(s)]["best_val_loss"] is not None]
        if peers:
            loss, peer = min(peers)
            best_peer[str(s)] = {"method": peer, "loss": loss, "total_steps": results[peer][str(s)]["steps"],
                                 "steps": steps_to_reach(results[peer][str(s)]["curve"], loss)}
    if best_peer:
        out["best_peer"] = best_peer
        # share of the best peer's steps each evolm variant needs to reach the best peer's loss (None: never)
        out["fraction_of_best_peer_steps"] = {
            m: {s: (None if (reach := steps_to_reach(results[m][s]["curve"], p["loss"])) is None else reach / p["steps"])
                for s, p in best_peer.items() if s in results[m]} for m in results if m in EVOLM_VARIANTS}
        # the same, as a share of all the steps the peer trained (its budget)
        out["fraction_of_best_peer_total_steps"] = {
            m: {s: (None if (reach := steps_to_reach(results[m][s]["curve"], p["loss"])) is None
                    else reach / p["total_steps"])
                for s, p in best_peer.items() if s in results[m]} for m in results if m in EVOLM_VARIANTS}
    for variant in [m for m in EVOLM_VARIANTS if m != "evolm"]:
        if variant in results and "evolm" in results:
            # share of plain evolm's steps the variant needs to reach plain evolm's best (None: never)
            fractions = {}
            for s in seeds:
                r, plain = results[variant].get(str(s)), results["evolm"].get(str(s))
                if r and plain:
                    reach = r["steps_to_reach_evolm_best"]
                    fractions[str(s)] = None if reach is None else reach / plain["steps"]
            out[f"{variant}_fraction_of_evolm_steps"] = fractions
    return out


def print_merged_report(paths: list[Path]) -> int:
    """The report of several runs of this script on one task (a method added later, more seeds): their
    results merged, the first file's winning for a method and seed they share."""
    results, runs = {}, {}
    for path in paths:
        for method, per_seed in json.loads(path.read_text())["results"].items():
            for seed, result in per_seed.items():
                if seed not in results.setdefault(method, {}):
                    results[method][seed], runs[method, seed] = result, path.parent / f"seed-{seed}" / method
    rederived = 0
    for (method, seed), run in runs.items():
        if method in EVOLM_VARIANTS and (run / "evaluations.jsonl").exists():
            # the steps charged to each result as this script charges them now (steady state: exact)
            rows, result, plain = evolm_rows(run), results[method][seed], results.get("evolm", {}).get(seed)
            result["curve"] = score(rows, result.get("budget"))["curve"]
            if plain is not None:
                result["steps_to_reach_evolm_best"] = steps_to_reach(score(rows, None)["curve"],
                                                                     plain["best_val_loss"])
            rederived += 1
    print(f"{rederived} evolm runs' step curves re-derived from their run directories", flush=True)
    # Only the seeds every method ran are compared.
    seeds = sorted(set.intersection(*(set(int(s) for s in per_seed) for per_seed in results.values())))
    print(format_report(report(results, seeds)))
    return 0


def format_report(rep: dict) -> str:
    lines = ["| method | median best val loss | min-max over seeds | median steps | median evaluations | "
             "failed evaluations | median seconds |", "|---|---|---|---|---|---|---|"]
    for method, r in rep["methods"].items():
        lines.append(f"| {method} | {r['median_best_val_loss']:.4f} | {r['min_best_val_loss']:.4f}-"
                     f"{r['max_best_val_loss']:.4f} | {r['median_steps']:.0f} | {r['median_evaluations']:.0f} | "
                     f"{r['failures']} | {r['median_seconds']:.0f} |")
    lines.append("")
    for method, lowest in rep.get("lowest_median_vs_baselines", {}).items():
        lines.append(f"{method}: median best val loss below every baseline's: {'yes' if lowest else 'no'}")
    for s, p in rep.get("best_peer", {}).items():
        lines.append(f"seed {s}: best peer {p['method']} {p['loss']:.4f} after {p['steps']} of its "
                     f"{p.get('total_steps')} steps")
    for method, fractions in rep.get("fraction_of_best_peer_steps", {}).items():
        shown = ", ".join(f"seed {s} {'never' if f is None else f'{f:.0%}'}" for s, f in fractions.items())
        lines.append(f"{method}: steps to reach the best peer's loss, as a share of the steps the peer took to "
                     f"reach it: {shown}")
    for method, fractions in rep.get("fraction_of_best_peer_total_steps", {}).items():
        shown = ", ".join(f"seed {s} {'never' if f is None else f'{f:.0%}'}" for s, f in fractions.items())
        lines.append(f"{method}: ... as a share of all the peer's steps: {shown}")
    for key in (f"{v}_fraction_of_evolm_steps" for v in EVOLM_VARIANTS if v != "evolm"):
        if key in rep:
            shown = ", ".join(f"seed {s} {'never' if f is None else f'{f:.0%}'}" for s, f in rep[key].items())
            lines.append(f"{key.split('_')[0]}: steps to reach plain evolm's best, as a share of plain evolm's "
                         f"steps: {shown}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EvolmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
