"""The search space of a run: which genes exist, their default ranges, what LoRA accepts.

    resolve_space(config, model info)   the default space for the model, then the YAML's genes
    training_defaults(config, ...)      ``training`` as every evaluation sees it
    gene_range_problem(name, gene)      a range the fine-tune would refuse, said in words

Target modules default to a table for GPT-2 and Llama and are derived from the model's own linear
layers otherwise (attention only / attention + its output / all linear layers).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from evolm.errors import ConfigError
from evolm.space import Gene, bind_layers

if TYPE_CHECKING:
    from evolm.config import ExperimentConfig

# Gene names the training loop understands; a gene outside this list would silently do nothing.
KNOWN_GENES = ("r", "lora_alpha", "lora_dropout", "target_modules", "layers", "learning_rate",
               "max_steps", "weight_decay", "warmup_ratio", "per_device_train_batch_size", "replay_ratio",
               "lr_scheduler_type", "gradient_accumulation_steps", "orthogonality", "merge_scale",
               "noise_multiplier")

# LoRA targets per model family: (attention only, attention + output, all linear layers).
TARGET_MODULES = {
    "gpt2": [["c_attn"], ["c_attn", "c_proj"], ["c_attn", "c_proj", "c_fc"]],
    "llama": [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]],
}

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
"""transformers' schedulers that are a function of the step alone, so a paused training resumes exactly."""

# What PEFT's LoraConfig and the training loop accept, per numeric gene.
_WHOLE = (int,)
GENE_LIMITS = {
    "r": (lambda v: isinstance(v, _WHOLE) and v >= 1, "a whole number >= 1"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "learning_rate": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: isinstance(v, _WHOLE) and v >= 1, "a whole number >= 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "per_device_train_batch_size": (lambda v: isinstance(v, _WHOLE) and v >= 1, "a whole number >= 1"),
    "replay_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "gradient_accumulation_steps": (lambda v: isinstance(v, _WHOLE) and v >= 1, "a whole number >= 1"),
    "orthogonality": (lambda v: v >= 0, ">= 0"),
    "merge_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "noise_multiplier": (lambda v: v > 0, "> 0 (without noise there is no privacy to account)"),
}


def gene_range_problem(name: str, gene) -> str | None:
    """Why values of ``gene`` would be refused by the fine-tune, or None."""
    if name == "target_modules":
        bad = [c for c in getattr(gene, "choices", []) if not (isinstance(c, list) and c
                                                               and all(isinstance(m, str) for m in c))]
        return f"every choice must be a non-empty list of module names (got {bad[0]!r})" if bad else None
    if name == "lr_scheduler_type":
        bad = [c for c in getattr(gene, "choices", [None]) if c not in LR_SCHEDULERS]
        return f"{bad[0]!r} is not one of {', '.join(LR_SCHEDULERS)}" if bad else None
    if name not in GENE_LIMITS or gene.type == "bool":
        return None
    ok, wanted = GENE_LIMITS[name]
    if hasattr(gene, "choices"):
        values = gene.choices
    elif hasattr(gene, "low") and hasattr(gene, "high"):
        values = [gene.low, gene.high]
    else:
        return None  # a registered gene type of the user's: its range is its own business
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            return f"value {v!r} is outside what the fine-tune accepts: {name} must be {wanted}; change the range"
    return None


def resolve_space(config: ExperimentConfig, family: str, n_layers: int,
                  linear_names: list[tuple[str, bool]] | None = None) -> dict[str, Any]:
    """The search space of a run: the default space for the model, then the YAML's genes; module
    names checked against the model's own linear layers (``linear_names``, when known)."""
    space = default_space(config, family, linear_names)
    for name, gene in config.search.space.items():
        if gene is None:
            space.pop(name, None)
        else:
            space[name] = gene
    if not space:
        raise ConfigError("search.space: every gene was removed; keep at least one gene to search")
    try:
        space = bind_layers(space, n_layers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if linear_names is not None and "target_modules" in space:
        for choice in space["target_modules"].choices:
            check_modules(choice, linear_names, family, "search.space.target_modules")
    return space


def default_space(config: ExperimentConfig, family: str,
                  linear_names: list[tuple[str, bool]] | None = None) -> dict[str, Any]:
    steps = config.training.max_steps
    raw = {
        "r": {"type": "categorical", "choices": [2, 4, 8, 16]},
        "lora_alpha": {"type": "categorical", "choices": [4, 8, 16, 32]},
        "lora_dropout": {"type": "uniform", "low": 0.0, "high": 0.2},
        "layers": {"type": "layer_mask"},
        "learning_rate": {"type": "log_uniform", "low": 1e-4, "high": 1e-2},
        "max_steps": {"type": "int", "low": max(1, steps // 2), "high": max(1, steps * 2)},
        "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
        "warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2},
        "replay_ratio": {"type": "uniform", "low": 0.0, "high": 0.5},
        # kept out of earlier stages' update directions: it lowered the final loss over all domains on
        # both streams of benchmarks/continual.py (benchmarks/README.md)
        "orthogonality": {"type": "categorical", "choices": [0.0, 0.1, 1.0, 10.0]},
    }
    choices = target_module_choices(family, linear_names)
    if choices:
        raw["target_modules"] = {"type": "categorical", "choices": choices}
    adapter = TypeAdapter(Gene)
    return {name: adapter.validate_python(spec) for name, spec in raw.items()}


def training_defaults(config: ExperimentConfig, family: str,
                      linear_names: list[tuple[str, bool]] | None = None, conv1d: bool | None = None) -> dict[str, Any]:
    """``training`` as every evaluation sees it: the model's default target modules filled in, and
    ``fan_in_fan_out`` for models whose linear layers store their weights transposed (transformers'
    Conv1D: GPT-2 and its kin; ``conv1d`` when known, else by family)."""
    training = config.training.model_dump()
    if training["target_modules"] is None:
        choices = target_module_choices(family, linear_names)
        if not choices:
            raise ConfigError(f"training.target_modules: no default for model type '{family}'; "
                              f"list the module names to adapt (e.g. [q_proj, v_proj])")
        training["target_modules"] = choices[0]
    elif linear_names is not None:
        check_modules(training["target_modules"], linear_names, family, "training.target_modules")
    training["fan_in_fan_out"] = family == "gpt2" if conv1d is None else conv1d
    training["task_type"] = "SEQ_CLS" if config.classification else "CAUSAL_LM"
    return training


def target_module_choices(family: str, linear_names: list[tuple[str, bool]] | None) -> list[list[str]]:
    """(attention only, attention + its output, all linear layers): from the table for known families,
    else derived from the model's own linear layers (``(leaf name, inside attention)`` pairs)."""
    if family in TARGET_MODULES:
        return TARGET_MODULES[family]
    if not linear_names:
        return []
    attention = [n for n, in_attn in linear_names if in_attn]
    outputs = [n for n in attention if re.fullmatch(r"(o|out|output|c|dense|wo)(_proj)?|dense", n)]
    inputs = [n for n in attention if n not in outputs] or attention
    everything = [n for n, _ in linear_names]
    choices = [inputs, inputs + outputs, everything]
    return [c for i, c in enumerate(choices) if c and c not in choices[:i]]


def check_modules(names: list[str], linear_names: list[tuple[str, bool]], family: str, where: str) -> None:
    known = [n for n, _ in linear_names]
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"{where}: {', '.join(missing)} is not a linear layer of this {family} model "
                          f"(its linear layers: {', '.join(known)}); use those names")
