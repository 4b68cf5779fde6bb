"""An objective of your own, for experiments/own-objective.yaml: does the model answer like the data?

    search:
      objectives: [val_loss, answer_metrics:answer_f1]

evolm imports this module from the experiment file's folder and calls ``answer_f1`` on every
worker after each evaluation's fine-tune, with the trained model, the run's tokenizer and the
stage's validation examples (as read from the files, at most ``training.eval_max_examples``).

The metric: each example is cut into a prompt and a reference (a question/answer record or a
``Q: ... A: ...`` document: the question and its answer; any other text: its first half and the
rest), the model continues the prompt greedily, and the continuation is scored against the
reference by word-level F1 (SQuAD's). Greedy decoding draws no random numbers, so the value is the
same on every worker and after a resume. About a second per evaluation for the quickstart's model
on a CPU.
"""
from __future__ import annotations

from collections import Counter

import torch

MAX_NEW_TOKENS = 16


def answer_f1(model, tokenizer, validation) -> float:
    """Mean word-level F1 of greedy answers against the references (0..1, higher is better)."""
    scores = []
    for example in validation:
        prompt, reference = _prompt_and_reference(example)
        if not prompt or not reference:
            continue
        answer = _greedy(model, tokenizer, prompt, MAX_NEW_TOKENS)
        scores.append(_f1(answer, reference))
    return sum(scores) / len(scores) if scores else 0.0


answer_f1.direction = "maximize"


def _prompt_and_reference(example) -> tuple[str, str]:
    if isinstance(example, dict):  # a question/answer record
        return f"Q: {example.get('question', '')}\nA:", str(example.get("answer", ""))
    text = str(example)
    if text.startswith("Q:") and "\nA:" in text:  # a record through the template "Q: {question}\nA: {answer}"
        question, _, answer = text.partition("\nA:")
        return question + "\nA:", answer.strip()
    words = text.split()  # plain text: continue its first half
    half = max(1, len(words) // 2)
    return " ".join(words[:half]), " ".join(words[half:])


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt``, up to the end-of-text token or the model's context."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(limit - max_new_tokens):]
    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=x).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        x = torch.cat([x, torch.tensor([[token]], device=x.device)], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]  # an answer is one line


def _f1(answer: str, reference: str) -> float:
    a, r = answer.lower().split(), reference.lower().split()
    common = sum((Counter(a) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)
