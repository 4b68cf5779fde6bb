"""What a classifier gets right: predictions, accuracy and macro-F1 on classification rows."""
from __future__ import annotations

import numpy as np
import torch

from evolm.rows import model_inputs


@torch.no_grad()
def predictions(model, rows: np.ndarray, batch_size: int, max_batches: int | None = None,
                device: torch.device = torch.device("cpu")) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, true class) of each row, within the first ``max_batches`` batches."""
    model.eval()
    predicted, true = [], []
    for n, start in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        batch = rows[start:start + batch_size]
        inputs = model_inputs(batch, device)
        true.append(inputs.pop("labels").cpu().numpy())
        predicted.append(model(**inputs).logits.argmax(-1).cpu().numpy())
    return np.concatenate(predicted), np.concatenate(true)


def accuracy(model, rows: np.ndarray, batch_size: int, max_batches: int | None = None,
             device: torch.device = torch.device("cpu")) -> float:
    predicted, true = predictions(model, rows, batch_size, max_batches, device)
    return float((predicted == true).mean())


def macro_f1(predicted: np.ndarray, true: np.ndarray) -> float:
    """The mean over classes (those in ``true`` or ``predicted``) of each class's F1: rare classes count as
    much as frequent ones."""
    scores = []
    for c in np.union1d(true, predicted):
        tp = np.sum((predicted == c) & (true == c))
        fp, fn = np.sum((predicted == c) & (true != c)), np.sum((predicted != c) & (true == c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))
