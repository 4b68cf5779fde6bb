"""The training section of an experiment: every hyperparameter that is not a gene, and the privacy option.

Re-exported by ``evolm.config``.
"""
from __future__ import annotations

from pydantic import Field, field_validator

from evolm.configsection import Section, one_of
from evolm.searchspace import LR_SCHEDULERS


class PrivacyConfig(Section):
    """Differentially private training of every evaluation's adapter (DP-SGD through Opacus,
    ``evolm.privacy``): each sample's gradient clipped, Gaussian noise added, the ε spent recorded."""

    noise_multiplier: float = Field(default=1.0, gt=0)
    """σ: the noise's standard deviation in units of max_grad_norm (more noise, smaller ε); the gene
    ``noise_multiplier`` searches it."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """C: each sample's gradient is clipped to this L2 norm (it replaces training.max_grad_norm's clip
    of the batch gradient)."""
    delta: float = Field(default=1e-5, gt=0, lt=1)
    """δ of the (ε, δ) guarantee: keep it below 1 / (training rows)."""


class TrainingConfig(Section):
    """Hyperparameters used for every gene that is not in the search space."""

    r: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    """Default: the attention projections of the model family."""
    learning_rate: float = Field(default=2e-4, gt=0)
    max_steps: int = Field(default=50, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    per_device_train_batch_size: int = Field(default=8, ge=1)
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_batches: int | None = Field(default=None, ge=1)
    """Cap on validation batches per evaluation (None: the whole validation split)."""
    eval_max_examples: int | None = Field(default=32, ge=1)
    """Validation examples per evaluation for what is measured example by example: answer-only Q&A's
    exact_match and token_f1 (greedy generation), and the examples (documents or records, as read)
    given to your own objectives, the first this many (None: all)."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    lr_scheduler_type: str = "linear"
    """transformers' learning-rate schedule over max_steps, warming up over warmup_ratio: linear,
    cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup or inverse_sqrt."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Each batch is processed in this many micro-batches (less activation memory, same gradient)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, slower)."""
    replay_ratio: float = Field(default=0.0, ge=0, lt=1)
    """Share of each training batch drawn from earlier stages' replay buffer."""
    privacy: PrivacyConfig | None = None
    """Differentially private adapter training (needs ``pip install 'evolm[privacy]'``); None: off."""


    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        return one_of(name, LR_SCHEDULERS, "lr_scheduler_type")
