"""Answer-level scores of Q&A rows: greedy generation after each prompt, compared with the reference.

Scores are on tokens (no tokenizer needed on a worker): ``exact_match`` is 1 when the generated
tokens equal the answer's, ``token_f1`` the F1 of their token multisets (SQuAD's F1, over the model's
tokens instead of words). Each answer is read up to EOS within the answer's length plus one token,
which is enough to tell an exact match and bounds the cost; prompts are answered in batches.
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
def greedy_answers(model, rows: np.ndarray, limit: int | None, device: torch.device = torch.device("cpu"),
                   batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """(generated, reference) answer tokens of the first ``limit`` rows, prompts generated from in
    batches (left-padded, so every prompt ends where generation starts)."""
    from evolm.generate import context_length

    model.eval()
    split = [split_row(row) for row in rows[:limit]]
    context = context_length(model)
    pairs = []
    for start in range(0, len(split), batch_size):
        pairs += _answer_batch(model, split[start:start + batch_size], context, device)
    return pairs


def _answer_batch(model, chunk: list, context: int | None, device) -> list[tuple[list[int], list[int]]]:
    width = max(len(prompt) for prompt, _, _ in chunk)
    new = max(len(answer) for _, answer, _ in chunk) + 1
    if context is not None and width + new > context and len(chunk) > 1:  # the longest prompt and the longest
        half = len(chunk) // 2                                          # answer would not fit together
        return _answer_batch(model, chunk[:half], context, device) + _answer_batch(model, chunk[half:], context, device)
    eos = chunk[0][2]
    ids = torch.full((len(chunk), width), eos, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, (prompt, _, _) in enumerate(chunk):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
    pairs = []
    for row_out, (_, answer, row_eos) in zip(out[:, width:].tolist(), chunk):
        generated = row_out[: len(answer) + 1]  # the answer's length and one more decide a match
        pairs.append((generated[: generated.index(row_eos)] if row_eos in generated else generated, answer))
    return pairs


def exact_match(pairs) -> float:
    return float(np.mean([generated == answer for generated, answer in pairs]))


def token_f1(pairs) -> float:
    scores = []
    for generated, answer in pairs:
        common = sum((Counter(generated) & Counter(answer)).values())
        scores.append(0.0 if common == 0 else 2 * common / (len(generated) + len(answer)))
    return float(np.mean(scores))
