"""A classifier's answers for people: the class of each text, with its probability."""
from __future__ import annotations

import torch


@torch.no_grad()
def predict_texts(model, tokenizer, texts: list[str], max_length: int | None = None) -> list[dict]:
    """``{"text", "label", "probability"}`` for each text (the likeliest class by the model's head)."""
    model.eval()
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 512
    out = []
    for text in texts:  # one at a time: no padding, so the result does not depend on the other texts
        inputs = tokenizer(text, truncation=True, max_length=limit, return_tensors="pt").to(model.device)
        probs = model(**inputs).logits.float().softmax(-1)[0]
        best = int(probs.argmax())
        out.append({"text": text, "label": model.config.id2label.get(best, str(best)),
                    "probability": float(probs[best])})
    return out
