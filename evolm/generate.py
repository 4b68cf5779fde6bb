"""Text from a model: seeded samples for people to read, and the run's ``samples.jsonl``.

The same prompt gets the same seed at every stage, so the samples of successive stages differ only
by what the model learned. Sampling runs inside ``torch.random.fork_rng``: it never moves the
random state of the run that calls it.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from evolm.jsonfiles import append_jsonl, read_jsonl

log = logging.getLogger(__name__)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 40, seed: int = 0,
                  top_k: int = 20, temperature: float = 1.0) -> str:
    """The continuation of ``prompt`` (prompt not included): top-k sampling, or greedy when
    ``top_k`` is 0 or 1. Deterministic for a given model, prompt and seed."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:  # an empty prompt: start from the end-of-text token
        ids = torch.tensor([[tokenizer.eos_token_id]])
    limit = context_length(model)
    if limit is not None:
        ids = ids[:, -max(1, limit - 1):]  # keep the prompt's end, room for at least one new token
        max_new_tokens = max(1, min(max_new_tokens, limit - ids.shape[1]))
    greedy = top_k <= 1
    options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    if not greedy:
        options.update(top_k=top_k, temperature=temperature)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 **options)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def prompt_seed(run_seed: int, index: int) -> int:
    """The seed of prompt ``index``: the same at every stage of a run."""
    return int(hashlib.sha256(f"sample:{run_seed}:{index}".encode()).hexdigest()[:8], 16)


def write_samples(run_dir: Path, model, tokenizer, config, stage: int, stage_name: str) -> list[dict]:
    """Sample every ``config.prompts`` from ``model`` and append them to ``run_dir/samples.jsonl``; a
    classifier's sample is the class it gives the prompt (and its probability)."""
    from evolm.models import is_classifier
    from evolm.predict import predict_texts

    path = Path(run_dir) / "samples.jsonl"
    done = {(r.get("stage"), r.get("prompt")) for r in read_jsonl(path)}  # a resumed run samples a stage once
    records = []
    for i, prompt in enumerate(config.prompts):
        if (stage, prompt) in done:
            continue
        record = {"stage": stage, "stage_name": stage_name, "prompt": prompt}
        if is_classifier(model):
            answer = predict_texts(model, tokenizer, [prompt], config.block_size)[0]
            record |= {"text": answer["label"], "probability": answer["probability"]}
        else:
            record["text"] = generate_text(model, tokenizer, prompt, max_new_tokens=config.sample_max_new_tokens,
                                           seed=prompt_seed(config.seed, i))
        append_jsonl(path, record)
        records.append(record)
    if records:
        log.info("stage %s: %d samples written to samples.jsonl", stage, len(records))
    return records


def context_length(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
