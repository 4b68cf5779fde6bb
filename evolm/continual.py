"""The stage loop: for each stage, evolve LoRA genomes, merge the winner, extend the loss matrix.

    base = pretrained or built model (optionally a full fine-tune on a general domain)
    for stage k:
        population = carried over from stage k-1 (or random), fitness invalidated
        evaluate(population); repeat G times: offspring = vary; evaluate; population = select
        base = merge(winner, base); save models/stage-k; loss matrix row k

A checkpoint follows every generation and every merge. Every finished evaluation is in the
ledger (evaluations.jsonl, its adapter in adapters/), so a resumed run redoes no finished work
and, since every random choice is seeded, ends exactly where the uninterrupted run would have.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from evolm import __version__
from evolm import data as stage_data
from evolm.checkpoint import (lists_to_tuples, tuples_to_lists, append_jsonl, checkpoint_tag, latest_checkpoint,
                              restore_global_rng, save_checkpoint, write_atomic, write_json)
from evolm.config import ExperimentConfig, resolve_space, training_defaults
from evolm.errors import EvolmError, RunDirError
from evolm.evolution import Evolution, fitness_summary, rank_by_rule
from evolm.evaluation import GenerationEvaluator
from evolm.executor import StagePayload
from evolm.generate import write_samples
from evolm.genome import Genome, hyperparameters
from evolm.ledger import StageLedger, repair_logs
from evolm.merge import merge_winners
from evolm.metrics import summarize
from evolm.replay import ReplayBuffer
from evolm.models import ModelPayload, build_model, family_and_layers, load_model, save_model, train_tokenizer
from evolm.train import evaluate, train_loop

log = logging.getLogger(__name__)


class Reporter:
    """Hooks the CLI uses to show progress; the defaults log one line per generation and stage."""

    def message(self, text: str) -> None:
        log.info(text)

    def generation_start(self, stage: int, generation: int, todo: int) -> None:
        pass

    def evaluation_done(self, record: dict) -> None:
        pass

    def generation_end(self, record: dict) -> None:
        log.info("stage %(stage)s gen %(generation)s: best %(best)s median %(median)s worst %(worst)s", record)

    def stage_end(self, summary: dict) -> None:
        log.info("stage %(stage)s done: %(start_loss).4f -> %(end_loss).4f", summary)


@dataclass
class Domain:
    """One column of the loss matrix: a stage's splits as token blocks."""

    name: str
    blocks: dict[str, np.ndarray]


@dataclass
class StageSearch:
    """One stage's search: its domain, its ledger of finished evaluations and who fills it."""

    index: int
    domain: Domain
    ledger: StageLedger
    evaluator: GenerationEvaluator


class ContinualRun:
    def __init__(self, config: ExperimentConfig, run_dir: Path, make_executor, reporter: Reporter | None = None):
        """``make_executor()`` is called once the base model is ready, so Ray's start-up does not
        compete with tokenizer training and pretraining for the CPUs."""
        self.config, self.run_dir, self.make_executor = config, Path(run_dir), make_executor
        self.reporter = reporter or Reporter()
        self.training = config.training.model_dump()
        self.objectives = list(config.search.objectives)
        self.n_base_domains = 1 if config.model.pretrain else 0

    # ----- entry points -------------------------------------------------------------------
    def run(self) -> list[dict]:
        """A new run in an empty (or new) run directory."""
        if any((self.run_dir / name).exists() for name in ("experiment.json", "evaluations.jsonl", "checkpoints")):
            # its ledger would silently stand in for evaluations of this run
            raise RunDirError(f"{self.run_dir} already holds a run; resume it (evolm resume {self.run_dir}) "
                              f"or start in an empty directory")

        def go():
            self._start_fresh()
            return self._loop(None)

        return self._with_fixed_threads(go)

    def resume(self) -> list[dict]:
        """Continue from the newest whole checkpoint; earlier corrupt ones are reported and skipped."""
        def go():
            state, warnings = latest_checkpoint(self.run_dir)
            for w in warnings:
                self.reporter.message(f"warning: {w}")
            if state is None:
                self.reporter.message("no checkpoint yet: starting the run again from the beginning "
                                      "(finished evaluations are taken from the ledger)")
                self._start_fresh(resuming=True)
                return self._loop(None)
            self.reporter.message(f"resuming from checkpoint {state['tag']}")
            self._start_resumed(state)
            return self._loop(state)

        return self._with_fixed_threads(go)

    @staticmethod
    def _with_fixed_threads(fn):
        # The driver's own work (pretraining, merges, test losses) always uses the same number of
        # threads, so its floating-point results do not depend on what ran before in the process.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    # ----- set-up -------------------------------------------------------------------------
    def _read_data(self) -> tuple[dict | None, list[dict]]:
        cfg = self.config
        pretrain = stage_data.load_splits(cfg.model.pretrain) if cfg.model.pretrain else None
        return pretrain, [stage_data.load_splits(s) for s in cfg.stages]

    def _tokenize(self, pretrain_docs, stage_docs) -> None:
        cfg = self.config
        tok = lambda docs, where: stage_data.tokenize_splits(docs, self.tokenizer, cfg.block_size, where)  # noqa: E731
        self.domains = [Domain(s.name, tok(d, f"stage '{s.name}'")) for s, d in zip(cfg.stages, stage_docs)]
        if pretrain_docs:
            self.domains.insert(0, Domain(cfg.model.pretrain.name, tok(pretrain_docs, f"model.pretrain '{cfg.model.pretrain.name}'")))

    def _start_fresh(self, resuming: bool = False) -> None:
        """Data, tokenizer and base model (stage 0), the search space and the loss matrix's row 0.

        All user input is read and checked before anything is written to the run directory."""
        cfg = self.config
        pretrain_docs, stage_docs = self._read_data()
        if cfg.model.build:
            corpus = pretrain_docs["train"] if pretrain_docs else [d for s in stage_docs for d in s["train"]]
            self.reporter.message(f"training a {cfg.model.build.vocab_size}-token BPE tokenizer on {len(corpus)} documents")
            self.tokenizer = train_tokenizer(corpus, cfg.model.build.vocab_size)
            self.base = build_model(cfg.model.build, len(self.tokenizer), cfg.block_size, cfg.seed)
        else:
            self.base, self.tokenizer = load_model(cfg.model.name_or_path)
        self.base.eval()
        self._tokenize(pretrain_docs, stage_docs)
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)
        if not resuming:
            write_json(self.run_dir / "experiment.json", cfg.model_dump(mode="json"))
        self._write_run_info()
        if cfg.model.pretrain:
            self._pretrain(self.domains[0])
        self._setup_search()
        self._save_model(0)
        write_samples(self.run_dir, self.base, self.tokenizer, cfg, 0, "base")
        self.loss_matrix, self.summaries = [self._test_losses(self.base)], []
        self._write_loss_matrix()

    def _start_resumed(self, state: dict) -> None:
        pretrain_docs, stage_docs = self._read_data()
        self._check_data_unchanged()
        self.base, self.tokenizer = load_model(str(self.run_dir / state["base_model"]))
        self.base.eval()
        self._tokenize(pretrain_docs, stage_docs)
        write_json(self.run_dir / "experiment.json", self.config.model_dump(mode="json"))  # an extension, checked
        self._write_run_info()
        self._setup_search()
        self.loss_matrix, self.summaries = state["loss_matrix"], state["summaries"]
        for i, row in enumerate(self.loss_matrix):  # stages were appended: measure earlier models on them
            if len(row) < len(self.domains):
                model, _ = load_model(str(self.run_dir / "models" / f"stage-{i}"))
                row += self._test_losses(model, self.domains[len(row):])

    def _setup_search(self) -> None:
        cfg = self.config
        family, n_layers = family_and_layers(self.base)
        self.space = resolve_space(cfg, family, n_layers)
        self.training = training_defaults(cfg, family)
        resolved = cfg.model_dump(mode="json")
        resolved["search"]["space"] = {k: g.model_dump(mode="json") for k, g in self.space.items()}
        resolved["training"] = self.training
        write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        self.evolution = Evolution(self.space, cfg.search, cfg.seed, len(self.objectives))

    def _pretrain(self, domain: Domain) -> None:
        p = self.config.model.pretrain
        self.reporter.message(f"pretraining the base on '{p.name}' for {p.max_steps} steps")
        hp = p.model_dump() | {"max_grad_norm": 1.0}
        start = time.perf_counter()
        curve = train_loop(self.base, domain.blocks["train"], hp, self.config.seed, torch.device("cpu"))
        self.reporter.message(f"pretraining: loss {curve['first']:.3f} -> {curve['tail_mean']:.3f} "
                              f"in {time.perf_counter() - start:.0f}s")

    def _data_files(self) -> list[Path]:
        sources = ([self.config.model.pretrain] if self.config.model.pretrain else []) + list(self.config.stages)
        return [p for s in sources for p in (s.train, s.validation, s.test) if p is not None]

    def _write_run_info(self) -> None:
        info_path = self.run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {"created": time.time()}
        recorded = info.get("data", {})  # digests of the run's start win; only new files are hashed
        info.update(evolm_version=__version__, pid=os.getpid(), host=socket.gethostname(), started=time.time(),
                    data={str(p): _sha256(p) for p in self._data_files() if str(p) not in recorded} | recorded)
        write_json(info_path, info)

    def _check_data_unchanged(self) -> None:
        recorded = json.loads((self.run_dir / "run.json").read_text()).get("data", {})
        changed = [p for p, digest in recorded.items() if Path(p).is_file() and _sha256(Path(p)) != digest]
        if changed:
            raise RunDirError(f"data changed since the run started: {', '.join(changed)}; restore the "
                              f"original files or start a new run")

    # ----- the loop -----------------------------------------------------------------------
    def _loop(self, state: dict | None) -> list[dict]:
        self.session_start, self.elapsed_before = time.time(), (state or {}).get("elapsed", 0.0)
        population, first_stage, first_gen, hof_items = None, 1, 0, None
        if state is not None:
            self.evolution.rng.setstate(lists_to_tuples(state["evolution_rng"]))
            restore_global_rng(state)
            # One object per id: a genome that stands in the population several times stays one genome.
            by_id = {d["id"]: self._genome_from_json(d) for d in state["population"]}
            population = [by_id[d["id"]] for d in state["population"]]
            if state["stage_done"]:
                first_stage = state["stage"] + 1
            else:
                first_stage, first_gen, hof_items = state["stage"], state["generation"] + 1, state["hall_of_fame"]
        repair_logs(self.run_dir, state)
        self._fill_replay(first_stage)
        if first_stage <= len(self.config.stages):
            self.executor = self.make_executor()
            try:
                for k in range(first_stage, len(self.config.stages) + 1):
                    population = self.run_stage(k, population, first_gen if k == first_stage else 0,
                                                hof_items if k == first_stage else None)
            finally:
                self.executor.close()
        write_json(self.run_dir / "summary.json", {"stages": self.summaries})
        return self.summaries

    def run_stage(self, k: int, population: list[Genome] | None, first_gen: int, hof_items) -> list[Genome]:
        start = time.perf_counter()
        domain = self.domains[self.n_base_domains + k - 1]
        ledger = StageLedger.read(self.run_dir, k)
        sc = self.config.search
        search = StageSearch(k, domain, ledger, GenerationEvaluator(
            self.run_dir, k, domain.name, ledger, self.executor, self.reporter, self.objectives, self.training,
            self.config.seed, sc.halving, sc.inherit_weights))
        blocks = {s: domain.blocks[s] for s in ("train", "validation")}
        if len(self.replay):
            blocks["replay"] = self.replay.blocks()
        self.base_retention = 0.0  # no earlier domain (stage 1 without pretraining): nothing to forget
        if k + self.n_base_domains > 1 and ("retention_loss" in self.objectives
                                            or self.config.search.winner.rule != "min_first"):
            blocks["retention"] = self._retention_blocks(k)
            self.base_retention = self._eval(self.base, blocks["retention"])
        self.executor.set_stage(StagePayload(f"{self.run_dir.resolve()}/stage-{k}", ModelPayload.of(self.base),
                                             blocks, self.training))
        evo = self.evolution
        hof = evo.hall_of_fame(max(10, self.config.merge.top_k)) if len(self.objectives) == 1 else evo.pareto_archive()
        if hof_items:
            hof.update([self._genome_from_json(d) for d in hof_items])
        if first_gen == 0:
            if population is None:
                population = evo.initial_population(k)
            for g in population:  # same genomes, new stage: their fitness must be measured again
                del g.fitness.values
            self._generation(search, 0, population, population, hof)
            self._checkpoint(k, 0, population, hof)
        budget = self.config.search.step_budget
        for gen in range(max(1, first_gen), self.config.search.generations + 1):
            spent = search.ledger.steps_before(gen)  # a resume may already hold part of generation gen
            if budget is not None and spent >= budget:
                self.reporter.message(f"stage '{domain.name}': step budget spent ({spent} of {budget} steps) "
                                      f"after generation {gen - 1}")
                break
            offspring = evo.vary(population, k, gen)
            self._generation(search, gen, offspring, population + offspring, hof)
            population = evo.select(population + offspring)
            self._checkpoint(k, gen, population, hof)
        self._merge(search, blocks, hof, start)
        self._checkpoint(k, None, population, hof)
        search.ledger.prune_adapters(keep=set(self.summaries[-1]["merged"]))
        self.replay.add(domain.name, domain.blocks["train"])
        return population

    def _merge(self, search: StageSearch, blocks: dict, hof, start: float) -> None:
        k, domain, mc = search.index, search.domain, self.config.merge
        ranked = rank_by_rule(list(hof), self.objectives, self._winner_rule())
        if not ranked:
            errors = [r.get("error") for r in search.ledger.cache.values() if r.get("error")]
            raise EvolmError(f"stage '{domain.name}': every evaluation failed (first error: {errors[:1]}); "
                             f"see evaluations.jsonl")
        chosen = ranked[: mc.top_k]
        weights = mc.weights
        if weights is not None and len(chosen) < len(weights):  # fewer finished genomes than top_k
            weights = [w / sum(weights[: len(chosen)]) for w in weights[: len(chosen)]]
            self.reporter.message(f"stage '{domain.name}': only {len(chosen)} genomes to merge; weights {weights}")
        sources = [search.ledger.cache[g.key()]["genome_id"] for g in chosen]
        winners = [(hyperparameters(g.values, self.training), search.ledger.load_adapter(src))
                   for g, src in zip(chosen, sources)]
        methods = ["best", "task_arithmetic", "ties", "dare"] if mc.method == "auto" else [mc.method]
        candidates = [(m, merge_winners(self.base, winners, m, weights, mc.density, self.config.seed + k))
                      for m in methods]
        method, self.base = candidates[0] if len(candidates) == 1 else self._best_merge(candidates, blocks)
        self._save_model(k)
        write_samples(self.run_dir, self.base, self.tokenizer, self.config, k, domain.name)
        self.loss_matrix = self.loss_matrix[:k] + [self._test_losses(self.base)]
        self._write_loss_matrix()
        col, winner = self.n_base_domains + k - 1, chosen[0]
        summary = {"stage": k, "name": domain.name, "start_loss": self.loss_matrix[k - 1][col],
                   "end_loss": self.loss_matrix[k][col], "winner": winner.to_json() | {"result_of": sources[0]},
                   "winner_objectives": dict(zip(self.objectives, winner.fitness.values)),
                   "winner_val_loss": dict(zip(self.objectives, winner.fitness.values)).get("val_loss"),
                   "merge_method": method, "merged": sources,
                   "evaluations": search.ledger.trained, "steps": search.ledger.steps_before(), "hall_of_fame": [g.id for g in hof],
                   "seconds": time.perf_counter() - start}
        self.summaries = self.summaries[: k - 1] + [summary]
        self.reporter.stage_end(summary)

    def _winner_rule(self) -> dict:
        rule = self.config.search.winner.model_dump()
        return rule | {"base_retention": getattr(self, "base_retention", None)}

    def _best_merge(self, candidates: list[tuple[str, object]], blocks: dict) -> tuple[str, object]:
        """``auto``: each candidate merge scored on validation splits, the best by the winner rule."""
        scored = []
        for method, model in candidates:
            g = Genome(values={}, id=method, fitness=self.evolution.fitness_class())
            values = {"val_loss": self._eval(model, blocks["validation"]),
                      "retention_loss": self._eval(model, blocks["retention"]) if "retention" in blocks else 0.0,
                      "adapter_params": 0.0}
            g.fitness.values = tuple(values[o] for o in self.objectives)
            scored.append((g, (method, model)))
        rule = self._winner_rule() if "retention" in blocks else {"rule": "min_first"}
        ranked = rank_by_rule([g for g, _ in scored], self.objectives, rule)
        if not ranked:
            raise EvolmError("merge.method auto: every candidate merge gave a non-finite validation loss")
        best = ranked[0]
        method, model = next(c for g, c in scored if g is best)
        self.reporter.message(f"auto merge: {method} chosen among {', '.join(m for m, _ in candidates)}")
        return method, model

    def _generation(self, search: StageSearch, gen: int, new: list[Genome], everyone: list[Genome], hof) -> None:
        start = time.perf_counter()
        # Tournaments pick with replacement, so one genome may stand in a population several times.
        todo = list({g.id: g for g in new if not g.fitness.valid}.values())
        self.reporter.generation_start(search.index, gen, len(todo))
        search.evaluator.evaluate(gen, todo)
        hof.update(everyone)
        record = {"stage": search.index, "stage_name": search.domain.name, "generation": gen,
                  **fitness_summary(everyone), "evaluations": len(todo),
                  "failed": sum(1 for g in todo if not np.isfinite(g.fitness.values[0])),
                  "seconds": time.perf_counter() - start, "population": [g.id for g in everyone]}
        append_jsonl(self.run_dir / "generations.jsonl", record)
        self.reporter.generation_end(record)

    # ----- run state on disk --------------------------------------------------------------
    def _checkpoint(self, k: int, gen: int | None, population: list[Genome], hof) -> None:
        state = {"stage": k, "generation": gen, "stage_done": gen is None,
                 "population": [_genome_state(g) for g in population], "hall_of_fame": [_genome_state(g) for g in hof],
                 "evolution_rng": tuples_to_lists(self.evolution.rng.getstate()),
                 "loss_matrix": self.loss_matrix, "summaries": self.summaries, "config_hash": self.config.hash(),
                 "base_model": f"models/stage-{k if gen is None else k - 1}",
                 "elapsed": self.elapsed_before + time.time() - self.session_start}
        save_checkpoint(self.run_dir, checkpoint_tag(k, gen), state, self.config.checkpoint.keep_last)

    def _genome_from_json(self, d: dict) -> Genome:
        g = Genome(values=d["values"], id=d["id"], parents=d["parents"], ops=d["ops"], born=tuple(d["born"]),
                   fitness=self.evolution.fitness_class())
        if d.get("fitness") is not None:
            g.fitness.values = tuple(float("inf") if v is None else v for v in d["fitness"])
        return g

    def _save_model(self, k: int) -> None:
        """Write to a temporary folder, then swap it in: a kill never leaves half a model."""
        final, tmp = self.run_dir / "models" / f"stage-{k}", self.run_dir / "models" / f".stage-{k}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(self.base, self.tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    # ----- measurements -------------------------------------------------------------------
    def _eval(self, model, blocks: np.ndarray) -> float:
        return evaluate(model, blocks, self.training["eval_batch_size"], self.training["eval_max_batches"])

    def _retention_blocks(self, k: int) -> np.ndarray:
        """Validation blocks of every domain before stage k, in equal shares within the evaluation cap."""
        earlier = self.domains[: self.n_base_domains + k - 1]
        cap = self.training["eval_max_batches"]
        share = None if cap is None else max(1, cap * self.training["eval_batch_size"] // max(1, len(earlier)))
        parts = [d.blocks["validation"][:share] for d in earlier]
        return np.concatenate(parts) if parts else self.domains[self.n_base_domains + k - 1].blocks["validation"][:0]

    def _fill_replay(self, first_stage: int) -> None:
        """The replay buffer holds every domain learned before ``first_stage`` (rebuilt the same on resume)."""
        self.replay = ReplayBuffer(self.config.replay.buffer_blocks, self.config.seed)
        learned = self.domains[self.n_base_domains: self.n_base_domains + first_stage - 1]
        if self.n_base_domains and self.config.replay.include_base_domain:
            learned = [self.domains[0]] + learned
        for d in learned:
            self.replay.add(d.name, d.blocks["train"])

    def _test_losses(self, model, domains: list[Domain] | None = None) -> list[float]:
        """Test loss on every domain (or the given ones), never capped: the loss matrix is the record."""
        return [evaluate(model, d.blocks["test"], self.training["eval_batch_size"], None)
                for d in (self.domains if domains is None else domains)]

    def _write_loss_matrix(self) -> None:
        names = [d.name for d in self.domains]
        rows = ["base"] + [s.name for s in self.config.stages][: len(self.loss_matrix) - 1]
        learned_at = [0] * self.n_base_domains + [k if k < len(self.loss_matrix) else None
                                                  for k in range(1, len(self.config.stages) + 1)]
        matrix = {"columns": names, "rows": rows, "matrix": self.loss_matrix, "split": "test", "learned_at": learned_at}
        write_json(self.run_dir / "loss_matrix.json", matrix)
        write_json(self.run_dir / "metrics.json", summarize(matrix, learned_at))


def _genome_state(g: Genome) -> dict:
    return g.to_json() | {"fitness": list(g.fitness.values) if g.fitness.valid else None}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
