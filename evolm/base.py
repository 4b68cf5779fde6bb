"""The stage-0 model and the run's data: what every stage's search starts from.

    prepare_base(config)  read every split, get a tokenizer and a model (built from a config, with a
                          BPE tokenizer trained on the run's own text, or loaded), tokenize every
                          domain, and pretrain the base on ``model.pretrain`` when the config has one

Benchmarks call ``prepare_base`` too, so they measure the base a run would start from.
Domains are the loss matrix's columns: the base's own domain first (when declared), then the stages.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from evolm import data as stage_data
from evolm.config import ExperimentConfig
from evolm.errors import DataError
from evolm.models import build_model, load_model, resolve_dtype, train_tokenizer
from evolm.train import evaluate, pick_device, train_loop

log = logging.getLogger(__name__)


@dataclass
class Domain:
    """One column of the loss matrix: a domain's splits as token blocks."""

    name: str
    blocks: dict[str, np.ndarray]
    validation: list = field(default_factory=list)
    """The validation split's examples as read from the files, for the user's own objectives."""


@dataclass
class Base:
    model: object
    tokenizer: object
    domains: list[Domain]
    n_base_domains: int
    """1 when the base has a declared domain of its own (``model.pretrain`` or ``model.domain``), else 0."""
    dtype: torch.dtype = torch.float32
    """What the base is held in during the search (``model.dtype``); a built model is pretrained in
    float32 first, then cast (``hold``)."""
    classes: list[str] | None = None
    """Classification: the classifier's classes, in output order; None: a causal LM."""
    device: torch.device = torch.device("cpu")
    """Where the driver's own work runs (pretraining, merges, test losses, samples): the evaluations'
    kind of device (a GPU when ``ray.num_gpus_per_trial`` > 0 and the driver has one)."""

    def hold(self) -> None:
        """Parameters and saved buffers to ``dtype``; buffers a checkpoint does not carry (Llama's
        rotary ``inv_freq``) stay as they are, as they will be when the saved model is loaded again."""
        saved = set(self.model.state_dict())
        with torch.no_grad():
            for param in self.model.parameters():
                param.data = param.data.to(self.dtype)
            for path, module in self.model.named_modules():
                for name, buf in module._buffers.items():
                    full = f"{path}.{name}" if path else name
                    if buf is not None and buf.is_floating_point() and full in saved:
                        module._buffers[name] = buf.to(self.dtype)

    def stage_domain(self, k: int) -> Domain:
        return self.domains[self.n_base_domains + k - 1]

    def domains_before(self, k: int) -> list[Domain]:
        """Every domain the model knew before stage k (the base's own included)."""
        return self.domains[: self.n_base_domains + k - 1]


def read_documents(config: ExperimentConfig) -> tuple[dict | None, list[dict]]:
    """Every split of the base's own domain (if declared) and of every stage, as documents."""
    own = config.model.own_domain
    pretrain = stage_data.load_splits(own) if own else None
    return pretrain, [stage_data.load_splits(s) for s in config.stages]


def run_classes(config: ExperimentConfig, pretrain_docs, stage_docs) -> list[str] | None:
    """The classifier's classes: ``model.labels``, else every training class of every domain, sorted."""
    if not config.classification:
        return None
    classes = config.model.labels or stage_data.training_classes([d for d in [pretrain_docs, *stage_docs] if d])
    if len(classes) < 2:
        raise DataError(f"classification needs at least two classes; the training data has "
                        f"{len(classes)} ({', '.join(classes)}); check label_field")
    return classes


def tokenize_domains(config: ExperimentConfig, tokenizer, pretrain_docs, stage_docs,
                     classes: list[str] | None = None) -> list[Domain]:
    def tok(docs, where):
        return stage_data.tokenize_splits(docs, tokenizer, config.block_size, where, classes)

    domains = [Domain(s.name, tok(d, f"stage '{s.name}'"), list(d["validation"]))
               for s, d in zip(config.stages, stage_docs)]
    if pretrain_docs:
        p = config.model.own_domain
        field = "model.pretrain" if config.model.pretrain else "model.domain"
        domains.insert(0, Domain(p.name, tok(pretrain_docs, f"{field} '{p.name}'")))
    return domains


def prepare_base(config: ExperimentConfig, say=log.info, pretrain_steps: int | None = None) -> Base:
    """The stage-0 model, pretrained on ``model.pretrain`` when the config has it (``pretrain_steps``
    overrides its ``max_steps``), and every domain."""
    base = load_base(config, say)
    if config.model.pretrain:
        pretrain(base, config, say, pretrain_steps)
    base.hold()
    return base


def load_base(config: ExperimentConfig, say=log.info, model_dir: str | None = None,
              dtype: torch.dtype | None = None) -> Base:
    """Every domain and the model before pretraining: built, loaded from ``model.name_or_path``, or
    from ``model_dir`` (a resumed run's current base). All user input is read and checked here."""
    device = pick_device(config.ray.num_gpus_per_trial > 0)
    dtype = dtype or resolve_dtype(config.model.dtype, device)  # a resumed run keeps the dtype it began with
    pretrain_docs, stage_docs = read_documents(config)
    classes = run_classes(config, pretrain_docs, stage_docs)
    if model_dir is not None:
        model, tokenizer = load_model(model_dir, dtype, classes)
    elif config.model.build:
        corpus = pretrain_docs["train"] if pretrain_docs else [d for s in stage_docs for d in s["train"]]
        corpus = [stage_data.example_key(d) for d in corpus]
        say(f"training a {config.model.build.vocab_size}-token BPE tokenizer on {len(corpus)} documents")
        tokenizer = train_tokenizer(corpus, config.model.build.vocab_size)
        model = build_model(config.model.build, len(tokenizer), config.block_size, config.seed, classes)
    else:
        model, tokenizer = load_model(config.model.name_or_path, torch.float32 if config.model.pretrain else dtype,
                                      classes, config.seed)
    model.to(device).eval()
    return Base(model, tokenizer, tokenize_domains(config, tokenizer, pretrain_docs, stage_docs, classes),
                1 if config.model.own_domain else 0, dtype, classes, device)


def pretrain(base: Base, config: ExperimentConfig, say=log.info, max_steps: int | None = None) -> None:
    """A full fine-tune of the base on its own domain (``model.pretrain``)."""
    p = config.model.pretrain
    hp = p.model_dump() | {"max_grad_norm": 1.0}
    if max_steps is not None:
        hp["max_steps"] = max_steps
    if hp["max_steps"] <= 0:
        return
    say(f"pretraining the base on '{p.name}' for {hp['max_steps']} steps")
    start = time.perf_counter()
    curve = with_fixed_threads(train_loop, base.model, base.domains[0].blocks["train"], hp, config.seed, base.device)
    say(f"pretraining: loss {curve['first']:.3f} -> {curve['tail_mean']:.3f} in {time.perf_counter() - start:.0f}s")


def test_losses(model, domains: list[Domain], eval_batch_size: int) -> list[float]:
    """Test loss on each domain, never capped: the loss matrix is the record."""
    return [evaluate(model, d.blocks["test"], eval_batch_size, None, model.device) for d in domains]


def test_accuracies(model, domains: list[Domain], eval_batch_size: int) -> list[float]:
    """Test accuracy of a classifier on each domain, never capped (the accuracy matrix)."""
    from evolm.classify import accuracy

    return [accuracy(model, d.blocks["test"], eval_batch_size, None, model.device) for d in domains]


def with_fixed_threads(fn, *args, **kwargs):
    """``fn`` with as many torch threads as CPUs: the driver's own work (pretraining, merges, test
    losses) then gives the same floating-point results whatever ran before in the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
