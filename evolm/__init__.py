"""evolm: keep a language model learning, one stage of data at a time.

For each stage, DEAP evolves LoRA / training genomes, Ray evaluates them with real fine-tunes, and
the winners are merged into the model that becomes the next base.

    import evolm
    evolm.run("experiments/quickstart.yaml")      # or a dict / ExperimentConfig; executor="local" | "ray"
    evolm.resume(run_dir)
    evolm.load_run(run_dir)                        # typed records: evaluations, generations, summaries

Extension points are registries (``evolm.registry``): objectives, winner rules, merge strategies,
gene types, schedulers, executors, reporters. See docs/design.md.
"""

__version__ = "0.1.0"

from evolm.api import load_run, resume, run  # noqa: E402
from evolm.config import (DataSource, ExperimentConfig, MergeConfig, ModelConfig, SearchConfig,  # noqa: E402
                          StageConfig, TrainingConfig)
from evolm.configfile import load_config, parse_config  # noqa: E402
from evolm.errors import EvolmError  # noqa: E402
from evolm.objectives import EvalContext, Objective  # noqa: E402
from evolm.records import EvaluationRecord, GenerationRecord, StageSummary  # noqa: E402
from evolm.registry import (EXECUTORS, GENE_TYPES, MERGE_STRATEGIES, OBJECTIVES, REPORTERS,  # noqa: E402
                            SCHEDULERS, WINNER_RULES, Registry)
from evolm.reporting import Reporter  # noqa: E402
from evolm.space import GeneType  # noqa: E402

__all__ = ["run", "resume", "load_run", "ExperimentConfig", "ModelConfig", "DataSource", "StageConfig",
           "SearchConfig", "TrainingConfig", "MergeConfig", "load_config", "parse_config", "EvolmError",
           "Objective", "EvalContext", "EvaluationRecord", "GenerationRecord", "StageSummary", "Registry",
           "OBJECTIVES", "WINNER_RULES", "MERGE_STRATEGIES", "GENE_TYPES", "SCHEDULERS", "EXECUTORS",
           "REPORTERS", "Reporter", "GeneType"]
