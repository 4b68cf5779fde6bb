"""A split's examples as one numpy array: what training, evaluation, replay and retention share.

Two shapes, both indexable by row, sliceable and shippable to Ray workers without copies:

- token blocks, a 2-D int32 array ``(n, block_size)``: packed text; a causal LM predicts every token;
- labelled rows, a 1-D structured array: ``input_ids`` and ``labels`` (a causal LM predicts only the
  tokens whose label is not ``IGNORE``, e.g. a Q&A answer), or ``input_ids``, ``attention_mask`` and
  one ``label`` per row (sequence classification).

``model_inputs`` turns a batch of either into the keyword arguments of the model's forward call.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE = -100
"""The label of a position no loss is taken on (what transformers' loss functions skip)."""


def answer_dtype(width: int) -> np.dtype:
    return np.dtype([("input_ids", np.int32, (width,)), ("labels", np.int32, (width,))])


def class_dtype(width: int) -> np.dtype:
    return np.dtype([("input_ids", np.int32, (width,)), ("attention_mask", np.int8, (width,)),
                     ("label", np.int32)])


def is_classification(rows: np.ndarray) -> bool:
    return rows.dtype.names is not None and "label" in rows.dtype.names


def width(rows: np.ndarray) -> int:
    """Tokens per row."""
    return rows.shape[1] if rows.dtype.names is None else rows.dtype["input_ids"].shape[0]


def model_inputs(batch: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The forward call's arguments for a batch of rows (``labels`` included: the model returns its loss)."""
    if batch.dtype.names is None:
        x = torch.from_numpy(batch.astype(np.int64)).to(device)
        return {"input_ids": x, "labels": x}
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(device)
    if "label" in batch.dtype.names:
        return {"input_ids": ids, "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(device),
                "labels": torch.from_numpy(batch["label"].astype(np.int64)).to(device)}
    return {"input_ids": ids, "labels": torch.from_numpy(batch["labels"].astype(np.int64)).to(device)}


def as_answer_rows(blocks: np.ndarray) -> np.ndarray:
    """Token blocks as labelled rows that predict every token (so they can share a pool with Q&A rows)."""
    if blocks.dtype.names is not None:
        return blocks
    rows = np.empty(len(blocks), dtype=answer_dtype(blocks.shape[1]))
    rows["input_ids"] = blocks
    rows["labels"] = blocks
    return rows


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """Rows of several splits in one array; token blocks join labelled rows as rows predicting every token."""
    parts = [p for p in parts if p is not None]
    if len({p.dtype for p in parts}) > 1:
        if any(is_classification(p) for p in parts):
            raise ValueError("classification rows cannot share a pool with text rows: a run's stages are "
                             "all classification or all text")
        parts = [as_answer_rows(p) for p in parts]
    return np.concatenate(parts)


def same_kind(a: np.ndarray, b: np.ndarray) -> str | None:
    """Why rows ``a`` and ``b`` cannot be mixed in one batch, or None."""
    if width(a) != width(b):
        return f"rows of {width(a)} and {width(b)} tokens"
    if is_classification(a) != is_classification(b):
        return "classification rows and text rows"
    return None
