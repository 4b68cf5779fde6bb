"""The stage loop: for each stage, evolve LoRA genomes, merge the winner, extend the loss matrix.

    base = pretrained or built model (optionally a full fine-tune on a general domain)
    for stage k:
        population = carried over from stage k-1 (or random), fitness invalidated
        evaluate(population); repeat G times: offspring = vary; evaluate; population = select
        base = merge(winner, base); save models/stage-k; loss matrix row k
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from deap import tools

from evolm import data as stage_data
from evolm.checkpoint import append_jsonl, write_atomic, write_json
from evolm.config import ExperimentConfig, default_target_modules, resolve_space
from evolm.errors import EvolmError
from evolm.evolution import Evolution, fitness_summary
from evolm.executor import EvalRequest, StagePayload
from evolm.generate import write_samples
from evolm.genome import Genome, evaluation_seed, hyperparameters
from evolm.merge import merge_best
from evolm.models import ModelPayload, build_model, family_and_layers, load_model, save_model, train_tokenizer
from evolm.train import evaluate, train_loop

log = logging.getLogger(__name__)
OBJECTIVES = ("val_loss",)


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
    """State of one stage's search: the fitness cache and the genomes evaluated so far."""

    index: int
    domain: Domain
    cache: dict[str, dict] = field(default_factory=dict)
    evaluations: int = 0


class ContinualRun:
    def __init__(self, config: ExperimentConfig, run_dir: Path, make_executor, reporter: Reporter | None = None):
        """``make_executor()`` is called once the base model is ready, so Ray's start-up does not
        compete with tokenizer training and pretraining for the CPUs."""
        self.config, self.run_dir, self.make_executor = config, Path(run_dir), make_executor
        self.reporter = reporter or Reporter()
        self.training = config.training.model_dump()

    # ----- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Data, tokenizer and base model (stage 0), the search space and the loss matrix's row 0."""
        cfg = self.config
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)
        pretrain_docs = stage_data.load_splits(cfg.model.pretrain) if cfg.model.pretrain else None
        stage_docs = [stage_data.load_splits(s) for s in cfg.stages]
        if cfg.model.build:
            corpus = pretrain_docs["train"] if pretrain_docs else [d for s in stage_docs for d in s["train"]]
            self.reporter.message(f"training a {cfg.model.build.vocab_size}-token BPE tokenizer on {len(corpus)} documents")
            self.tokenizer = train_tokenizer(corpus, cfg.model.build.vocab_size)
            self.base = build_model(cfg.model.build, len(self.tokenizer), cfg.block_size, cfg.seed)
        else:
            self.base, self.tokenizer = load_model(cfg.model.name_or_path)
        self.base.eval()
        tok = lambda docs, where: stage_data.tokenize_splits(docs, self.tokenizer, cfg.block_size, where)  # noqa: E731
        self.domains = [Domain(s.name, tok(d, f"stage '{s.name}'")) for s, d in zip(cfg.stages, stage_docs)]
        if pretrain_docs:
            self.domains.insert(0, Domain(cfg.model.pretrain.name, tok(pretrain_docs, f"model.pretrain '{cfg.model.pretrain.name}'")))
            self._pretrain(self.domains[0])
        family, n_layers = family_and_layers(self.base)
        self.space = resolve_space(cfg, family, n_layers)
        if self.training["target_modules"] is None:
            self.training["target_modules"] = default_target_modules(family)
        self.training["fan_in_fan_out"] = family == "gpt2"  # GPT-2 stores linear weights transposed (Conv1D)
        resolved = cfg.model_dump(mode="json")
        resolved["search"]["space"] = {k: g.model_dump(mode="json") for k, g in self.space.items()}
        resolved["training"] = self.training
        write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        save_model(self.base, self.tokenizer, self.run_dir / "models" / "stage-0")
        write_samples(self.run_dir, self.base, self.tokenizer, cfg, 0, "base")
        self.loss_matrix = [self._test_losses(self.base)]
        self._write_loss_matrix()

    def _pretrain(self, domain: Domain) -> None:
        p = self.config.model.pretrain
        self.reporter.message(f"pretraining the base on '{p.name}' for {p.max_steps} steps")
        hp = p.model_dump() | {"max_grad_norm": 1.0}
        start = time.perf_counter()
        curve = train_loop(self.base, domain.blocks["train"], hp, self.config.seed, torch.device("cpu"))
        self.reporter.message(f"pretraining: loss {curve['first']:.3f} -> {curve['tail_mean']:.3f} "
                              f"in {time.perf_counter() - start:.0f}s")

    # ----- the loop -----------------------------------------------------------------------
    def run(self) -> list[dict]:
        # The driver's own work (pretraining, merges, test losses) always uses the same number of
        # threads, so its floating-point results do not depend on what ran before in the process.
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> list[dict]:
        self.prepare()
        self.evolution = Evolution(self.space, self.config.search, self.config.seed, len(OBJECTIVES))
        offset = len(self.domains) - len(self.config.stages)
        population, summaries = None, []
        self.executor = self.make_executor()
        try:
            for k, domain in enumerate(self.domains[offset:], start=1):
                population, summary = self.run_stage(k, domain, population)
                summaries.append(summary)
        finally:
            self.executor.close()
        write_json(self.run_dir / "summary.json", {"stages": summaries})
        return summaries

    def run_stage(self, k: int, domain: Domain, carried: list[Genome] | None) -> tuple[list[Genome], dict]:
        start = time.perf_counter()
        search = StageSearch(k, domain)
        self.executor.set_stage(StagePayload(f"{self.run_dir.name}/stage-{k}", ModelPayload.of(self.base),
                                             {s: domain.blocks[s] for s in ("train", "validation")}, self.training))
        evo = self.evolution
        if carried is None:
            population = evo.initial_population(k)
        else:  # same genomes, new stage: their fitness must be measured again
            population = carried
            for g in population:
                del g.fitness.values
        hof = evo.hall_of_fame()
        self._generation(search, 0, population, population, hof)
        for gen in range(1, self.config.search.generations + 1):
            offspring = evo.vary(population, k, gen)
            self._generation(search, gen, offspring, population + offspring, hof)
            population = evo.select(population + offspring)
        winner = tools.selBest(population, 1)[0]
        if not np.isfinite(winner.fitness.values[0]):
            errors = [r.get("error") for r in search.cache.values() if r.get("error")]
            raise EvolmError(f"stage '{domain.name}': every evaluation failed (first error: {errors[:1]}); "
                             f"see evaluations.jsonl")
        self.base = merge_best(self.base, hyperparameters(winner.values, self.training),
                               search.cache[winner.key()]["adapter"])
        save_model(self.base, self.tokenizer, self.run_dir / "models" / f"stage-{k}")
        write_samples(self.run_dir, self.base, self.tokenizer, self.config, k, domain.name)
        self.loss_matrix.append(self._test_losses(self.base))
        self._write_loss_matrix()
        col = len(self.domains) - len(self.config.stages) + k - 1
        summary = {"stage": k, "name": domain.name, "start_loss": self.loss_matrix[-2][col],
                   "end_loss": self.loss_matrix[-1][col], "winner": winner.to_json(),
                   "winner_val_loss": winner.fitness.values[0], "evaluations": search.evaluations,
                   "hall_of_fame": [g.id for g in hof], "seconds": time.perf_counter() - start}
        self.reporter.stage_end(summary)
        return population, summary

    def _generation(self, search: StageSearch, gen: int, new: list[Genome], everyone: list[Genome], hof) -> None:
        start = time.perf_counter()
        todo = [g for g in new if not g.fitness.valid]
        self.reporter.generation_start(search.index, gen, len(todo))
        self._evaluate(search, gen, todo)
        hof.update(everyone)
        record = {"stage": search.index, "stage_name": search.domain.name, "generation": gen,
                  **fitness_summary(everyone), "evaluations": len(todo),
                  "failed": sum(1 for g in todo if not np.isfinite(g.fitness.values[0])),
                  "seconds": time.perf_counter() - start, "population": [g.id for g in everyone]}
        append_jsonl(self.run_dir / "generations.jsonl", record)
        self.reporter.generation_end(record)

    def _evaluate(self, search: StageSearch, gen: int, todo: list[Genome]) -> None:
        """Fitness for ``todo``; a genome already evaluated on this stage is served from the cache."""
        waiting: dict[str, list[Genome]] = {}
        for g in todo:
            waiting.setdefault(g.key(), []).append(g)
        requests = []
        for key, genomes in waiting.items():
            if key in search.cache:
                continue
            first = genomes[0]
            requests.append(EvalRequest(first.id, hyperparameters(first.values, self.training),
                                        evaluation_seed(self.config.seed, search.index, first.id)))

        def on_result(result: dict) -> None:
            key = next(k for k, gs in waiting.items() if gs[0].id == result["genome_id"])
            search.cache[key] = result
            self._assign(search, gen, waiting.pop(key), result, cached=False)

        self.executor.map(requests, on_result)
        for key, genomes in waiting.items():  # genomes whose twin was evaluated earlier
            self._assign(search, gen, genomes, search.cache[key], cached=True)

    def _assign(self, search: StageSearch, gen: int, genomes: list[Genome], result: dict, cached: bool) -> None:
        ok = result["status"] == "ok"
        values = tuple(result["objectives"][o] if ok else float("inf") for o in OBJECTIVES)
        for i, g in enumerate(genomes):
            g.fitness.values = values
            search.evaluations += not cached and i == 0
            record = {"stage": search.index, "stage_name": search.domain.name, "generation": gen,
                      "genome_id": g.id, "values": g.values, "parents": g.parents, "ops": g.ops,
                      "objectives": result["objectives"] if ok else None, "status": result["status"],
                      "error": result.get("error"), "traceback": result.get("traceback"),
                      "curve": result.get("curve"), "adapter_params": result.get("adapter_params"),
                      "seconds": result.get("seconds"), "train_seconds": result.get("train_seconds"),
                      "worker": result.get("worker"), "cached": cached or i > 0,
                      "seed": evaluation_seed(self.config.seed, search.index, result["genome_id"])}
            append_jsonl(self.run_dir / "evaluations.jsonl", record)
            self.reporter.evaluation_done(record)

    # ----- measurements -------------------------------------------------------------------
    def _test_losses(self, model) -> list[float]:
        t = self.training
        return [evaluate(model, d.blocks["test"], t["eval_batch_size"], None) for d in self.domains]

    def _write_loss_matrix(self) -> None:
        names = [d.name for d in self.domains]
        rows = ["base"] + [s.name for s in self.config.stages][: len(self.loss_matrix) - 1]
        write_json(self.run_dir / "loss_matrix.json",
                   {"columns": names, "rows": rows, "matrix": self.loss_matrix, "split": "test"})
