"""The data sections of an experiment: a stage's data, the pretraining domain, a base's own domain.

Re-exported by ``evolm.config``; relative paths are resolved against the experiment file's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from evolm.configsection import Section


class DataSource(Section):
    format: Literal["text", "jsonl", "qa", "classification"] = "text"
    """text: documents separated by blank lines; jsonl: one JSON object per line (``text_field``);
    qa: JSON lines with question/answer fields turned into text by ``template``; classification:
    JSON lines with a text (``text_field``) and a class (``label_field``)."""
    train: Path | None = None
    """Training file (or the only file, when validation/test are derived from it)."""
    documents: list[str] | None = None
    """The documents themselves, instead of a ``train`` file (a library user's in-memory data);
    validation and test are derived from them as from a single file."""
    validation: Path | None = None
    """Validation file; derived deterministically from ``train`` when left out."""
    test: Path | None = None
    """Test file (never used for selection); derived deterministically from ``train`` when left out."""
    text_field: str = "text"
    """jsonl: the field that holds the text."""
    label_field: str = "label"
    """classification: the field that holds the class (any JSON scalar, compared as text)."""
    template: str = "Question: {question}\nAnswer: {answer}"
    """qa: how a record becomes text; ``{field}`` placeholders name record fields."""
    answer_field: str = "answer"
    """qa: the record field that is the answer; with ``loss_on: answer`` the template must end with
    its placeholder, and everything before it is the prompt."""
    loss_on: Literal["answer", "all"] = "answer"
    """qa: answer: the loss is taken on the answer's tokens only (the prompt is masked), one example
    per row; all: the whole text is a document, packed like text."""
    validation_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Share of documents held out for validation when no validation file is given."""
    test_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    """Share of documents held out for test when no test file is given."""
    max_documents: int | None = Field(default=None, ge=1)
    """Use at most this many documents of each file (a quick way to shrink a stage)."""

    @model_validator(mode="after")
    def _one_train_source(self):
        if (self.train is None) == (self.documents is None):
            raise ValueError("give exactly one of train (a file) or documents (a list of texts)")
        if self.documents is not None and not any(d.strip() for d in self.documents if isinstance(d, str)):
            raise ValueError("documents is empty (or only whitespace); give some text")
        return self

    @model_validator(mode="after")
    def _answer_at_the_end(self):
        if self.format == "qa" and self.loss_on == "answer":
            placeholder = "{" + self.answer_field + "}"
            if not self.template.rstrip().endswith(placeholder):
                raise ValueError(f"template must end with {placeholder} when loss_on is answer (the prompt is "
                                 f"what comes before it); fix the template, set answer_field, or set loss_on: all")
        return self

    @property
    def answer_only(self) -> bool:
        """Q&A rows whose loss is on the answer alone."""
        return self.format == "qa" and self.loss_on == "answer"

    @field_validator("train", "validation", "test")
    @classmethod
    def _exists(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        base = Path((info.context or {}).get("base_dir", "."))
        full = (base / path).resolve() if not path.is_absolute() else path
        try:
            found = full.is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise ValueError(f"cannot use {str(full)[:200]} as a file ({exc.strerror}); fix the path") from None
        if not found:
            raise ValueError(f"file not found: {full} (fix the path, or prepare the data with "
                             f"`python experiments/data/prepare.py`)")
        return full


class StageConfig(DataSource):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Short name of the stage (letters, digits, ``_ . -``); used in logs, files and plots."""


class PretrainConfig(DataSource):
    """A full fine-tune of a freshly built model on a general domain, before the LoRA stages."""

    name: str = "general"
    max_steps: int = Field(default=300, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    per_device_train_batch_size: int = Field(default=16, ge=1)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


class BaseDomainConfig(DataSource):
    """Data that stands for what a loaded model already knows (no pretraining): retention, replay,
    the loss matrix and forgetting measure the base's own domain on it."""

    name: str = Field(default="base", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
