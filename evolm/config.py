"""Typed experiment config: one pydantic model per YAML section, every field documented once.

``evolm.configfile.load_config`` turns a YAML file into an ``ExperimentConfig`` (or a one-line
``ConfigError`` naming the field); relative paths are resolved against the experiment file's folder.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from evolm.configsection import Section, one_of
from evolm.dataconfig import BaseDomainConfig, DataSource, PretrainConfig, StageConfig
from evolm.rayconfig import RayConfig
from evolm.trainingconfig import PrivacyConfig, TrainingConfig  # noqa: F401  (re-exported)
from evolm.searchspace import KNOWN_GENES, gene_range_problem
from evolm.space import Gene


class BuildConfig(Section):
    """A small causal LM built from a config (no download)."""

    family: Literal["gpt2", "llama", "bert"] = "gpt2"
    """gpt2, llama: decoders (text, Q&A, classification); bert: an encoder (classification only)."""
    n_layer: int = Field(default=4, ge=1)
    """Number of transformer blocks."""
    n_embd: int = Field(default=128, ge=8)
    """Hidden size."""
    n_head: int = Field(default=4, ge=1)
    vocab_size: int = Field(default=2048, ge=300)
    """Vocabulary of the BPE tokenizer trained on the run's own data."""

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ModelConfig(Section):
    name_or_path: str | None = None
    """A Hugging Face hub id or a local model directory (with its tokenizer)."""
    build: BuildConfig | None = None
    """Build a small model from a config instead (mutually exclusive with ``name_or_path``)."""
    pretrain: PretrainConfig | None = None
    """Optional first full fine-tune on a general domain, so the base already knows something."""
    domain: BaseDomainConfig | None = None
    """The base's own domain without pretraining (e.g. a hub model's kind of text); ``pretrain``
    declares it too, so the two exclude each other."""
    labels: list[str] | None = None
    """Classification: the classes, in the order of the classifier's outputs (default: every class of
    the stages' training data, sorted). Listing them keeps the head's size when stages bring new classes."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype the base is held in (adapters and optimizer state stay float32). auto: bfloat16 where
    the driver's device supports it (a GPU), float32 on a CPU. Pretraining runs in float32, then the
    base is cast. float16 needs a GPU."""

    @field_validator("name_or_path")
    @classmethod
    def _relative_to_the_experiment(cls, name: str | None, info: ValidationInfo) -> str | None:
        """A relative folder that exists next to the experiment file is taken from there (as data paths
        are); anything else is left as written (a hub id, or a path from the current folder)."""
        if name is None or Path(name).expanduser().is_absolute():
            return name
        beside = Path((info.context or {}).get("base_dir", ".")) / name
        return str(beside.resolve()) if beside.is_dir() else name

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name_or_path is None) == (self.build is None):
            raise ValueError("set exactly one of model.name_or_path (hub id or local dir) or model.build")
        if self.pretrain is not None and self.domain is not None:
            raise ValueError("model.pretrain already declares the base's domain; drop model.domain "
                             "(or model.pretrain, to measure a loaded model on model.domain without training it)")
        return self

    @property
    def own_domain(self) -> DataSource | None:
        """The base's own domain: ``pretrain``'s data or ``domain``."""
        return self.pretrain or self.domain


class WinnerConfig(Section):
    """How the stage winner is picked from the hall of fame / Pareto set (never on test splits)."""

    rule: str = "min_first"
    """A registered winner rule (``evolm.registry.WINNER_RULES``). min_first: lowest first objective.
    min_val_loss_within_forgetting: the lowest val_loss whose retention_loss exceeds the stage base's
    by at most max_forgetting nats, else the lowest retention_loss. min_val_loss_within_retention:
    the same with a relative limit, (1 + epsilon) times the stage base's. Default: within_forgetting
    when the objectives include retention_loss, else min_first."""
    epsilon: float = Field(default=0.05, ge=0)
    max_forgetting: float = Field(default=0.05, ge=0)
    """Nats of validation loss on earlier domains a stage may give up (min_val_loss_within_forgetting)."""

    @field_validator("rule")
    @classmethod
    def _registered(cls, rule: str) -> str:
        from evolm.evolution import WINNER_RULES

        return one_of(rule, WINNER_RULES.names(), "winner rule")


class HalvingConfig(Section):
    """Successive halving: every new genome first trains a share of its ``max_steps``; only the best
    continue, from where they paused, to the full budget. On by default: at equal training steps it
    found better genomes on every task of the search benchmark (benchmarks/README.md, search)."""

    rungs: int = Field(default=3, ge=1, le=6)
    """Budget levels; 1 turns halving off. With 3 rungs and reduction_factor 3 genomes train 1/9,
    then 1/3, then all of their max_steps."""
    reduction_factor: float = Field(default=3, gt=1)
    """Each rung promotes the best 1/reduction_factor of its genomes (at least one)."""


class SearchConfig(Section):
    objectives: list[str] = Field(default=["val_loss"], min_length=1)
    """What evolution minimises: one objective -> (mu + lambda); several -> NSGA-II. A registered name
    (val_loss, retention_loss, adapter_params, see ``evolm.objectives``) or your own ``module:function``.
    retention_loss is the validation loss on all earlier stages (the base's own domain included).
    Default: [val_loss, retention_loss] when the run has an earlier domain to keep (several stages, or
    the base's own domain), else [val_loss]."""
    winner: WinnerConfig = Field(default_factory=WinnerConfig)

    population_size: int = Field(default=6, ge=2)
    """mu: genomes kept from generation to generation (and carried to the next stage)."""
    offspring_size: int = Field(default=6, ge=1)
    """lambda: new genomes made by crossover or mutation in each generation."""
    generations: int = Field(default=3, ge=0)
    """Generations of variation per stage, after the population is (re-)evaluated on the stage."""
    mode: Literal["generational", "steady_state"] = "steady_state"
    """generational: (mu + lambda) generation by generation, each waiting for its slowest evaluation;
    two fresh runs of one config give the same result on any number of workers.
    steady_state (the default: with halving it found the best genomes at equal steps on every task of
    the search benchmark): asynchronous, no barrier: as soon as a worker's result is taken, the child joins
    the population (the worst of mu + 1 leaves) and the worker trains a new child bred from it, as
    many children in all as the generational search trains (``evolm.steady``). Results are taken in
    the order they finish, which the ledger records: a resume replays it exactly; on several workers
    two fresh runs may differ. Replacing the worst keeps the best genome (``elitism`` is implied).
    With ``halving``, promotion is asynchronous (ASHA's rule, at each rung result)."""
    tournament_size: int = Field(default=3, ge=2)
    elitism: int = Field(default=1, ge=0)
    """The best this-many genomes always survive selection."""
    crossover_prob: float = Field(default=0.5, ge=0, le=1)
    mutation_prob: float = Field(default=0.5, ge=0, le=1)
    immigrant_share: float = Field(default=0.15, ge=0, lt=1)
    """Share of each generation's offspring that are random genomes (when above 0: at least one and
    never all, given two or more offspring), whatever the variation probabilities."""
    min_diversity: float = Field(default=0.1, ge=0, le=1)
    """Below this diversity (mean gene distance of the population, 0..1) half of the next offspring
    are random immigrants: a burst that restarts a collapsed population."""
    space: dict[str, Gene | None] = Field(default_factory=dict)
    """Genes added to, or replacing, the default space; ``null`` removes a default gene."""
    halving: HalvingConfig = Field(default_factory=HalvingConfig)
    scheduler: str | None = None
    """How a generation's training is spent (``mode: generational`` only): a registered scheduler
    (``evolm.registry.SCHEDULERS``: fifo, halving). None: halving when ``halving.rungs`` > 1, else fifo."""
    step_budget: int | None = Field(default=None, ge=1)
    """Training steps a stage's search may spend: a generation trains only the offspring whose steps
    start below it, so a stage ends within one evaluation's steps of it. None: ``generations`` decides."""
    time_budget: float | None = Field(default=None, gt=0)
    """Seconds a stage's search may take: no generation starts once the stage's generations took this
    long (their recorded wall time; the merge and test measurements are not counted), so a stage ends
    within one generation of it. None: no limit."""
    run_time_budget: float | None = Field(default=None, gt=0)
    """Seconds the whole run's searches may take: once spent, every later stage evaluates its starting
    population only (generation 0) and merges its best. None: no limit."""
    inherit_weights: bool = True
    """A child starts from its best parent's trained adapter (resized by SVD when ranks differ)
    instead of a fresh one; only the steps it trains itself are counted. On by default: at equal
    training steps it found better genomes than fresh adapters (benchmarks/README.md, search)."""

    @field_validator("scheduler")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        from evolm.schedulers import SCHEDULERS

        return None if name is None else one_of(name, SCHEDULERS.names(), "search.scheduler")

    @field_validator("objectives")
    @classmethod
    def _resolvable(cls, names: list[str], info: ValidationInfo) -> list[str]:
        from evolm.objectives import resolve_objective

        folder = (info.context or {}).get("base_dir")  # a module beside the experiment file is found
        for name in names:
            resolve_objective(name, None if folder is None else Path(folder))  # a ValueError says what is wrong
        return names

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives must not repeat (got {self.objectives})")
        if self.crossover_prob + self.mutation_prob > 1:
            raise ValueError(f"crossover_prob + mutation_prob must be <= 1 "
                             f"(now {self.crossover_prob} + {self.mutation_prob})")
        if self.mode == "steady_state" and self.scheduler is not None:
            raise ValueError(f"search.scheduler {self.scheduler} schedules a generation's evaluations; "
                             f"search.mode steady_state (the default) schedules its own (with asynchronous "
                             f"halving when search.halving.rungs > 1): remove search.scheduler, or set "
                             f"search.mode: generational to keep it")
        if self.elitism > self.population_size:
            raise ValueError(f"elitism ({self.elitism}) must be <= population_size ({self.population_size})")
        for name, gene in self.space.items():
            if name not in KNOWN_GENES:
                raise ValueError(f"space.{name}: unknown gene; known genes: {', '.join(KNOWN_GENES)}")
            if gene is None:
                continue
            if (name == "layers") != (gene.type == "layer_mask"):
                raise ValueError(f"space.{name}: only the gene 'layers' is a layer_mask")
            if name == "target_modules" and gene.type != "categorical":
                raise ValueError("space.target_modules must be categorical (choices: lists of module names)")
            problem = gene_range_problem(name, gene)
            if problem:
                raise ValueError(f"space.{name}: {problem}")
        return self


def _check_rule_objectives(search: SearchConfig) -> None:
    needs_both = ("min_val_loss_within_retention", "min_val_loss_within_forgetting")
    if search.winner.rule in needs_both and not {"val_loss", "retention_loss"} <= set(search.objectives):
        raise ValueError(f"winner.rule {search.winner.rule} needs objectives val_loss and retention_loss "
                         f"(now {search.objectives}); add retention_loss or choose winner.rule min_first")


class MergeConfig(Section):
    """How stage winners become the next base (docs/design.md, "Merging, precisely")."""

    method: str = "best"
    """A registered merge strategy (``evolm.registry.MERGE_STRATEGIES``) or auto. best: the winner alone;
    task_arithmetic / ties / dare / dare_ties: the dense weight deltas of the top_k genomes; auto: build
    every strategy's merge, score each on validation splits, keep the best by the winner rule."""
    top_k: int = Field(default=1, ge=1)
    """Genomes merged (best first by the winner rule); ranks may differ."""
    weights: list[float] | None = None
    """Weight of each of the top_k deltas (default: 1 / top_k each)."""
    density: float = Field(default=0.5, gt=0, le=1)
    """ties / dare: share of each delta's entries kept."""
    candidates: int = Field(default=3, ge=1)
    """Merges tried at every strength: the top_k winners merged by ``method``, then each of the
    candidates − 1 other genomes with the lowest first objective alone (a strong learner at a low
    strength often keeps more than a weak one at full strength)."""
    strengths: list[float] = Field(default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0], min_length=1)
    """Merge strengths tried (each in (0, 1]): the next base is stage base + s · (merged − stage base).
    Each is scored on validation splits; the winner rule picks one (docs/design.md, "Merge strength").
    [1.0]: the merge as it is."""

    @field_validator("strengths")
    @classmethod
    def _in_unit_interval(cls, strengths: list[float]) -> list[float]:
        bad = [s for s in strengths if not 0 < s <= 1]
        if bad:
            raise ValueError(f"every strength must be in (0, 1] (0 would keep the stage base unchanged); "
                             f"got {bad[0]}")
        return sorted(set(strengths))

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        from evolm.merge import MERGE_STRATEGIES

        return one_of(method, MERGE_STRATEGIES.names() + ("auto",), "merge method")

    @model_validator(mode="after")
    def _check(self):
        if self.weights is not None and any(not w > 0 for w in self.weights):
            raise ValueError(f"weights must all be > 0 (got {self.weights})")
        if self.weights is not None and len(self.weights) != self.top_k:
            raise ValueError(f"weights has {len(self.weights)} values but top_k is {self.top_k}; give one weight per genome")
        return self


class ReplayConfig(Section):
    buffer_blocks: int = Field(default=256, ge=1)
    """Training blocks kept per earlier stage (a deterministic sample) for the replay_ratio gene."""
    include_base_domain: bool = True
    """Replay the pretraining domain too."""


class CheckpointConfig(Section):
    keep_last: int = Field(default=3, ge=1)
    """Generation checkpoints kept (the newest ones); checkpoints at stage ends are always kept."""
    keep_adapters: int = Field(default=3, ge=0)
    """Runners-up whose adapters are kept in PEFT's format beside each stage's winner
    (``adapters/stage-<k>/peft/``); the other trained adapters are deleted after the merge."""


class TrackingConfig(Section):
    """Optional experiment tracking: every evaluation and generation, also logged to these tools."""

    tensorboard: bool = False
    """Write TensorBoard event files to ``<dir>/tensorboard`` (needs ``pip install tensorboard``)."""
    mlflow: bool = False
    """Log to an MLflow local file store in ``<dir>/mlruns`` (needs ``pip install mlflow``)."""
    dir: Path | None = None
    """Where tracking files go; default: the run directory."""


class ExperimentConfig(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Experiment name; runs are ``<output_dir>/<name>-<yyyymmdd-hhmmss>`` unless --name is given."""
    seed: int = 0
    output_dir: Path = Path("results")
    """Where runs land, relative to the current directory."""
    block_size: int = Field(default=128, ge=8)
    """Tokens per training / evaluation sequence."""
    model: ModelConfig
    stages: list[StageConfig] = Field(min_length=1)
    search: SearchConfig = Field(default_factory=SearchConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    prompts: list[str] = Field(default_factory=list)
    """Prompts sampled from the base and after every stage's merge, into ``samples.jsonl``."""
    sample_max_new_tokens: int = Field(default=40, ge=1)
    """Tokens generated per prompt for ``samples.jsonl``."""
    merge: MergeConfig = Field(default_factory=MergeConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    _defaulted: set = PrivateAttr(default_factory=set)
    """search.objectives / search.winner.rule when filled in by the defaults, not written by the user."""
    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """The experiment file's folder (a dict's: the current one), where own objectives' modules are
        looked for; run.json keeps it for a resume."""
        return self._source_dir

    def keep_search_of(self, run: "ExperimentConfig") -> "ExperimentConfig":
        """This config with ``run``'s objectives and winner rule where this one only took the defaults:
        stages appended to a run keep the search it began with."""
        search = self.search.model_copy(deep=True)
        if "objectives" in self._defaulted:
            search.objectives = list(run.search.objectives)
        if "rule" in self._defaulted:
            search.winner.rule = run.search.winner.rule
        return self.model_copy(update={"search": search})

    @model_validator(mode="after")
    def _unique_stage_names(self):
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dupes)}")
        own = self.model.own_domain
        if own is not None and own.name in names:
            field = "model.pretrain.name" if self.model.pretrain else "model.domain.name"
            raise ValueError(f"{field} '{own.name}' is also a stage name")
        return self

    @property
    def classification(self) -> bool:
        """A run of classification stages (the model gets a classifier head)."""
        return self.stages[0].format == "classification"

    @model_validator(mode="after")
    def _one_task(self):
        kinds = {s.name: s.format == "classification" for s in self.stages}
        own = self.model.own_domain
        if own is not None:
            kinds[own.name] = own.format == "classification"
        if len(set(kinds.values())) > 1:
            odd = next(n for n, c in kinds.items() if c != self.classification)
            raise ValueError(f"stage '{odd}': a run's stages are all classification or all text (one model, one "
                             f"head); set every stage's format to classification, or none")
        if self.classification and self.model.pretrain is not None:
            raise ValueError("model.pretrain is a language-model pretraining and does not apply to classification; "
                             "use model.domain to declare the base's own labelled data")
        if not self.classification and self.model.labels is not None:
            raise ValueError("model.labels is for classification stages; remove it or set the stages' format "
                             "to classification")
        if not self.classification and self.model.build is not None and self.model.build.family == "bert":
            raise ValueError("model.build.family: bert is an encoder and cannot generate text; use it with "
                             "classification stages, or use gpt2 or llama")
        if self.model.labels is not None and len(set(self.model.labels)) != len(self.model.labels):
            raise ValueError("model.labels: each class once")
        return self

    @model_validator(mode="after")
    def _forgetting_aware_defaults(self):
        """Unless the experiment says otherwise, a run with something to forget searches and merges
        to keep it: objectives [val_loss, retention_loss], the winner within a forgetting budget."""
        search, earlier = self.search, len(self.stages) > 1 or self.model.own_domain is not None
        if "objectives" not in search.model_fields_set:
            search.objectives = ["val_loss", "retention_loss"] if earlier else ["val_loss"]
            self._defaulted.add("objectives")
        if "rule" not in search.winner.model_fields_set:
            search.winner.rule = ("min_val_loss_within_forgetting" if "retention_loss" in search.objectives
                                  else "min_first")
            self._defaulted.add("rule")
        if not earlier and "retention_loss" in search.objectives:
            raise ValueError("search.objectives: retention_loss needs an earlier domain to retain, and this "
                             "experiment has one stage and no base domain; add model.domain (data that stands "
                             "for what the model already knows) or drop retention_loss")
        _check_rule_objectives(search)
        defaults = SearchConfig.model_fields
        explicit = {f for f in ("elitism", "tournament_size") if getattr(search, f) != defaults[f].default}
        if len(search.objectives) > 1 and explicit:  # a value NSGA-II would silently ignore
            given = ("the default here, as the experiment has earlier domains to keep; set search.objectives: "
                     "[val_loss] to keep them" if "objectives" in self._defaulted else "")
            why = f"{search.objectives}, " + given if given else f"{search.objectives}"
            raise ValueError(f"search.{sorted(explicit)[0]}: with several objectives ({why}) the search is NSGA-II, "
                             f"which keeps whole non-dominated fronts and picks parents by binary crowded "
                             f"tournaments; remove {' and '.join(sorted(explicit))}")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self):
        """What needs training.privacy, and what training.privacy cannot be combined with."""
        private, search = self.training.privacy is not None, self.search
        if not private:
            if "epsilon" in search.objectives:
                raise ValueError("search.objectives: epsilon is the privacy spent by DP training, and "
                                 "training.privacy is off; add training.privacy: {noise_multiplier: 1.0, "
                                 "max_grad_norm: 1.0} or drop epsilon")
            if search.space.get("noise_multiplier") is not None:
                raise ValueError("search.space.noise_multiplier: the DP noise only exists with training.privacy, which "
                                 "is off; add training.privacy: {max_grad_norm: 1.0} or remove the gene")
            return self
        import importlib.util

        if importlib.util.find_spec("opacus") is None:
            raise ValueError("training.privacy: needs Opacus, which is not installed; pip install 'evolm[privacy]' "
                             "(opacus) or remove training.privacy")
        if self.training.gradient_checkpointing:
            raise ValueError("training.gradient_checkpointing: not with training.privacy (Opacus's per-sample "
                             "gradients need each forward pass once, and checkpointing runs it twice); set it to false")
        return self

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
