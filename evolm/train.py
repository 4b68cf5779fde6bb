"""fine_tune() and evaluate(): pure functions of a model, token blocks and hyperparameters.

No Ray, no files. The same loop serves LoRA evaluations and the full pretraining stage.
Everything random (batch order, LoRA init, dropout) comes from the given seed.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from evolm.genome import lora_config
from evolm.replay import replay_mix


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def _autocast(device: torch.device):
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_loop(model, blocks: np.ndarray, hp: dict, seed: int, device: torch.device,
               replay: np.ndarray | None = None) -> dict:
    """AdamW with linear warmup and linear decay over ``max_steps`` random batches of ``blocks``.

    With ``replay`` blocks (earlier stages) and ``hp["replay_ratio"]`` > 0, that share of every
    batch comes from ``replay`` (``evolm.replay.mix_batch_indices``); otherwise nothing changes.
    Returns a summary of the training curve; stops early when the loss stops being finite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    steps, batch = int(hp["max_steps"]), int(hp["per_device_train_batch_size"])
    warmup = int(round(hp.get("warmup_ratio", 0.0) * steps))
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp.get("weight_decay", 0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(blocks.astype(np.int64))
    mix = replay_mix(blocks, replay, float(hp.get("replay_ratio", 0.0)), batch, steps, seed)  # None: no replay
    if mix is not None:
        data = torch.from_numpy(mix[0].astype(np.int64))
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch,), generator=generator) if mix is None else torch.from_numpy(mix[1][step])
        x = data[idx].to(device)
        with _autocast(device):
            loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hp.get("max_grad_norm", 1.0))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "first": losses[0], "last": losses[-1], "min": min(losses),
            "tail_mean": float(np.mean(tail))}


@torch.no_grad()
def evaluate(model, blocks: np.ndarray, batch_size: int, max_batches: int | None = None,
             device: torch.device = torch.device("cpu")) -> float:
    """Mean next-token loss over (the first ``max_batches`` batches of) ``blocks``."""
    model.eval()
    data = torch.from_numpy(blocks.astype(np.int64))
    total, count = 0.0, 0
    for n, start in enumerate(range(0, len(data), batch_size)):
        if max_batches is not None and n >= max_batches:
            break
        x = data[start:start + batch_size].to(device)
        with _autocast(device):
            loss = model(input_ids=x, labels=x).loss
        total += loss.item() * len(x)
        count += len(x)
    return total / count


def fine_tune(base_model, blocks: np.ndarray, hp: dict, seed: int, device: torch.device,
              replay: np.ndarray | None = None):
    """A LoRA adapter trained on a private copy of ``base_model``; returns (peft model, curve)."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are initialised from the global generator
    model = get_peft_model(copy.deepcopy(base_model), lora_config(hp)).to(device)
    curve = train_loop(model, blocks, hp, seed, device, replay)
    return model, curve


def evaluate_genome(base_model, blocks: dict[str, np.ndarray], hp: dict, seed: int, training: dict,
                    device: torch.device) -> dict:
    """One evaluation: fine-tune an adapter, then measure the objectives on validation splits.

    The adapter's weights come back as numpy arrays (small), so the driver can merge the winner
    without training it again. ``blocks["replay"]`` (optional): earlier stages' blocks to replay;
    ``blocks["retention"]`` (optional): earlier stages' validation blocks, for ``retention_loss``.
    """
    from peft import get_peft_model_state_dict

    start = time.perf_counter()
    model, curve = fine_tune(base_model, blocks["train"], hp, seed, device, blocks.get("replay"))
    trained = time.perf_counter()
    measure = lambda split: (evaluate(model, blocks[split], training["eval_batch_size"], training["eval_max_batches"],  # noqa: E731
                                      device) if math.isfinite(curve["last"]) else float("nan"))
    val_loss = measure("validation")
    adapter = {k: v.detach().cpu().float().numpy() for k, v in get_peft_model_state_dict(model).items()}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    objectives = {"val_loss": val_loss, "adapter_params": float(n_params)}
    if "retention" in blocks:  # validation blocks of every earlier stage, the base's domain included
        objectives["retention_loss"] = measure("retention")
    return {"objectives": objectives, "curve": curve, "adapter": adapter, "adapter_params": n_params,
            "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained}
