"""The conductor: for each stage, search, merge the winners, measure, checkpoint.

    base = prepare (built or loaded; pretrained on model.pretrain when declared)
    for stage k:
        population = evolve_stage(population carried over from k-1, or random)   evolm.stage
        merged     = merge(winners, base)                                           evolm.winners
        base       = the best of base + s · (merged − base) over merge.strengths; save  evolm.strength
        loss matrix row k = test losses of base on every domain

A checkpoint follows every generation and every merge. Every finished evaluation is in the
ledger (evaluations.jsonl, its adapter in adapters/), so a resumed run redoes no finished work
and, since every random choice is seeded, ends exactly where the uninterrupted run would have
(docs/design.md, "Contracts").
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from evolm.adapters import export_stage_adapters
from evolm.base import load_base, pretrain, with_fixed_threads
from evolm.checkpoint import checkpoint_tag, latest_checkpoint, save_checkpoint
from evolm.interference import stage_subspaces
from evolm.jsonfiles import append_jsonl, read_jsonl, write_atomic, write_json
from evolm.config import ExperimentConfig
from evolm.diskfull import raise_naming
from evolm.errors import RunDirError
from evolm.evaluation import GenerationEvaluator
from evolm.evolution import Evolution
from evolm.executor import StagePayload
from evolm.generate import write_samples
from evolm.genome import hyperparameters
from evolm.ledger import StageLedger, repair_logs
from evolm.models import (DTYPES, ModelPayload, family_and_layers, linear_layer_names, load_model, save_model,
                          uses_conv1d)
from evolm.objectives import resolve_objective, validation_examples
from evolm.records import StageSummary
from evolm.rundir import holds_a_run
from evolm.reporting import LogReporter, Reporter
from evolm.searchspace import resolve_space, training_defaults
from evolm.schedule import write_schedule
from evolm.runstate import (RunState, check_data_unchanged, checkpoint_state, fill_replay, genome_from_state,
                            restore_search, write_loss_matrix, write_run_info)
from evolm.stage import GenerationStep, StageHooks, StageBudget, evolve_stage
from evolm.steady import SteadyState
from evolm.strength import forgetting_of, score_merges
from evolm.winners import choose_winners, merge_candidates, source_of

__all__ = ["ContinualRun", "Reporter"]


class ContinualRun:
    def __init__(self, config: ExperimentConfig, run_dir: Path, make_executor, reporter: Reporter | None = None):
        """``make_executor()`` is called once the base model is ready, so Ray's start-up does not
        compete with tokenizer training and pretraining for the CPUs."""
        self.config, self.run_dir, self.make_executor = config, Path(run_dir), make_executor
        self.reporter = reporter or LogReporter()
        self.objectives = list(config.search.objectives)
        self.state: RunState | None = None
        self.executor = None

    # ----- entry points -------------------------------------------------------------------
    def run(self) -> list[StageSummary]:
        """A new run in an empty (or new) run directory."""
        if holds_a_run(self.run_dir):
            raise RunDirError(f"{self.run_dir} already holds a run; resume it (evolm resume {self.run_dir}) "
                              f"or start in an empty directory")
        return with_fixed_threads(lambda: self._loop(self._start_fresh(), None))

    def resume(self) -> list[StageSummary]:
        """Continue from the newest whole checkpoint; earlier corrupt ones are reported and skipped."""
        def go():
            checkpoint, warnings = latest_checkpoint(self.run_dir)
            for w in warnings:
                self.reporter.message(f"warning: {w}")
            if checkpoint is None:
                self.reporter.message("no checkpoint yet: starting the run again from the beginning "
                                      "(finished evaluations are taken from the ledger)")
                return self._loop(self._start_fresh(resuming=True), None)
            self.reporter.message(f"resuming from checkpoint {checkpoint['tag']}")
            return self._loop(self._start_resumed(checkpoint), checkpoint)

        return with_fixed_threads(go)

    # ----- set-up -------------------------------------------------------------------------
    def _start_fresh(self, resuming: bool = False) -> RunState:
        """Data, tokenizer and base model (stage 0), the search space and the loss matrix's row 0.
        All user input is read and checked before anything is written to the run directory."""
        cfg = self.config
        base = load_base(cfg, self.reporter.message)
        self.state = state = self._search_state(base)
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)
        if resuming and (self.run_dir / "run.json").exists():
            check_data_unchanged(self.run_dir)  # the ledger's records were made from that data
        write_json(self.run_dir / "experiment.json", cfg.model_dump(mode="json"))  # a resume's extension, checked
        write_run_info(self.run_dir, cfg)
        self._write_resolved_config()
        if cfg.model.pretrain:
            pretrain(base, cfg, self.reporter.message)
        base.hold()
        self._save_model(0)
        write_samples(self.run_dir, base.model, base.tokenizer, cfg, 0, "base")
        state.measure_row(0, base.model)
        write_loss_matrix(self.run_dir, cfg, state)
        return state

    def _start_resumed(self, checkpoint: dict) -> RunState:
        dtype = DTYPES.get(checkpoint.get("dtype"))  # None (an older checkpoint): resolved again
        base = load_base(self.config, self.reporter.message, str(self.run_dir / checkpoint["base_model"]), dtype)
        check_data_unchanged(self.run_dir)
        self.state = state = self._search_state(base)
        write_json(self.run_dir / "experiment.json", self.config.model_dump(mode="json"))  # an extension, checked
        write_run_info(self.run_dir, self.config)
        self._write_resolved_config()
        state.loss_matrix = checkpoint["loss_matrix"]
        state.accuracy_matrix = checkpoint.get("accuracy_matrix") or []
        state.summaries = [StageSummary.from_json(s) for s in checkpoint["summaries"]]
        for i, row in enumerate(state.loss_matrix):  # stages were appended: measure earlier models on them
            if len(row) < len(base.domains):
                model, _ = load_model(str(self.run_dir / "models" / f"stage-{i}"), base.dtype)
                model.to(base.device)
                state.measure_row(i, model, base.domains[len(row):])
        return state

    def _search_state(self, base) -> RunState:
        """The search space and training defaults for this model, checked against its own layers."""
        cfg = self.config
        (family, n_layers), linear = family_and_layers(base.model), linear_layer_names(base.model)
        space = resolve_space(cfg, family, n_layers, linear)
        training = training_defaults(cfg, family, linear, uses_conv1d(base.model))
        return RunState(base, Evolution(space, cfg.search, cfg.seed, len(self.objectives)), space, training)

    def _write_resolved_config(self) -> None:
        """config.yaml: the experiment with the search space and training settings as searched."""
        resolved = self.config.model_dump(mode="json")
        resolved["search"]["space"] = {k: g.model_dump(mode="json") for k, g in self.state.space.items()}
        resolved["training"] = self.state.training
        # readers show a maximised objective un-negated (it is stored negated)
        resolved["search"]["directions"] = {o: resolve_objective(o).direction for o in self.objectives}
        write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    # ----- the loop -----------------------------------------------------------------------
    def _loop(self, state: RunState, checkpoint: dict | None) -> list[StageSummary]:
        state.session_start, state.elapsed_before = time.time(), (checkpoint or {}).get("elapsed", 0.0)
        at = restore_search(checkpoint, state.evolution)
        repair_logs(self.run_dir, checkpoint)
        state.replay = fill_replay(self.config, state.base, at.first_stage)
        population = at.population
        if at.first_stage <= len(self.config.stages):
            self.executor = self.make_executor()
            try:
                for k in range(at.first_stage, len(self.config.stages) + 1):
                    first = k == at.first_stage
                    population = self.run_stage(k, population, at.first_gen if first else 0,
                                                at.hall_of_fame if first else None, at.steady if first else None)
            finally:
                self.executor.close()
        write_json(self.run_dir / "summary.json", {"stages": [s.to_json() for s in state.summaries]})
        return state.summaries

    def run_stage(self, k: int, population, first_gen: int, hof_items, steady: dict | None = None) -> list:
        start, state, cfg = time.perf_counter(), self.state, self.config
        domain, evo = state.base.stage_domain(k), state.evolution
        ledger = StageLedger.read(self.run_dir, k)
        blocks = {s: domain.blocks[s] for s in ("train", "validation")}
        if len(state.replay):
            blocks["replay"] = state.replay.blocks()
        base_retention = 0.0  # no earlier domain (stage 1 without a base domain): nothing to forget
        if k + state.base.n_base_domains > 1:
            blocks["retention"] = state.retention_blocks(k)
            base_retention = state.eval_loss(state.base.model, blocks["retention"])
        self.executor.set_stage(StagePayload(f"{self.run_dir.resolve()}/stage-{k}", ModelPayload.of(state.base.model),
                                             blocks, state.training, [resolve_objective(o) for o in self.objectives],
                                             self._update_subspaces(k), state.base.tokenizer,
                                             validation_examples(domain.validation, state.training)))
        hof = evo.hall_of_fame(max(10, cfg.merge.top_k)) if len(self.objectives) == 1 else evo.pareto_archive()
        if hof_items:
            hof.update([genome_from_state(d, evo.fitness_class) for d in hof_items])
        evaluator = GenerationEvaluator(self.run_dir, k, domain.name, ledger, self.executor, self.reporter,
                                        self.objectives, state.training, cfg.seed, cfg.search.halving,
                                        cfg.search.inherit_weights, cfg.search.scheduler)
        hooks = StageHooks(checkpoint=lambda gen, pop, steady=None: self._checkpoint(k, gen, pop, hof, steady),
                           message=lambda text: self.reporter.message(f"stage '{domain.name}': {text}"))
        step = GenerationStep(self.run_dir, k, domain.name, evaluator, hof, self.reporter, state.space)
        budget = StageBudget(cfg.search.step_budget, ledger,
                             lambda g: int(hyperparameters(g.values, state.training).max_steps),
                             cfg.search.time_budget, cfg.search.run_time_budget, lambda gen: self._seconds_spent(k, gen))
        population = population or evo.initial_population(k)
        if cfg.search.mode == "steady_state":
            # children in flight: ray.num_workers, whatever the executor (--no-ray takes them in turn), so
            # the search does not depend on where it runs and a Ray run replays on one process
            population = SteadyState(evo, step, budget, hooks, k, cfg.search.generations,
                                     cfg.ray.num_workers).run(population, first_gen, steady)
        else:
            population = evolve_stage(population, evo, step, budget, hooks, k, cfg.search.generations, first_gen)
        self._merge(k, ledger, blocks, hof, base_retention, start)
        self._checkpoint(k, None, population, hof)
        ledger.prune_adapters(keep=set(state.summaries[-1].merged))
        state.replay.add(domain.name, domain.blocks["train"])
        return population

    def _seconds_spent(self, k: int, gen: int) -> tuple[float, float]:
        """(stage k's, the run's) recorded generation seconds before generation ``gen`` of stage k."""
        stage_s = run_s = 0.0
        for row in read_jsonl(self.run_dir / "generations.jsonl"):
            at = (row.get("stage"), row.get("generation"))
            seconds = row.get("seconds") if isinstance(row.get("seconds"), (int, float)) else 0.0
            if not all(isinstance(x, int) for x in at) or at >= (k, gen):
                continue
            run_s += seconds
            stage_s += seconds if at[0] == k else 0.0
        return stage_s, run_s

    def _merge(self, k: int, ledger: StageLedger, blocks: dict, hof, base_retention: float, start: float) -> None:
        state, cfg, say = self.state, self.config, self.reporter.message
        domain = state.base.stage_domain(k)
        rule = cfg.search.winner.model_dump() | {"base_retention": base_retention}
        winners = choose_winners(hof, self.objectives, rule, cfg.merge, ledger, domain.name, say)
        candidates = merge_candidates(state.base.model, winners, ledger, state.training, cfg.merge, cfg.seed + k)

        parts = state.retention_parts(k) if "retention" in blocks else {}
        before = state.domain_losses(state.base.model, parts)  # the stage base on each earlier domain

        def measure(model) -> dict:
            return {"val_loss": state.eval_loss(model, blocks["validation"])} | forgetting_of(
                state.domain_losses(model, parts), before, {n: len(b) for n, b in parts.items()})

        curve, chosen = score_merges(state.base.model, candidates, cfg.merge.strengths, measure,
                                               self.objectives, rule if "retention" in blocks else {"rule": "min_first"},
                                               state.evolution.fitness_class, say,
                                               lambda p: append_jsonl(self.run_dir / "merge_curve.jsonl",
                                                                      {"stage": k} | p.to_json()))
        state.base.model, point = chosen.model, next(p for p in curve if p.chosen)
        ranked = chosen.genomes[:1] + [g for g in winners.ranked if g is not chosen.genomes[0]]
        kept = [(g, source_of(g, ledger)) for g in ranked[: 1 + cfg.checkpoint.keep_adapters]]
        adapters = export_stage_adapters(self.run_dir, k, [  # a runner-up whose file is gone is skipped
            (src, hyperparameters(g.values, state.training), ledger.load_adapter(src),
             dict(zip(self.objectives, g.fitness.values))) for g, src in kept if ledger.adapter_path(src).exists()])
        write_schedule(self.run_dir, k, ledger, source_of(chosen.genomes[0], ledger))
        self._save_model(k)
        write_samples(self.run_dir, state.base.model, state.base.tokenizer, cfg, k, domain.name)
        state.measure_row(k, state.base.model)
        write_loss_matrix(self.run_dir, cfg, state)
        col, winner = state.base.n_base_domains + k - 1, chosen.genomes[0]
        merged = [source_of(g, ledger) for g in chosen.genomes]
        objectives = dict(zip(self.objectives, winner.fitness.values))
        summary = StageSummary(stage=k, name=domain.name, start_loss=state.loss_matrix[k - 1][col],
                               end_loss=state.loss_matrix[k][col],
                               winner=winner.to_json() | {"result_of": merged[0]},
                               winner_objectives=objectives, winner_val_loss=objectives.get("val_loss"),
                               merge_method=point.method, merge_strength=point.strength,
                               merge_curve=[p.to_json() for p in curve], merged=merged, evaluations=ledger.trained,
                               steps=ledger.steps_before(), hall_of_fame=[g.id for g in hof], adapters=adapters,
                               seconds=time.perf_counter() - start)
        state.summaries = state.summaries[: k - 1] + [summary]
        self.reporter.stage_end(summary)

    def _update_subspaces(self, k: int) -> dict:
        """What earlier stages changed, when the ``orthogonality`` gene may use it (else nothing)."""
        return stage_subspaces(self.run_dir, self.state.base.model, k) if "orthogonality" in self.state.space else {}

    # ----- run state on disk --------------------------------------------------------------
    def _checkpoint(self, k: int, gen: int | None, population: list, hof, steady: dict | None = None) -> None:
        save_checkpoint(self.run_dir, checkpoint_tag(k, gen),
                        checkpoint_state(self.state, self.config, k, gen, population, hof, steady),
                        self.config.checkpoint.keep_last)

    def _save_model(self, k: int) -> None:
        """Write to a temporary folder, then swap it in: a kill never leaves half a model."""
        final, tmp = self.run_dir / "models" / f"stage-{k}", self.run_dir / "models" / f".stage-{k}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_model(self.state.base.model, self.state.base.tokenizer, tmp)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: half a model must not keep the space
            raise_naming(final, exc)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
