"""Genome: one assignment of the genes, with a stable id and its provenance.

A genome only holds values; what they mean for PEFT and the training loop is decided here
(``hyperparameters``, ``lora_config``), so the rest of evolm never interprets gene names.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Genome:
    values: dict[str, Any]
    id: str
    parents: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    born: tuple[int, int] = (0, 0)
    """(stage, generation) in which this genome was created."""
    fitness: Any = None
    """A DEAP fitness object, attached by the evolution module (objectives to minimise)."""

    def key(self) -> str:
        """Canonical text of the values: equal keys mean the same genome (the fitness cache key)."""
        return canonical_json(self.values)

    def to_json(self) -> dict:
        return {"id": self.id, "values": self.values, "parents": self.parents, "ops": self.ops,
                "born": list(self.born)}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def value_text(value: Any) -> str:
    """One gene value for people: a layer mask as ``1101``, a float to 3 significant digits, a list
    as ``c_attn+c_proj``, anything else as ``str``."""
    if isinstance(value, list) and value and all(isinstance(b, bool) for b in value):
        return "".join("1" if b else "0" for b in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def genome_text(values: dict[str, Any] | None) -> str:
    """One line for people: ``r=8 layers=1101 learning_rate=0.00269 target_modules=c_attn+c_proj``."""
    return " ".join(f"{k}={value_text(v)}" for k, v in (values or {}).items())


def make_id(run_seed: int, stage: int, generation: int, index: int) -> str:
    """Ids are a hash of the genome's birth place, so they are stable across runs and resumes."""
    digest = hashlib.sha256(f"{run_seed}:{stage}:{generation}:{index}".encode()).hexdigest()
    return digest[:8]


def evaluation_seed(run_seed: int, stage: int, genome_id: str) -> int:
    """The seed of one evaluation: independent of worker, order of completion and retries."""
    digest = hashlib.sha256(f"eval:{run_seed}:{stage}:{genome_id}".encode()).hexdigest()
    return int(digest[:8], 16)


@dataclass(frozen=True)
class Hyperparameters:
    """What one training runs with: a genome's genes over the experiment's ``training`` settings
    (names as in PEFT's ``LoraConfig`` and transformers' ``TrainingArguments``). The LoRA fields are
    None for a full fine-tune (pretraining)."""

    learning_rate: float
    max_steps: int
    per_device_train_batch_size: int
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list | None = None
    layers_to_transform: list | None = None
    """Blocks that get LoRA (from the ``layers`` mask gene); None: all."""
    fan_in_fan_out: bool = False
    """GPT-2's Conv1D stores its weights transposed."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    replay_ratio: float = 0.0
    orthogonality: float = 0.0
    """λ of the penalty that keeps the adapter out of earlier stages' update subspaces (``evolm.interference``)."""
    merge_scale: float = 1.0
    """The trained adapter's B is scaled by this before it is measured and kept (a merge strength
    evolved with the other genes)."""
    privacy: dict | None = None
    """``training.privacy`` (noise_multiplier, max_grad_norm, delta): DP-SGD (``evolm.privacy``); None: off."""
    noise_multiplier: float | None = None
    """The gene of that name: the DP noise σ, over ``privacy["noise_multiplier"]``."""
    task_type: str = "CAUSAL_LM"
    """PEFT's task type: CAUSAL_LM, or SEQ_CLS (a classifier: its head is trained in full with the adapter)."""

    @classmethod
    def of(cls, hp: "Hyperparameters | dict[str, Any]") -> "Hyperparameters":
        """``hp`` itself, or the fields of a dict (other keys, e.g. evaluation settings, are ignored)."""
        if isinstance(hp, cls):
            return hp
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hp.items() if k in names})

    @property
    def scaling(self) -> float:
        """LoRA's ΔW = scaling · B·A."""
        return float(self.lora_alpha) / int(self.r)


def hyperparameters(values: dict[str, Any], defaults: dict[str, Any]) -> Hyperparameters:
    """Gene values over the experiment's defaults; a layer mask becomes ``layers_to_transform``."""
    hp = dict(defaults)
    hp.update(values)
    mask = hp.pop("layers", None)
    if mask is not None:
        hp["layers_to_transform"] = [i for i, on in enumerate(mask) if on]
    return Hyperparameters.of(hp)


def lora_config(hp: Hyperparameters | dict[str, Any]):
    """The PEFT ``LoraConfig`` of a genome's hyperparameters."""
    from peft import LoraConfig

    hp = Hyperparameters.of(hp)
    return LoraConfig(r=int(hp.r), lora_alpha=float(hp.lora_alpha), lora_dropout=float(hp.lora_dropout),
                      target_modules=list(hp.target_modules), layers_to_transform=hp.layers_to_transform,
                      fan_in_fan_out=bool(hp.fan_in_fan_out), bias="none", task_type=hp.task_type)
