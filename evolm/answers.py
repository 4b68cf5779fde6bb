"""Answer-level scores of Q&A rows: greedy generation after each prompt, compared with the reference.

Scores are on tokens (no tokenizer needed on a worker): ``exact_match`` is 1 when the generated
tokens equal the answer's, ``token_f1`` the F1 of their token multisets (SQuAD's F1, over the model's
tokens instead of words). Generation stops at EOS or after the answer's length plus one token, which
is enough to tell an exact match and bounds the cost.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from evolm.rows import IGNORE


def split_row(row) -> tuple[list[int], list[int], int]:
    """(prompt tokens, answer tokens, the EOS that ends the answer) of one answer row."""
    labelled = np.flatnonzero(row["labels"] != IGNORE)
    start, end = int(labelled[0]), int(labelled[-1])
    ids = row["input_ids"]
    return ids[:start].tolist(), ids[start:end].tolist(), int(ids[end])


@torch.no_grad()
def greedy_answers(model, rows: np.ndarray, limit: int | None,
                   device: torch.device = torch.device("cpu")) -> list[tuple[list[int], list[int]]]:
    """(generated, reference) answer tokens of the first ``limit`` rows."""
    model.eval()
    pairs = []
    for row in rows[:limit]:
        prompt, answer, eos_id = split_row(row)
        x = torch.tensor([prompt], dtype=torch.long, device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=len(answer) + 1,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
        generated = out[0, len(prompt):].tolist()
        pairs.append((generated[: generated.index(eos_id)] if eos_id in generated else generated, answer))
    return pairs


def exact_match(pairs) -> float:
    return float(np.mean([generated == answer for generated, answer in pairs]))


def token_f1(pairs) -> float:
    scores = []
    for generated, answer in pairs:
        common = sum((Counter(generated) & Counter(answer)).values())
        scores.append(0.0 if common == 0 else 2 * common / (len(generated) + len(answer)))
    return float(np.mean(scores))
